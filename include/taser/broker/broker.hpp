// SPDX-License-Identifier: Apache-2.0
// taser broker: accepts bridges on the bridge port and Vault API clients on the client port.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "taser/config/parse.hpp"
#include "taser/frame/frame.hpp"
#include "taser/tls/context.hpp"

namespace taser::broker {

using namespace std::chrono_literals;

// What the broker does with a client connection.
enum class client_edge {
    http,         // terminate TLS (or plain HTTP), parse each request, one stream per request
    passthrough,  // carry the connection's bytes as one stream to the vault's TLS listener
};

struct options {
    // Client edge.
    config::host_port listen{"0.0.0.0", 8443, false};
    client_edge edge = client_edge::http;
    // A second client listener in passthrough mode, beside an http --listen.
    std::optional<config::host_port> passthrough_listen;
    // Authorities that CONNECT may name (http mode); CONNECT is rejected when empty.
    std::vector<config::host_port> connect_authorities;
    std::string tls_cert;
    std::string tls_key;
    std::string client_ca;  // when set, pods must present a certificate from this CA
    bool plaintext = false;
    std::chrono::milliseconds bridge_wait = 5s;
    std::chrono::milliseconds request_timeout = 120s;
    std::chrono::milliseconds idle_timeout = 60s;
    // A byte tunnel carries a whole client connection, long polls and idle keep-alive time
    // included, so its idle limit is longer than a request's.
    std::chrono::milliseconds tunnel_idle_timeout = 300s;
    std::chrono::milliseconds header_timeout = 10s;
    std::uint64_t max_header_bytes = 64 * 1024;
    std::uint64_t max_body_bytes = 128ull * 1024 * 1024;
    std::size_t max_client_connections = 10000;

    // Bridge edge.
    config::host_port bridge_listen{"0.0.0.0", 8444, false};
    std::string bridge_cert;
    std::string bridge_key;
    std::string bridge_ca;
    std::vector<std::string> bridge_pins;
    tls::min_version tls_min = tls::min_version::tls1_3;
    std::chrono::milliseconds handshake_timeout = 10s;
    std::size_t max_handshakes = 64;
    std::size_t max_bridges = 64;

    // Tunnel.
    frame::settings settings;
    std::chrono::milliseconds keepalive_interval = 15s;
    std::chrono::milliseconds keepalive_timeout = 10s;
    std::string instance_name;  // empty: random
    std::uint32_t replicas = 1;

    std::chrono::milliseconds drain_timeout = 30s;
    std::chrono::milliseconds cert_reload_interval = 10s;

    // Admin listener (/healthz, /readyz, /metrics); none when empty.
    std::optional<config::host_port> admin_listen = config::host_port{"0.0.0.0", 9090, false};
};

// Parses the broker's command line, environment and config file, then runs until SIGTERM.
// Returns the process exit code.
int main(int argc, char** argv);

// Runs a broker with parsed options until SIGTERM or SIGINT; returns the exit code.
int run(const options& o);

}  // namespace taser::broker
