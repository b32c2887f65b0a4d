// SPDX-License-Identifier: Apache-2.0
// taser bridge: options, the dial loop to each broker, and the drain on SIGTERM.
#include "taser/bridge/bridge.hpp"

#include <algorithm>
#include <iostream>
#include <map>
#include <random>

#include <boost/asio/connect.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/ssl.hpp>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>

#include "taser/admin/admin.hpp"
#include "taser/config/cli.hpp"
#include "taser/log/log.hpp"
#include "taser/metrics/metrics.hpp"
#include "taser/mux/transport.hpp"
#include "taser/net/deadlines.hpp"
#include "taser/net/lifecycle.hpp"
#include "taser/net/listen.hpp"
#include "taser/net/spawn.hpp"
#include "taser/tls/reloader.hpp"
#include "taser/tls/tunnel_stream.hpp"
#include "taser/version.hpp"

#include "vault_client.hpp"

namespace taser::bridge {
namespace {

namespace po = boost::program_options;
using tcp = asio::ip::tcp;
using asio::as_tuple;
using asio::use_awaitable;
using tls_stream = tls::tunnel_stream;

constexpr std::string_view usage =
    "Usage: taser bridge --broker-address HOST:PORT [options]\n\n"
    "Dials each broker over mutual TLS, keeps the connection open, and replays the requests\n"
    "it carries against --vault-address. Opens no listening port.";

// A session that lasted this long counts as stable: the next failure starts the backoff anew.
constexpr auto stable_session = std::chrono::seconds(10);

struct bridge_state {
    bridge_state(asio::io_context& io_context, const options& o, tls::reloader* vault_tls)
        : io(io_context), opt(o), vault(io_context.get_executor(), o, vault_tls) {}

