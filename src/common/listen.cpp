// SPDX-License-Identifier: Apache-2.0
// Listening sockets and instance ids.
#include "taser/net/listen.hpp"

#include <boost/asio/ip/address.hpp>
#include <boost/system/system_error.hpp>
#include <openssl/evp.h>
#include <openssl/rand.h>

namespace taser::net {

using tcp = boost::asio::ip::tcp;

void listen(tcp::acceptor& acceptor, const config::host_port& where) {
    boost::system::error_code ec;
    auto address = boost::asio::ip::make_address(where.host, ec);
    tcp::endpoint endpoint;
    if (!ec) {
        endpoint = tcp::endpoint(address, where.port);
    } else {
        tcp::resolver resolver(acceptor.get_executor());
        auto results = resolver.resolve(where.host, std::to_string(where.port), ec);
        if (ec || results.empty()) {
            throw boost::system::system_error(ec,
                                              "cannot resolve listen address " + where.to_string());
        }
        endpoint = results.begin()->endpoint();
    }
    acceptor.open(endpoint.protocol());
    acceptor.set_option(tcp::acceptor::reuse_address(true));
    if (endpoint.address().is_v6()) {
        // "[::]:8443" serves IPv4 clients too, as users expect from a wildcard.
        acceptor.set_option(boost::asio::ip::v6_only(false), ec);
    }
    acceptor.bind(endpoint, ec);
    if (ec) {
        throw boost::system::system_error(ec, "cannot listen on " + where.to_string());
    }
    acceptor.listen(tcp::socket::max_listen_connections);
}

std::string format_endpoint(const tcp::endpoint& e) {
    auto a = e.address().to_string();
    return e.address().is_v6() ? "[" + a + "]:" + std::to_string(e.port())
                               : a + ":" + std::to_string(e.port());
}

std::string local_address(const tcp::acceptor& acceptor) {
    boost::system::error_code ec;
    return format_endpoint(acceptor.local_endpoint(ec));
}

frame::instance_id make_instance_id(const std::string& name) {
    frame::instance_id id{};
    if (name.empty()) {
        RAND_bytes(id.data(), static_cast<int>(id.size()));
        return id;
    }
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_Digest(name.data(), name.size(), digest, &n, EVP_sha256(), nullptr);
    std::copy_n(digest, id.size(), id.begin());
    return id;
}

std::string to_hex(const frame::instance_id& id) {
    static constexpr char digits[] = "0123456789abcdef";
    std::string out;
    for (auto b : id) {
        out += digits[b >> 4];
        out += digits[b & 0xf];
    }
    return out;
}

}  // namespace taser::net
