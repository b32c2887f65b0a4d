// SPDX-License-Identifier: Apache-2.0
// The bridge's only outbound HTTP client: replays tunnel streams against the vault address,
// over a small pool of keep-alive connections.
#pragma once

#include <array>
#include <chrono>
#include <deque>
#include <memory>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/beast/core/flat_buffer.hpp>

#include "taser/bridge/bridge.hpp"
#include "taser/mux/session.hpp"
#include "taser/net/deadlines.hpp"
#include "taser/net/event.hpp"
#include "taser/tls/reloader.hpp"

namespace taser::bridge {

namespace asio = boost::asio;

// One connection to the vault, plain or TLS.
struct vault_connection {
    std::shared_ptr<asio::ssl::context> tls_context;
    std::unique_ptr<asio::ip::tcp::socket> plain;
    std::unique_ptr<asio::ssl::stream<asio::ip::tcp::socket>> tls;
    boost::beast::flat_buffer buffer;
    std::chrono::steady_clock::time_point idle_since;
    bool reused = false;
    // Deadlines of the reads and writes on this connection; one watchdog for its whole life.
    std::shared_ptr<net::deadlines> timers;

    vault_connection() = default;
    vault_connection(const vault_connection&) = delete;
    vault_connection& operator=(const vault_connection&) = delete;
    ~vault_connection();

    void close() noexcept;
};

class vault_client {
public:
    // tls is null for an http vault address.
    vault_client(const asio::any_io_executor& ex, const options& o, tls::reloader* tls);

    // Serves one stream opened by a broker: replays its request against the vault and sends
    // the response back on it. Never throws; every failure ends in a response or a reset.
    asio::awaitable<void> serve(std::shared_ptr<mux::stream> s);

    std::size_t open_connections() const noexcept { return open_; }
    // Responses from the vault by status class (index 1..5), and requests that found no vault.
    const std::array<std::uint64_t, 6>& responses_by_class() const noexcept { return by_class_; }
    std::uint64_t vault_unreachable() const noexcept { return unreachable_; }

    std::uint64_t tunnels() const noexcept { return tunnels_; }

private:
    // Connects the stream's bytes to the vault address: CONNECT and passthrough. Responds
    // with 403 when the bridge does not allow byte tunnels.
    asio::awaitable<void> tunnel(std::shared_ptr<mux::stream> s);
    // Replays one HTTP request against the vault.
    asio::awaitable<void> forward(std::shared_ptr<mux::stream> s);
    // Returns a pooled or new connection; fails with errc::timeout when none is free by the
    // deadline, or with the connect error.
    asio::awaitable<std::unique_ptr<vault_connection>> acquire(
        error_code& ec, std::chrono::steady_clock::time_point deadline);
    asio::awaitable<void> tick_waiters();
    asio::awaitable<std::tuple<error_code, asio::ip::tcp::resolver::results_type>> resolve(
        const config::host_port& where);
    asio::awaitable<std::unique_ptr<vault_connection>> connect(error_code& ec);
    void release(std::unique_ptr<vault_connection> c, bool reusable);

    asio::any_io_executor executor_;
    const options& options_;
    tls::reloader* tls_;
    std::deque<std::unique_ptr<vault_connection>> idle_;
    std::size_t open_ = 0;
    net::event slot_freed_;
    std::size_t waiters_ = 0;
    std::array<std::uint64_t, 6> by_class_{};
    std::uint64_t unreachable_ = 0;
    std::uint64_t tunnels_ = 0;
};

}  // namespace taser::bridge