    asio::io_context& io;
    const options& opt;
    vault_client vault;
    std::unique_ptr<tls::reloader> broker_tls;
    frame::instance_id instance{};
    std::uint64_t next_conn = 1;
    bool draining = false;
    std::vector<std::shared_ptr<mux::session>> sessions;
    std::map<std::string, std::size_t> sessions_per_broker;  // by --broker-address
    std::uint64_t connect_attempts = 0;
    std::uint64_t connect_failures = 0;
    std::mt19937_64 random{std::random_device{}()};
};

std::string render_metrics(const bridge_state& st) {
    using metrics::write_header;
    using metrics::write_sample;
    std::string out;
    write_header(out, "taser_brokers_connected", "gauge", "Broker sessions connected now.");
    write_sample(out, "taser_brokers_connected", "", std::uint64_t{st.sessions.size()});
    write_header(out, "taser_connect_attempts_total", "counter", "Dial attempts to brokers.");
    write_sample(out, "taser_connect_attempts_total", "", st.connect_attempts);
    write_header(out, "taser_connect_failures_total", "counter",
                 "Dial attempts that ended before a session was established.");
    write_sample(out, "taser_connect_failures_total", "", st.connect_failures);
    std::uint64_t streams = 0;
    for (const auto& s : st.sessions) {
        streams += s->open_streams();
    }
    write_header(out, "taser_streams_open", "gauge", "Streams open on all broker sessions.");
    write_sample(out, "taser_streams_open", "", streams);
    write_header(out, "taser_tunnel_rtt_seconds", "gauge",
                 "Round-trip time of the last PING on each broker session.");
    for (const auto& s : st.sessions) {
        if (auto rtt = s->rtt()) {
            write_sample(out, "taser_tunnel_rtt_seconds",
                         "broker=\"" + net::to_hex(s->peer_hello().instance) + "\"",
                         std::chrono::duration<double>(*rtt).count());
        }
    }
    write_header(out, "taser_vault_connections_open", "gauge", "Connections to the vault now.");
    write_sample(out, "taser_vault_connections_open", "",
                 std::uint64_t{st.vault.open_connections()});
    write_header(out, "taser_vault_responses_total", "counter",
                 "Responses from the vault, by status class.");
    for (std::size_t c = 1; c <= 5; ++c) {
        write_sample(out, "taser_vault_responses_total", "class=\"" + std::to_string(c) + "xx\"",
                     st.vault.responses_by_class()[c]);
    }
    write_header(out, "taser_tunnels_total", "counter", "Byte tunnels connected to the vault.");
    write_sample(out, "taser_tunnels_total", "", st.vault.tunnels());
    write_header(out, "taser_vault_unreachable_total", "counter",
                 "Requests answered 503 because the vault could not be reached.");
    write_sample(out, "taser_vault_unreachable_total", "", st.vault.vault_unreachable());
    return out;
}

po::options_description describe() {
    po::options_description desc("taser bridge options");
    auto s = [](const char* v) { return po::value<std::string>()->default_value(v); };
    // clang-format off
    desc.add_options()
        ("broker-address", po::value<std::vector<std::string>>(),
         "HOST:PORT of a broker's bridge port (repeatable: one vault may serve several clusters)")
        ("server-name", po::value<std::string>(),
         "name the broker's certificate must carry (default: the host of --broker-address)")
        ("client-cert", po::value<std::string>(), "client certificate chain (PEM) of this bridge")
        ("client-key", po::value<std::string>(), "private key (PEM) of this bridge")
        ("ca-cert", po::value<std::string>(), "CA bundle (PEM) that the broker's certificate "
                                              "must chain to")
        ("broker-pin", po::value<std::vector<std::string>>(),
         "accept only a broker certificate with this key pin, sha256//BASE64 (repeatable)")
        ("tls-min-version", s("1.3"), "minimum TLS version towards brokers: 1.3 or 1.2")
        ("vault-address", s("http://127.0.0.1:8200"),
         "the vault's API address; the only place the bridge sends requests")
        ("vault-ca", po::value<std::string>(), "CA bundle (PEM) of the vault's certificate, for "
                                               "an https vault address")
        ("allow-tunnels", po::bool_switch(),
         "accept byte tunnels (a broker's passthrough edge and CONNECT); each one connects to "
         "the host and port of --vault-address and nowhere else")
        ("allow-connect", po::bool_switch(), "the same as --allow-tunnels")
        ("vault-max-connections", s("128"),
         "connections to the vault at once; further requests wait for one")
        ("vault-max-idle", s("128"),
         "idle keep-alive connections kept to the vault")
        ("request-timeout", s("120s"),
         "time the vault has to answer a request, and that a request may wait for a free "
         "connection to the vault (duration)")
        ("tunnel-idle-timeout", s("300s"),
         "how long a byte tunnel may move no byte before it is closed (duration)")
        ("connect-timeout", s("5s"), "time to connect to a broker or the vault (duration)")
        ("handshake-timeout", s("10s"), "time for the TLS and tunnel handshake (duration)")
        ("keepalive-interval", s("15s"),
         "time between tunnel PINGs; a dead path is detected within about interval + "
         "timeout (duration)")
        ("keepalive-timeout", s("10s"),
         "time a PING may go unanswered before the tunnel is declared dead (duration)")
        ("reconnect-min", s("100ms"), "first delay before dialling again (duration)")
        ("reconnect-max", s("5s"), "longest delay between dial attempts (duration)")
        ("max-frame-payload", s("64KiB"), "largest frame payload the broker may send (size)")
        ("max-header-block", s("64KiB"),
         "largest request head the broker may send, from 1KiB up to --max-frame-payload; each "
         "open stream keeps its head in memory (size)")
        ("stream-window", s("4MiB"), "flow-control window of each stream (size)")
        ("connection-window", s("32MiB"), "flow-control window of each tunnel (size)")
        ("max-streams", s("16384"),
         "streams open at once on one tunnel")
        ("instance-id", s(""), "name of this bridge (default: random)")
        ("drain-timeout", s("30s"),
         "after SIGTERM, how long running requests may take to finish (duration)")
        ("cert-reload-interval", s("10s"),
         "how often certificate, key and CA files are checked for changes (duration); SIGHUP "
         "reloads them at once")
        ("admin-listen", s("off"),
         "HOST:PORT for /healthz, /readyz and /metrics, on a loopback address unless "
         "--admin-allow-remote; 'off' disables it")
        ("admin-allow-remote", po::bool_switch(),
         "allow --admin-listen on an address other than loopback");
    // clang-format on
    config::add_common_options(desc);
    return desc;
}

options to_options(const po::variables_map& vm) {
    options o;
    auto str = [&](const char* name) { return vm[name].as<std::string>(); };
    auto duration = [&](const char* name) { return config::parse_duration(name, str(name)); };
    if (!vm.count("broker-address")) {
        throw config::invalid_value("--broker-address is required");
    }
    for (const auto& a : vm["broker-address"].as<std::vector<std::string>>()) {
        o.brokers.push_back(config::parse_host_port("broker-address", a));
    }
    o.server_name = config::optional_string(vm, "server-name");
    o.client_cert = config::optional_string(vm, "client-cert");
    o.client_key = config::optional_string(vm, "client-key");
    o.ca_cert = config::optional_string(vm, "ca-cert");
    if (o.client_cert.empty() || o.client_key.empty() || o.ca_cert.empty()) {
        throw config::invalid_value(
            "the bridge needs --client-cert, --client-key and --ca-cert (mutual TLS)");
    }
    o.broker_pins = config::parse_pins(vm, "broker-pin");
    o.tls_min = tls::parse_min_version("tls-min-version", str("tls-min-version"));
    o.vault = config::parse_url("vault-address", str("vault-address"));
    o.vault_ca = config::optional_string(vm, "vault-ca");
    if (!o.vault_ca.empty() && o.vault.scheme != "https") {
        throw config::invalid_value("--vault-ca is only used with an https --vault-address");
    }
    o.allow_tunnels = vm["allow-tunnels"].as<bool>() || vm["allow-connect"].as<bool>();
    o.vault_max_connections = static_cast<decltype(o.vault_max_connections)>(
        config::parse_count("vault-max-connections", str("vault-max-connections"), 1, 100000));
    o.vault_max_idle = static_cast<decltype(o.vault_max_idle)>(
        config::parse_count("vault-max-idle", str("vault-max-idle"), 0, 100000));
    o.request_timeout = duration("request-timeout");
    o.tunnel_idle_timeout = duration("tunnel-idle-timeout");
    o.connect_timeout = duration("connect-timeout");
    o.handshake_timeout = duration("handshake-timeout");
    o.keepalive_interval = duration("keepalive-interval");
    o.keepalive_timeout = duration("keepalive-timeout");
    o.reconnect_min = duration("reconnect-min");
    o.reconnect_max = duration("reconnect-max");
    if (o.reconnect_min.count() <= 0 || o.reconnect_max < o.reconnect_min) {
        throw config::invalid_value(
            "--reconnect-min must be above zero and at most --reconnect-max");
    }
    o.settings.max_frame_payload = config::parse_frame_payload(vm);
    o.settings.initial_stream_window = config::parse_window(vm, "stream-window");
    o.settings.initial_connection_window = config::parse_window(vm, "connection-window");
    o.settings.max_concurrent_streams = static_cast<decltype(o.settings.max_concurrent_streams)>(
        config::parse_count("max-streams", str("max-streams"), 1, 1000000));
    auto header_block = config::parse_size("max-header-block", str("max-header-block"));
    if (header_block < 1024 || header_block > o.settings.max_frame_payload) {
        throw config::invalid_value(
            "invalid value for --max-header-block: expected a size from 1KiB to "
            "--max-frame-payload");
    }
    o.settings.max_header_block = static_cast<std::uint32_t>(header_block);
    o.instance_name = str("instance-id");
    o.drain_timeout = duration("drain-timeout");
    o.admin_allow_remote = vm["admin-allow-remote"].as<bool>();
    o.cert_reload_interval = duration("cert-reload-interval");
    if (o.cert_reload_interval.count() <= 0) {
        throw config::invalid_value("--cert-reload-interval must be above zero");
    }
    if (auto admin = str("admin-listen"); admin != "off" && !admin.empty()) {
        o.admin_listen = config::parse_host_port("admin-listen", admin);
        boost::system::error_code ec;
        auto address = asio::ip::make_address(o.admin_listen->host, ec);
        bool loopback = o.admin_listen->host == "localhost" || (!ec && address.is_loopback());
        if (!loopback && !o.admin_allow_remote) {
            throw config::invalid_value("--admin-listen " + admin +
                                        " is not a loopback address; the bridge opens no "
                                        "other port unless --admin-allow-remote is given");
        }
    }
    return o;
}

// The sessions to one --broker-address. Behind one address a load balancer may spread
// connections over several broker replicas; the bridge keeps one session to each distinct
// replica (told apart by the instance id in their HELLO), as many as the brokers announce.
struct broker_group {
    broker_group(const asio::any_io_executor& ex, config::host_port a, std::chrono::milliseconds b)
        : address(std::move(a)), backoff(b), changed(ex) {}

