// SPDX-License-Identifier: Apache-2.0
// State that the broker's listeners share: options, connected bridges, counters.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ssl/context.hpp>

#include "taser/broker/broker.hpp"
#include "taser/metrics/metrics.hpp"
#include "taser/net/event.hpp"
#include "taser/tls/reloader.hpp"

#include "bridge_pool.hpp"

namespace taser::broker {

struct counters {
    std::array<std::uint64_t, 6> responses_by_class{};  // index 1..5 for 1xx..5xx
    std::uint64_t requests_total = 0;
    std::uint64_t requests_no_bridge = 0;
    std::uint64_t client_connections_total = 0;
    std::uint64_t client_rejected_total = 0;
    std::uint64_t bridge_connections_total = 0;
    std::uint64_t bridge_rejected_total = 0;
    std::uint64_t tunnels_total = 0;  // CONNECT and passthrough connections carried
    std::uint64_t tunnel_bytes_up = 0;
    std::uint64_t tunnel_bytes_down = 0;
    std::uint64_t bytes_from_clients = 0;
    std::uint64_t bytes_to_clients = 0;
    std::map<std::string, std::uint64_t, std::less<>> bridge_rejected_by_reason;
    metrics::histogram request_duration;
};

// A client connection as the drain on SIGTERM sees it.
struct client_entry {
    bool busy = false;            // an exchange is running
    std::function<void()> close;  // closes the socket at once
};

struct state {
    state(asio::io_context& io_context, const options& o)
        : io(io_context),
          opt(o),
          pool(io_context.get_executor()),
          clients_idle(io.get_executor()) {}

    std::uint64_t next_conn_id() noexcept { return next_conn++; }

    asio::io_context& io;
    const options& opt;
    bridge_pool pool;
    std::unique_ptr<tls::reloader> client_tls;  // null when the client edge has no TLS
    std::unique_ptr<tls::reloader> bridge_tls;
    frame::instance_id instance{};
    std::string instance_hex;

    std::uint64_t next_conn = 1;
    bool draining = false;
    std::size_t handshakes_in_progress = 0;
    std::map<std::uint64_t, client_entry> clients;
    std::map<std::uint64_t, std::string> session_pins;  // bridge conn id to its key pin
    net::event clients_idle;                            // notified when a client connection ends
    counters stats;
};

// Returns the broker's metrics in Prometheus text format.
std::string render_metrics(const state& st);

// Accepts and serves Vault API clients on a client port until the acceptor closes.
asio::awaitable<void> accept_clients(state& st, asio::ip::tcp::acceptor& acceptor,
                                     client_edge edge);

// Accepts bridges on the bridge port until the acceptor closes.
asio::awaitable<void> accept_bridges(state& st, asio::ip::tcp::acceptor& acceptor);

}  // namespace taser::broker
