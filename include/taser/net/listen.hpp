// SPDX-License-Identifier: Apache-2.0
// Opening listening sockets and random instance ids, shared by the roles.
#pragma once

#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "taser/config/parse.hpp"
#include "taser/frame/frame.hpp"

namespace taser::net {

// Binds and listens on a host_port; a host name is resolved once, at startup. Throws
// boost::system::system_error with the address in the message when that fails.
void listen(boost::asio::ip::tcp::acceptor& acceptor, const config::host_port& where);

// Returns an endpoint as "host:port", with an IPv6 address in brackets ("[v6]:port").
std::string format_endpoint(const boost::asio::ip::tcp::endpoint& e);

// Returns the address the acceptor is bound to, formatted by format_endpoint().
std::string local_address(const boost::asio::ip::tcp::acceptor& acceptor);

// Returns the wire instance id for a name: SHA-256 of the name, cut to 16 bytes; random bytes
// when the name is empty.
frame::instance_id make_instance_id(const std::string& name);
std::string to_hex(const frame::instance_id& id);

}  // namespace taser::net