    config::host_port address;
    std::vector<std::shared_ptr<mux::session>> sessions;
    std::uint32_t wanted = 1;
    std::chrono::milliseconds backoff;
    std::chrono::milliseconds delay{0};  // wait before the next dial
    net::event changed;

    std::size_t live() const {
        return static_cast<std::size_t>(std::count_if(
            sessions.begin(), sessions.end(), [](const auto& s) { return !s->draining(); }));
    }
};

// Schedules the next dial after a failure or a short-lived session: a uniform delay in
// [0, backoff] (full jitter), so that bridges that lost the same broker spread their dials.
void back_off(bridge_state& st, broker_group& g) {
    std::uniform_int_distribution<std::int64_t> pick(0, g.backoff.count());
    g.delay = std::chrono::milliseconds(pick(st.random));
    g.backoff = std::min(g.backoff * 2, st.opt.reconnect_max);
    log::debug("reconnect_scheduled",
               {{"broker", g.address.to_string()}, {"delay_ms", g.delay.count()}});
}

// Dials the broker once and runs the TLS and tunnel handshakes. Returns the session, or null
// after logging why none came up.
asio::awaitable<std::shared_ptr<mux::session>> establish(bridge_state& st,
                                                         const config::host_port& broker) {
    auto conn = st.next_conn++;
    auto address = broker.to_string();
    ++st.connect_attempts;
    auto fail = [&](std::string_view stage, std::string_view error) {
        ++st.connect_failures;
        log::write_limited(
            log::level::warn, "connect_failed",
            {{"conn", conn}, {"broker", address}, {"stage", stage}, {"error", error}});
    };

    // The name is resolved again on every attempt, so that a moved broker is found.
    tcp::resolver resolver(st.io.get_executor());
    auto [rec, endpoints] = co_await resolver.async_resolve(
        broker.host, std::to_string(broker.port), as_tuple(use_awaitable));
    if (rec) {
        fail("resolve", rec.message());
        co_return nullptr;
    }

    auto tls_context = st.broker_tls->current();  // the files in force at dial time
    auto stream = std::make_unique<tls_stream>(st.io.get_executor(), *tls_context);
    auto* raw = stream.get();
    auto timers = std::make_shared<net::deadlines>(st.io.get_executor(), [raw] {
        error_code e;
        raw->lowest_layer().close(e);
    });
    timers->start();
    timers->arm(net::deadlines::write, st.opt.connect_timeout);
    auto [cec, endpoint] =
        co_await asio::async_connect(stream->lowest_layer(), endpoints, as_tuple(use_awaitable));
    timers->disarm(net::deadlines::write);
    if (cec) {
        timers->stop();
        fail("connect", timers->expired() ? "timed out" : cec.message());
        co_return nullptr;
    }
    error_code ignored;
    stream->lowest_layer().set_option(tcp::no_delay(true), ignored);
    mux::limit_unsent(stream->lowest_layer());

    auto name = st.opt.server_name.empty() ? broker.host : st.opt.server_name;
    tls::prepare_client_stream(stream->native_handle(), name);
    timers->arm(net::deadlines::read, st.opt.handshake_timeout);
    auto hec = co_await stream->handshake(tls_stream::side::client);
    timers->disarm(net::deadlines::read);
    timers->stop();
    if (hec) {
        fail("tls", timers->expired()
                        ? "handshake timed out"
                        : tls::describe_handshake_failure(stream->native_handle(), hec));
        co_return nullptr;
    }
    X509* cert = SSL_get0_peer_certificate(stream->native_handle());
    if (!st.opt.broker_pins.empty()) {
        auto pin = cert ? tls::spki_pin(cert) : std::string();
        const auto& pins = st.opt.broker_pins;
        if (std::find(pins.begin(), pins.end(), pin) == pins.end()) {
            // A pin mismatch is not a network fault: it is logged as an error, every time.
            ++st.connect_failures;
            log::error("broker_pin_mismatch", {{"conn", conn},
                                               {"broker", address},
                                               {"pin", pin},
                                               {"certificate", tls::describe_certificate(cert)}});
            co_return nullptr;
        }
    }
    if (tls::negotiated_alpn(stream->native_handle()) != frame::alpn_id) {
        fail("tls", "broker did not select ALPN " + std::string(frame::alpn_id));
        co_return nullptr;
    }
    auto subject = tls::describe_certificate(cert);

    mux::session_options so;
    so.role = frame::role::bridge;
    so.instance = st.instance;
    so.local = st.opt.settings;
    so.hello_timeout = st.opt.handshake_timeout;
    so.keepalive_interval = st.opt.keepalive_interval;
    so.keepalive_timeout = st.opt.keepalive_timeout;
    auto session =
        std::make_shared<mux::session>(std::move(stream), st.io.get_executor(), so, conn);
    if (auto sec = co_await session->handshake()) {
        fail("tunnel", sec.message());
        co_return nullptr;
    }
    log::info("broker_connected", {{"conn", conn},
                                   {"broker", address},
                                   {"instance", net::to_hex(session->peer_hello().instance)},
                                   {"replicas", session->peer_hello().settings.replicas},
                                   {"certificate", subject}});
    co_return session;
}

// Runs one established session until it ends, then lets the group dial again.
asio::awaitable<void> serve_session(bridge_state& st, broker_group& g,
                                    std::shared_ptr<mux::session> session) {
    auto address = g.address.to_string();
    session->on_stream = [&st](std::shared_ptr<mux::stream> s) {
        net::spawn(st.io.get_executor(), st.vault.serve(std::move(s)), "vault_request");
    };
    // A broker that drains sends GOAWAY: dial a replacement now, while this session finishes
    // its running streams.
    // The draining session itself ends once its last stream is done.
    auto started_at = std::chrono::steady_clock::now();
    session->on_goaway = [&st, &g, weak = std::weak_ptr<mux::session>(session), started_at] {
        // A session drained soon after it began (another bridge with this identity took its
        // place, say) makes the next dial wait its backoff, so two such bridges do not evict
        // each other in a tight loop.
        if (std::chrono::steady_clock::now() - started_at < stable_session) {
            back_off(st, g);
        }
        g.changed.notify();
        if (auto s = weak.lock()) {
            net::spawn(
                st.io.get_executor(),
                [s]() -> asio::awaitable<void> {
                    co_await s->wait_idle();
                    s->close(make_error_code(errc::no_error));
                },
                "close_drained_session");
        }
    };
    if (st.draining) {
        session->goaway(errc::no_error, "bridge is shutting down");
    }
    st.sessions.push_back(session);
    ++st.sessions_per_broker[address];
    auto started = std::chrono::steady_clock::now();
    auto reason = co_await session->run();
    auto lasted = std::chrono::steady_clock::now() - started;
    --st.sessions_per_broker[address];
    std::erase(st.sessions, session);
    std::erase(g.sessions, session);
    log::info("broker_disconnected", {{"conn", session->id()},
                                      {"broker", address},
                                      {"reason", reason ? reason.message() : "closed"},
                                      {"duration_s", std::chrono::duration<double>(lasted).count()},
                                      {"bytes_sent", session->bytes_sent()},
                                      {"bytes_received", session->bytes_received()}});
    if (lasted >= stable_session) {
        g.backoff = st.opt.reconnect_min;
    }
    back_off(st, g);
    g.changed.notify();
}

// Keeps the sessions of one --broker-address up for as long as the process runs.
asio::awaitable<void> keep_connected(bridge_state& st, config::host_port broker) {
    broker_group g(st.io.get_executor(), broker, st.opt.reconnect_min);
    while (!st.draining) {
        if (g.live() >= g.wanted) {
            co_await g.changed.wait();
            continue;
        }
        if (g.delay.count() > 0) {
            auto delay = g.delay;
            g.delay = std::chrono::milliseconds(0);
            co_await net::sleep(delay);
            continue;
        }
        auto session = co_await establish(st, broker);
        if (st.draining) {
            if (session) {
                session->close(make_error_code(errc::no_error));
            }
            break;
        }
        if (!session) {
            back_off(st, g);
            continue;
        }
        g.wanted = std::max<std::uint32_t>(1, session->peer_hello().settings.replicas);
        // A dial that lands on a replica that already has a session replaces that session:
        // the broker sends it GOAWAY, so it drains and stops counting as live.
        auto instance = session->peer_hello().instance;
        if (std::any_of(g.sessions.begin(), g.sessions.end(), [&](const auto& s) {
                return !s->draining() && s->peer_hello().instance == instance;
            })) {
            log::debug("broker_session_replaced",
                       {{"broker", broker.to_string()}, {"instance", net::to_hex(instance)}});
        }
        g.sessions.push_back(session);
        net::spawn(st.io.get_executor(), serve_session(st, g, session), "broker_session");
    }
    // The group lives in this frame: wait for its sessions to end before it goes.
    while (!g.sessions.empty()) {
        co_await g.changed.wait();
    }
}

int parse_and_run(int argc, char** argv) {
    auto desc = describe();
    auto vm = config::parse(argc, argv, desc, usage);
    if (!vm) {
        return 0;
    }
    return run(to_options(*vm));
}

asio::awaitable<void> drain(bridge_state& st) {
    st.draining = true;
    for (const auto& s : st.sessions) {
        s->goaway(errc::no_error, "bridge is shutting down");
    }
    auto deadline = std::chrono::steady_clock::now() + st.opt.drain_timeout;
    for (;;) {
        bool busy = false;
        for (const auto& s : st.sessions) {
            busy = busy || s->open_streams() > 0;
        }
        if (!busy || std::chrono::steady_clock::now() >= deadline) {
            break;
        }
        co_await net::sleep(std::chrono::milliseconds(50));
    }
    for (const auto& s : st.sessions) {
        s->close(make_error_code(errc::no_error));
    }
    log::info("drain_finished", {});
    st.io.stop();
}

}  // namespace

int main(int argc, char** argv) {
    return config::guarded_main("bridge", parse_and_run, argc, argv);
}

int run(const options& o) {
    asio::io_context io(1);
    std::unique_ptr<tls::reloader> vault_tls;
    if (o.vault.scheme == "https") {
        vault_tls =
            std::make_unique<tls::reloader>("vault", std::vector<std::string>{o.vault_ca}, [&o] {
                return tls::make_client_context({"", "", o.vault_ca, tls::min_version::tls1_2, ""});
            });
    }
    bridge_state st(io, o, vault_tls.get());
    st.instance = net::make_instance_id(o.instance_name);
    st.broker_tls = std::make_unique<tls::reloader>(
        "broker", std::vector<std::string>{o.client_cert, o.client_key, o.ca_cert}, [&o] {
            return tls::make_client_context(
                {o.client_cert, o.client_key, o.ca_cert, o.tls_min, std::string(frame::alpn_id)});
        });
    std::vector<tls::reloader*> reloaders{st.broker_tls.get()};
    if (vault_tls) {
        reloaders.push_back(vault_tls.get());
    }

    log::info("bridge_started", {{"version", taser::version},
                                 {"instance", net::to_hex(st.instance)},
                                 {"vault", o.vault.scheme + "://" + o.vault.authority.to_string()},
                                 {"brokers", o.brokers.size()}});
    for (const auto& b : o.brokers) {
        net::spawn(io.get_executor(), keep_connected(st, b), "keep_connected");
    }

    tcp::acceptor admin_acceptor(io);
    if (o.admin_listen) {
        try {
            net::listen(admin_acceptor, *o.admin_listen);
        } catch (const boost::system::system_error& e) {
            log::error("listen_failed", {{"error", e.what()}});
            std::cerr << "taser bridge: " << e.what() << "\n";
            return 1;
        }
        log::info("listener_started",
                  {{"listener", "admin"}, {"address", net::local_address(admin_acceptor)}});
        // Ready while every broker address has a session.
        admin::handlers h{[&st] {
                              if (st.draining) {
                                  return false;
                              }
                              for (const auto& b : st.opt.brokers) {
                                  auto it = st.sessions_per_broker.find(b.to_string());
                                  if (it == st.sessions_per_broker.end() || it->second == 0) {
                                      return false;
                                  }
                              }
                              return true;
                          },
                          [&st] { return render_metrics(st); }};
        net::spawn(io.get_executor(), admin::serve(admin_acceptor, std::move(h)), "admin");
    }

    net::spawn(io.get_executor(), tls::watch(reloaders, o.cert_reload_interval), "cert_watch");
    net::signal_handlers signals(io, reloaders, o.drain_timeout,
                                 [&] { net::spawn(io.get_executor(), drain(st), "drain"); });

    io.run();
    // After a forced stop, sessions and streams still hold each other; closing the sessions
    // breaks those cycles before the coroutines that own the rest are destroyed.
    auto sessions = st.sessions;
    for (const auto& s : sessions) {
        s->close(make_error_code(errc::cancel));
    }
    log::info("bridge_stopped", {});
    return 0;
}

}  // namespace taser::bridge
