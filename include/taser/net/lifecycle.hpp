// SPDX-License-Identifier: Apache-2.0
// What both roles do with listeners and signals: accepting with back-off, reloading
// certificates on SIGHUP, and draining on SIGTERM or SIGINT.
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <string_view>
#include <vector>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>

#include "taser/tls/reloader.hpp"

namespace taser::net {

// Returns the next accepted connection, or nullopt once the acceptor is closed. A failed
// accept (out of file descriptors, for example) is logged and retried after a pause instead of
// spinning.
boost::asio::awaitable<std::optional<boost::asio::ip::tcp::socket>> accept_next(
    boost::asio::ip::tcp::acceptor& acceptor, std::string_view listener);

// SIGHUP reloads every reloader's files at once. The first SIGTERM or SIGINT calls start_drain
// (which spawns the drain); a second one ends the process at once with exit code 1. Lives
// until io.run() returns.
class signal_handlers {
public:
    signal_handlers(boost::asio::io_context& io, std::vector<tls::reloader*> reloaders,
                    std::chrono::milliseconds drain_timeout, std::function<void()> start_drain);

private:
    void wait_hangup();
    void wait_stop();

    std::vector<tls::reloader*> reloaders_;
    std::chrono::milliseconds drain_timeout_;
    std::function<void()> start_drain_;
    boost::asio::signal_set hangup_;
    boost::asio::signal_set stop_;
    int stop_signals_ = 0;
};

}  // namespace taser::net
