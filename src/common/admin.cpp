// SPDX-License-Identifier: Apache-2.0
// The admin listener.
#include "taser/admin/admin.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include "taser/log/log.hpp"
#include "taser/net/deadlines.hpp"
#include "taser/net/event.hpp"
#include "taser/net/lifecycle.hpp"
#include "taser/net/spawn.hpp"

namespace taser::admin {
namespace {

namespace asio = boost::asio;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using asio::as_tuple;
using asio::use_awaitable;

// Probes and scrapers send one small request; anything slower or larger is cut off.
constexpr auto request_timeout = std::chrono::seconds(5);
constexpr std::uint32_t max_header_bytes = 8 * 1024;

std::string respond(unsigned status, std::string_view reason, std::string_view content_type,
                    const std::string& body) {
    std::string out = "HTTP/1.1 " + std::to_string(status) + " " + std::string(reason) + "\r\n";
    out += "Content-Type: ";
    out += content_type;
    out += "\r\nCache-Control: no-store\r\nConnection: close\r\nContent-Length: ";
    out += std::to_string(body.size());
    out += "\r\n\r\n";
    out += body;
    return out;
}

asio::awaitable<void> serve_one(tcp::socket socket, const handlers& h) {
    auto timers = std::make_shared<net::deadlines>(socket.get_executor(), [&socket] {
        boost::system::error_code ignored;
        socket.close(ignored);
    });
    timers->start();
    timers->arm(net::deadlines::read, request_timeout);

    boost::beast::flat_buffer buffer(max_header_bytes);
    bhttp::request_parser<bhttp::empty_body> parser;
    parser.header_limit(max_header_bytes);
    auto [ec, n] = co_await bhttp::async_read(socket, buffer, parser, as_tuple(use_awaitable));
    std::string response;
    if (ec) {
        response = respond(400, "Bad Request", "text/plain", "bad request\n");
    } else {
        auto target = parser.get().target();
        auto path = target.substr(0, target.find('?'));
        bool get =
            parser.get().method() == bhttp::verb::get || parser.get().method() == bhttp::verb::head;
        if (!get) {
            response = respond(405, "Method Not Allowed", "text/plain", "only GET\n");
        } else if (path == "/healthz") {
            response = respond(200, "OK", "text/plain", "ok\n");
        } else if (path == "/readyz") {
            response = h.ready() ? respond(200, "OK", "text/plain", "ready\n")
                                 : respond(503, "Service Unavailable", "text/plain", "not ready\n");
        } else if (path == "/metrics") {
            response = respond(200, "OK", "text/plain; version=0.0.4; charset=utf-8", h.metrics());
        } else {
            response = respond(404, "Not Found", "text/plain", "not found\n");
        }
    }
    timers->arm(net::deadlines::write, request_timeout);
    co_await asio::async_write(socket, asio::buffer(response), as_tuple(use_awaitable));
    timers->stop();
    boost::system::error_code ignored;
    socket.shutdown(tcp::socket::shutdown_both, ignored);
}

}  // namespace

asio::awaitable<void> serve(tcp::acceptor& acceptor, handlers h) {
    auto shared = std::make_shared<handlers>(std::move(h));
    for (;;) {
        auto accepted = co_await net::accept_next(acceptor, "admin");
        if (!accepted) {
            co_return;
        }
        auto socket = std::move(*accepted);
        net::spawn(
            acceptor.get_executor(),
            [shared, s = std::move(socket)]() mutable -> asio::awaitable<void> {
                co_await serve_one(std::move(s), *shared);
            },
            "admin_request");
    }
}

}  // namespace taser::admin
