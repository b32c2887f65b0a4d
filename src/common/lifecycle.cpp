// SPDX-License-Identifier: Apache-2.0
// Accepting with back-off, and the signals of both roles.
#include "taser/net/lifecycle.hpp"

#include <csignal>
#include <cstdlib>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "taser/log/log.hpp"
#include "taser/net/event.hpp"

namespace taser::net {

namespace asio = boost::asio;

asio::awaitable<std::optional<asio::ip::tcp::socket>> accept_next(asio::ip::tcp::acceptor& acceptor,
                                                                  std::string_view listener) {
    for (;;) {
        auto [ec, socket] = co_await acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
        if (!ec) {
            co_return std::move(socket);
        }
        if (ec == asio::error::operation_aborted || !acceptor.is_open()) {
            co_return std::nullopt;
        }
        log::write_limited(log::level::error, "accept_failed",
                           {{"listener", listener}, {"error", ec.message()}});
        co_await sleep(std::chrono::milliseconds(100));
    }
}

signal_handlers::signal_handlers(asio::io_context& io, std::vector<tls::reloader*> reloaders,
                                 std::chrono::milliseconds drain_timeout,
                                 std::function<void()> start_drain)
    : reloaders_(std::move(reloaders)),
      drain_timeout_(drain_timeout),
      start_drain_(std::move(start_drain)),
      hangup_(io, SIGHUP),
      stop_(io, SIGTERM, SIGINT) {
    wait_hangup();
    wait_stop();
}

void signal_handlers::wait_hangup() {
    hangup_.async_wait([this](boost::system::error_code ec, int) {
        if (ec) {
            return;
        }
        for (auto* r : reloaders_) {
            r->check(true);
        }
        wait_hangup();
    });
}

void signal_handlers::wait_stop() {
    stop_.async_wait([this](boost::system::error_code ec, int number) {
        if (ec) {
            return;
        }
        if (++stop_signals_ > 1) {
            // At once means without unwinding: running requests are cut, and no destructor
            // runs into state that the drain was still using.
            log::warn("shutdown_forced", {{"signal", number}});
            std::_Exit(1);
        }
        log::info("drain_started",
                  {{"signal", number}, {"drain_timeout_ms", drain_timeout_.count()}});
        start_drain_();
        wait_stop();
    });
}

}  // namespace taser::net
