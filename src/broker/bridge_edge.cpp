// SPDX-License-Identifier: Apache-2.0
// The broker's bridge edge: the one port that faces the internet. Mutual TLS with a deadline
// and a cap on handshakes in progress; nothing of the tunnel protocol is read before the
// certificate passed every check.
#include <algorithm>

#include <boost/asio/ssl.hpp>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>

#include "taser/log/log.hpp"
#include "taser/mux/transport.hpp"
#include "taser/net/deadlines.hpp"
#include "taser/net/lifecycle.hpp"
#include "taser/net/listen.hpp"
#include "taser/net/spawn.hpp"
#include "taser/tls/tunnel_stream.hpp"

#include "state.hpp"

namespace taser::broker {
namespace {

using tcp = asio::ip::tcp;
using asio::as_tuple;
using asio::use_awaitable;
using tls_stream = tls::tunnel_stream;

void reject(state& st, std::string_view peer, std::string_view reason, std::string_view detail) {
    ++st.stats.bridge_rejected_total;
    auto it = st.stats.bridge_rejected_by_reason.find(reason);
    if (it == st.stats.bridge_rejected_by_reason.end()) {
        it = st.stats.bridge_rejected_by_reason.emplace(std::string(reason), 0).first;
    }
    ++it->second;
    log::write_limited(log::level::warn, "bridge_rejected",
                       {{"peer", peer}, {"reason", reason}, {"error", detail}});
}

// A bridge that comes back with the same identity replaces its old session, so that no new
// stream is routed into a connection that may be dead without anyone knowing yet. The old
// session is asked first: if it still answers a PING, both are live copies of one bridge, and
// the newcomer is the one sent away, so that two such bridges do not evict each other in a
// loop. The instance id alone is only a claim: the key must match too.
asio::awaitable<void> replace_older_sessions(state& st, std::shared_ptr<mux::session> newcomer,
                                             std::vector<std::shared_ptr<mux::session>> older,
                                             std::string pin) {
    for (const auto& old : older) {
        auto old_pin = st.session_pins.find(old->id());
        if (old->peer_hello().instance != newcomer->peer_hello().instance ||
            old_pin == st.session_pins.end() || old_pin->second != pin || old->draining()) {
            continue;
        }
        if (co_await old->probe(std::chrono::seconds(1))) {
            log::info("bridge_duplicate_refused",
                      {{"conn", newcomer->id()}, {"live_conn", old->id()}});
            newcomer->goaway(errc::no_error, "a live session of this bridge exists");
        } else {
            // GOAWAY, not a close: streams still running on the old session finish, or fail at
            // its keepalive if it is dead.
            log::info("bridge_replaced", {{"conn", old->id()}, {"by_conn", newcomer->id()}});
            old->goaway(errc::no_error, "replaced by a newer session of the same bridge");
        }
    }
}

asio::awaitable<void> serve_bridge(state& st, tcp::socket socket) {
    error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    mux::limit_unsent(socket);
    auto peer = net::format_endpoint(socket.remote_endpoint(ignored));
    auto conn = st.next_conn_id();

    auto tls_context = st.bridge_tls->current();  // the files in force at connect time
    auto stream = std::make_unique<tls_stream>(std::move(socket), *tls_context);
    auto* raw = stream.get();
    auto timers = std::make_shared<net::deadlines>(st.io.get_executor(), [raw] {
        error_code e;
        raw->lowest_layer().close(e);
    });
    timers->start();
    timers->arm(net::deadlines::read, st.opt.handshake_timeout);
    ++st.handshakes_in_progress;
    auto ec = co_await stream->handshake(tls_stream::side::server);
    --st.handshakes_in_progress;
    timers->disarm(net::deadlines::read);
    if (ec) {
        timers->stop();
        reject(st, peer, timers->expired() ? "handshake timeout" : "handshake failed",
               timers->expired() ? "no completed TLS handshake within the deadline"
                                 : tls::describe_handshake_failure(stream->native_handle(), ec));
        co_return;
    }

    X509* cert = SSL_get0_peer_certificate(stream->native_handle());
    auto pin = cert ? tls::spki_pin(cert) : std::string();
    if (!st.opt.bridge_pins.empty()) {
        auto& pins = st.opt.bridge_pins;
        if (std::find(pins.begin(), pins.end(), pin) == pins.end()) {
            timers->stop();
            reject(st, peer, "pin mismatch",
                   "certificate " + tls::describe_certificate(cert) + " has pin " + pin +
                       ", which is not among --bridge-pin");
            co_return;
        }
    }
    if (tls::negotiated_alpn(stream->native_handle()) != frame::alpn_id) {
        timers->stop();
        reject(st, peer, "alpn mismatch", "bridge did not offer " + std::string(frame::alpn_id));
        co_return;
    }
    timers->stop();
    auto subject = tls::describe_certificate(cert);

    mux::session_options so;
    so.role = frame::role::broker;
    so.instance = st.instance;
    so.local = st.opt.settings;
    so.local.replicas = st.opt.replicas;
    so.hello_timeout = st.opt.handshake_timeout;
    so.keepalive_interval = st.opt.keepalive_interval;
    so.keepalive_timeout = st.opt.keepalive_timeout;
    auto session =
        std::make_shared<mux::session>(std::move(stream), st.io.get_executor(), so, conn);

    if (auto hec = co_await session->handshake()) {
        reject(st, peer, "tunnel handshake failed", hec.message());
        co_return;
    }
    if (st.draining) {
        session->goaway(errc::no_error, "broker is shutting down");
    }
    ++st.stats.bridge_connections_total;
    auto started = std::chrono::steady_clock::now();
    log::info("bridge_connected", {{"conn", conn},
                                   {"peer", peer},
                                   {"instance", net::to_hex(session->peer_hello().instance)},
                                   {"certificate", subject}});
    // The newcomer joins the pool at once, so that new streams go to it while older sessions
    // of the same bridge are checked (which takes up to a second) beside its run().
    auto sessions = st.pool.sessions();
    st.session_pins[conn] = pin;
    st.pool.add(session);
    net::spawn(st.io.get_executor(), replace_older_sessions(st, session, std::move(sessions), pin),
               "replace_older_sessions");
    auto reason = co_await session->run();
    st.pool.remove(session);
    st.session_pins.erase(conn);
    auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started);
    log::info("bridge_disconnected", {{"conn", conn},
                                      {"peer", peer},
                                      {"reason", reason ? reason.message() : "closed"},
                                      {"duration_s", seconds.count()},
                                      {"bytes_sent", session->bytes_sent()},
                                      {"bytes_received", session->bytes_received()}});
}

}  // namespace

asio::awaitable<void> accept_bridges(state& st, tcp::acceptor& acceptor) {
    for (;;) {
        auto accepted = co_await net::accept_next(acceptor, "bridge");
        if (!accepted) {
            co_return;
        }
        auto socket = std::move(*accepted);
        // Both caps are checked before any TLS work, so that a flood costs one accept each.
        if (st.handshakes_in_progress >= st.opt.max_handshakes) {
            error_code ignored;
            reject(st, net::format_endpoint(socket.remote_endpoint(ignored)), "too many handshakes",
                   "limit " + std::to_string(st.opt.max_handshakes));
            continue;
        }
        if (st.pool.size() >= st.opt.max_bridges) {
            error_code ignored;
            reject(st, net::format_endpoint(socket.remote_endpoint(ignored)), "too many bridges",
                   "limit " + std::to_string(st.opt.max_bridges));
            continue;
        }
        net::spawn(st.io.get_executor(), serve_bridge(st, std::move(socket)), "bridge_connection");
    }
}

}  // namespace taser::broker
