// SPDX-License-Identifier: Apache-2.0
// taser bridge: dials brokers and replays the requests they carry against the local vault.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "taser/config/parse.hpp"
#include "taser/frame/frame.hpp"
#include "taser/tls/context.hpp"

namespace taser::bridge {

using namespace std::chrono_literals;

struct options {
    std::vector<config::host_port> brokers;
    std::string server_name;  // the name the broker's certificate must carry; default: its host
    std::string client_cert;
    std::string client_key;
    std::string ca_cert;
    std::vector<std::string> broker_pins;
    tls::min_version tls_min = tls::min_version::tls1_3;

    config::url vault{"http", {"127.0.0.1", 8200, false}};
    std::string vault_ca;
    // Accept byte tunnels (CONNECT and passthrough), always to the vault address.
    bool allow_tunnels = false;
    std::size_t vault_max_connections = 128;
    std::size_t vault_max_idle = 128;
    std::chrono::milliseconds vault_idle_timeout = 30s;
    std::chrono::milliseconds request_timeout = 120s;
    std::chrono::milliseconds tunnel_idle_timeout = 300s;
    std::chrono::milliseconds connect_timeout = 5s;

    frame::settings settings;
    std::chrono::milliseconds keepalive_interval = 15s;
    std::chrono::milliseconds keepalive_timeout = 10s;
    std::chrono::milliseconds handshake_timeout = 10s;
    std::chrono::milliseconds reconnect_min = 100ms;
    std::chrono::milliseconds reconnect_max = 5s;
    std::string instance_name;

    std::chrono::milliseconds drain_timeout = 30s;
    std::chrono::milliseconds cert_reload_interval = 10s;

    // Admin listener (/healthz, /readyz, /metrics); off unless set, loopback unless allowed.
    std::optional<config::host_port> admin_listen;
    bool admin_allow_remote = false;
};

int main(int argc, char** argv);
int run(const options& o);

}  // namespace taser::bridge
