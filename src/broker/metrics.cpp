// SPDX-License-Identifier: Apache-2.0
// The broker's metrics in Prometheus text format (docs/operations.md lists them).
#include "taser/net/listen.hpp"

#include "state.hpp"

namespace taser::broker {

std::string render_metrics(const state& st) {
    using metrics::write_header;
    using metrics::write_sample;
    const auto& s = st.stats;
    std::string out;
    out.reserve(4096);

    write_header(out, "taser_bridges_connected", "gauge", "Bridge sessions connected now.");
    write_sample(out, "taser_bridges_connected", "", std::uint64_t{st.pool.size()});
    write_header(out, "taser_bridges_ready", "gauge",
                 "Bridge sessions that take new streams (connected and not draining).");
    write_sample(out, "taser_bridges_ready", "", std::uint64_t{st.pool.ready_count()});

    std::uint64_t streams = 0;
    for (const auto& session : st.pool.sessions()) {
        streams += session->open_streams();
    }
    write_header(out, "taser_streams_open", "gauge", "Streams open on all bridge sessions.");
    write_sample(out, "taser_streams_open", "", streams);

    write_header(out, "taser_tunnel_rtt_seconds", "gauge",
                 "Round-trip time of the last PING on each bridge session.");
    for (const auto& session : st.pool.sessions()) {
        if (auto rtt = session->rtt()) {
            auto labels = "bridge=\"" + net::to_hex(session->peer_hello().instance) + "\",conn=\"" +
                          std::to_string(session->id()) + "\"";
            write_sample(out, "taser_tunnel_rtt_seconds", labels,
                         std::chrono::duration<double>(*rtt).count());
        }
    }

    write_header(out, "taser_bridge_connections_total", "counter",
                 "Bridge sessions established since start.");
    write_sample(out, "taser_bridge_connections_total", "", s.bridge_connections_total);
    write_header(out, "taser_bridge_rejected_total", "counter",
                 "Bridge connections rejected, by reason.");
    for (const auto& [reason, count] : s.bridge_rejected_by_reason) {
        write_sample(out, "taser_bridge_rejected_total", "reason=\"" + reason + "\"", count);
    }

    write_header(out, "taser_client_connections_open", "gauge", "Client connections open now.");
    write_sample(out, "taser_client_connections_open", "", std::uint64_t{st.clients.size()});
    write_header(out, "taser_client_connections_total", "counter",
                 "Client connections accepted since start.");
    write_sample(out, "taser_client_connections_total", "", s.client_connections_total);
    write_header(out, "taser_client_rejected_total", "counter",
                 "Client connections closed at accept or at the TLS handshake.");
    write_sample(out, "taser_client_rejected_total", "", s.client_rejected_total);

    write_header(out, "taser_requests_total", "counter", "Requests received from clients.");
    write_sample(out, "taser_requests_total", "", s.requests_total);
    write_header(out, "taser_requests_no_bridge_total", "counter",
                 "Requests answered 503 because no bridge was connected.");
    write_sample(out, "taser_requests_no_bridge_total", "", s.requests_no_bridge);
    write_header(out, "taser_responses_total", "counter", "Responses sent, by status class.");
    for (std::size_t c = 1; c <= 5; ++c) {
        write_sample(out, "taser_responses_total", "class=\"" + std::to_string(c) + "xx\"",
                     s.responses_by_class[c]);
    }
    write_header(out, "taser_client_bytes_total", "counter",
                 "Bytes read from and written to clients.");
    write_sample(out, "taser_client_bytes_total", "direction=\"in\"", s.bytes_from_clients);
    write_sample(out, "taser_client_bytes_total", "direction=\"out\"", s.bytes_to_clients);

    write_header(out, "taser_tunnels_total", "counter",
                 "Byte tunnels carried (passthrough connections and CONNECT).");
    write_sample(out, "taser_tunnels_total", "", s.tunnels_total);
    write_header(out, "taser_tunnel_bytes_total", "counter",
                 "Bytes carried by byte tunnels, towards the vault (up) and back (down).");
    write_sample(out, "taser_tunnel_bytes_total", "direction=\"up\"", s.tunnel_bytes_up);
    write_sample(out, "taser_tunnel_bytes_total", "direction=\"down\"", s.tunnel_bytes_down);

    s.request_duration.write(out, "taser_request_duration_seconds",
                             "Time from a request's header to the end of its response.");
    return out;
}

}  // namespace taser::broker
