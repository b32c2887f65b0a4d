// SPDX-License-Identifier: Apache-2.0
// Waiting for input before reading it.
#pragma once

#include <type_traits>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace taser::net {

namespace asio = boost::asio;

// True for streams whose input can be waited for without a read: plain TCP sockets. A TLS
// stream may contain decrypted bytes that its socket no longer shows, so it must read at once.
template <class Stream>
inline constexpr bool can_wait_readable = std::is_same_v<Stream, asio::ip::tcp::socket>;

// Waits until the socket has input. The read that follows then neither finds the socket empty
// (a wasted system call) nor needs a buffer while it waits. A failed wait leaves the failure
// to that read.
inline asio::awaitable<void> wait_readable(asio::ip::tcp::socket& socket) {
    auto [ec] = co_await socket.async_wait(asio::ip::tcp::socket::wait_read,
                                           asio::as_tuple(asio::use_awaitable));
    (void)ec;
}

}  // namespace taser::net
