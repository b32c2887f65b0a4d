// SPDX-License-Identifier: Apache-2.0
// taser broker: options, listeners, and the drain on SIGTERM.
#include "taser/broker/broker.hpp"

#include <iostream>

#include <boost/asio/signal_set.hpp>

#include "taser/admin/admin.hpp"
#include "taser/config/cli.hpp"
#include "taser/log/log.hpp"
#include "taser/net/event.hpp"
#include "taser/net/lifecycle.hpp"
#include "taser/net/listen.hpp"
#include "taser/net/spawn.hpp"
#include "taser/version.hpp"

#include "state.hpp"

namespace taser::broker {
namespace {

namespace po = boost::program_options;
using tcp = asio::ip::tcp;

constexpr std::string_view usage =
    "Usage: taser broker [options]\n\n"
    "Accepts bridges (mutual TLS) on --bridge-listen and Vault API clients on --listen, and\n"
    "carries each client request to a bridge as one stream of the tunnel.";

po::options_description describe() {
    po::options_description desc("taser broker options");
    auto s = [](const char* v) { return po::value<std::string>()->default_value(v); };
    // clang-format off
    desc.add_options()
        ("listen", s("0.0.0.0:8443"), "HOST:PORT for Vault API clients (pods)")
        ("client-edge", s("http"),
         "what --listen does: 'http' terminates TLS and forwards each request; 'passthrough' "
         "carries each connection's bytes unread to the vault's own TLS listener")
        ("passthrough-listen", po::value<std::string>(),
         "HOST:PORT of a second client listener in passthrough mode, beside an http --listen")
        ("allow-connect", po::value<std::vector<std::string>>(),
         "HOST:PORT that clients may name in CONNECT (repeatable; the bridge still connects only "
         "to its vault address); CONNECT is rejected without it")
        ("tls-cert", po::value<std::string>(), "certificate chain (PEM) of the client port")
        ("tls-key", po::value<std::string>(), "private key (PEM) of the client port")
        ("client-ca", po::value<std::string>(),
         "CA bundle (PEM); when set, clients must present a certificate from it")
        ("plaintext", po::bool_switch(),
         "serve the client port over plain HTTP instead of HTTPS")
        ("bridge-listen", s("0.0.0.0:8444"), "HOST:PORT for bridges (mutual TLS)")
        ("bridge-cert", po::value<std::string>(), "certificate chain (PEM) of the bridge port")
        ("bridge-key", po::value<std::string>(), "private key (PEM) of the bridge port")
        ("bridge-ca", po::value<std::string>(),
         "CA bundle (PEM) that bridge client certificates must chain to")
        ("bridge-pin", po::value<std::vector<std::string>>(),
         "accept only bridge certificates with this key pin, sha256//BASE64 (repeatable; "
         "'taser pin CERT' prints one)")
        ("tls-min-version", s("1.3"), "minimum TLS version on the bridge port: 1.3 or 1.2")
        ("bridge-wait", s("5s"), "how long a request waits for a bridge before 503 (duration)")
        ("request-timeout", s("120s"),
         "how long a request waits for the vault's response head before 504 (duration)")
        ("idle-timeout", s("60s"),
         "how long a client connection may make no progress, and wait between requests")
        ("header-timeout", s("10s"), "time for a new client to send its first request header")
        ("tunnel-idle-timeout", s("300s"),
         "how long a passthrough or CONNECT tunnel may move no byte before it is closed "
         "(duration)")
        ("handshake-timeout", s("10s"), "time for a bridge's TLS and tunnel handshake")
        ("max-header-size", s("64KiB"), "largest request header block (size); larger: 431")
        ("max-body-size", s("128MiB"), "largest request body (size); larger: 413")
        ("max-client-connections", s("10000"),
         "client connections open at once; more are closed at accept")
        ("max-handshakes", s("64"),
         "bridge TLS handshakes in progress at once; more are closed at accept")
        ("max-bridges", s("64"), "bridges connected at once")
        ("keepalive-interval", s("15s"),
         "time between tunnel PINGs; a dead path is detected within about interval + "
         "timeout (duration)")
        ("keepalive-timeout", s("10s"), "time a PING may go unanswered before the tunnel is "
                                        "declared dead (duration)")
        ("max-frame-payload", s("64KiB"), "largest frame payload the bridge may send (size)")
        ("stream-window", s("4MiB"), "flow-control window of each stream (size)")
        ("connection-window", s("32MiB"), "flow-control window of each tunnel (size)")
        ("instance-id", s(""), "name of this broker replica (default: random)")
        ("replicas", s("1"),
         "how many broker replicas serve the same address, announced to bridges")
        ("drain-timeout", s("30s"),
         "after SIGTERM, how long running requests may take to finish (duration)")
        ("cert-reload-interval", s("10s"),
         "how often certificate, key and CA files are checked for changes (duration); SIGHUP "
         "reloads them at once")
        ("admin-listen", s("0.0.0.0:9090"),
         "HOST:PORT for /healthz, /readyz and /metrics; 'off' disables it");
    // clang-format on
    config::add_common_options(desc);
    return desc;
}

options to_options(const po::variables_map& vm) {
    options o;
    auto str = [&](const char* name) { return vm[name].as<std::string>(); };
    auto duration = [&](const char* name) { return config::parse_duration(name, str(name)); };
    o.listen = config::parse_host_port("listen", str("listen"));
    if (str("client-edge") == "passthrough") {
        o.edge = client_edge::passthrough;
    } else if (str("client-edge") != "http") {
        throw config::invalid_value("invalid value '" + str("client-edge") +
                                    "' for --client-edge: expected http or passthrough");
    }
    if (vm.count("passthrough-listen")) {
        if (o.edge == client_edge::passthrough) {
            throw config::invalid_value(
                "--passthrough-listen adds a passthrough listener beside an http --listen; with "
                "--client-edge passthrough it is not needed");
        }
        o.passthrough_listen = config::parse_host_port("passthrough-listen",
                                                       vm["passthrough-listen"].as<std::string>());
    }
    if (vm.count("allow-connect")) {
        for (const auto& a : vm["allow-connect"].as<std::vector<std::string>>()) {
            o.connect_authorities.push_back(config::parse_host_port("allow-connect", a));
        }
    }
    o.tls_cert = config::optional_string(vm, "tls-cert");
    o.tls_key = config::optional_string(vm, "tls-key");
    o.client_ca = config::optional_string(vm, "client-ca");
    o.plaintext = vm["plaintext"].as<bool>();
    bool needs_tls = o.edge == client_edge::http && !o.plaintext;
    if (o.edge == client_edge::passthrough &&
        (o.plaintext || !o.tls_cert.empty() || !o.tls_key.empty() || !o.client_ca.empty())) {
        throw config::invalid_value(
            "--client-edge passthrough never terminates TLS: drop "
            "--plaintext, --tls-cert, --tls-key and --client-ca");
    }
    if (needs_tls && (o.tls_cert.empty() || o.tls_key.empty())) {
        throw config::invalid_value(
            "the client port needs --tls-cert and --tls-key, or --plaintext for plain HTTP");
    }
    if (o.plaintext && (!o.tls_cert.empty() || !o.tls_key.empty() || !o.client_ca.empty())) {
        throw config::invalid_value(
            "--plaintext cannot be combined with --tls-cert, --tls-key or --client-ca");
    }
    o.bridge_listen = config::parse_host_port("bridge-listen", str("bridge-listen"));
    o.bridge_cert = config::optional_string(vm, "bridge-cert");
    o.bridge_key = config::optional_string(vm, "bridge-key");
    o.bridge_ca = config::optional_string(vm, "bridge-ca");
    if (o.bridge_cert.empty() || o.bridge_key.empty() || o.bridge_ca.empty()) {
        throw config::invalid_value(
            "the bridge port needs --bridge-cert, --bridge-key and --bridge-ca (mutual TLS)");
    }
    o.bridge_pins = config::parse_pins(vm, "bridge-pin");
    o.tls_min = tls::parse_min_version("tls-min-version", str("tls-min-version"));
    o.bridge_wait = duration("bridge-wait");
    o.request_timeout = duration("request-timeout");
    o.idle_timeout = duration("idle-timeout");
    o.header_timeout = duration("header-timeout");
    o.tunnel_idle_timeout = duration("tunnel-idle-timeout");
    o.handshake_timeout = duration("handshake-timeout");
    o.max_header_bytes = config::parse_size("max-header-size", str("max-header-size"));
    // Below 1KiB no real client fits; above 1MiB the header block could not travel in one
    // HEADERS frame.
    if (o.max_header_bytes < 1024 || o.max_header_bytes > 1024 * 1024) {
        throw config::invalid_value(
            "invalid value for --max-header-size: expected a size from "
            "1KiB to 1MiB");
    }
    o.max_body_bytes = config::parse_size("max-body-size", str("max-body-size"));
    o.max_client_connections =
        config::parse_count("max-client-connections", str("max-client-connections"), 1, 1000000);
    o.max_handshakes = config::parse_count("max-handshakes", str("max-handshakes"), 1, 100000);
    o.max_bridges = config::parse_count("max-bridges", str("max-bridges"), 1, 100000);
    o.keepalive_interval = duration("keepalive-interval");
    o.keepalive_timeout = duration("keepalive-timeout");
    o.settings.max_frame_payload = config::parse_frame_payload(vm);
    o.settings.max_header_block =
        std::min(o.settings.max_frame_payload, static_cast<std::uint32_t>(o.max_header_bytes * 2));
    o.settings.initial_stream_window = config::parse_window(vm, "stream-window");
    o.settings.initial_connection_window = config::parse_window(vm, "connection-window");
    o.instance_name = str("instance-id");
    o.replicas =
        static_cast<std::uint32_t>(config::parse_count("replicas", str("replicas"), 1, 1000));
    o.drain_timeout = duration("drain-timeout");
    o.cert_reload_interval = duration("cert-reload-interval");
    if (o.cert_reload_interval.count() <= 0) {
        throw config::invalid_value("--cert-reload-interval must be above zero");
    }
    if (auto admin = str("admin-listen"); admin == "off" || admin.empty()) {
        o.admin_listen.reset();
    } else {
        o.admin_listen = config::parse_host_port("admin-listen", admin);
    }
    return o;
}

int parse_and_run(int argc, char** argv) {
    auto desc = describe();
    auto vm = config::parse(argc, argv, desc, usage);
    if (!vm) {
        return 0;
    }
    return run(to_options(*vm));
}

// After SIGTERM: no new clients or bridges, GOAWAY to bridges, running requests finish up to
// the drain deadline, then the process ends.
asio::awaitable<void> drain(state& st, tcp::acceptor& clients, tcp::acceptor& passthrough,
                            tcp::acceptor& bridges) {
    st.draining = true;
    error_code ignored;
    clients.close(ignored);
    passthrough.close(ignored);
    bridges.close(ignored);
    st.pool.goaway_all();
    for (auto& [id, entry] : st.clients) {
        if (!entry.busy && entry.close) {
            entry.close();
        }
    }
    auto deadline = std::chrono::steady_clock::now() + st.opt.drain_timeout;
    while (!st.clients.empty() && std::chrono::steady_clock::now() < deadline) {
        asio::steady_timer tick(st.io.get_executor(), std::chrono::milliseconds(50));
        co_await tick.async_wait(asio::as_tuple(asio::use_awaitable));
    }
    log::info("drain_finished", {{"clients_left", st.clients.size()}});
    // Connections still open at the deadline are cut, and given a moment to unwind, so that no
    // coroutine is left to be destroyed after the state it uses.
    for (auto& [id, entry] : st.clients) {
        if (entry.close) {
            entry.close();
        }
    }
    for (const auto& s : st.pool.sessions()) {
        s->close(make_error_code(errc::no_error));
    }
    auto unwind_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    while (!st.clients.empty() && std::chrono::steady_clock::now() < unwind_deadline) {
        co_await net::sleep(std::chrono::milliseconds(10));
    }
    st.io.stop();
}

}  // namespace

int main(int argc, char** argv) {
    return config::guarded_main("broker", parse_and_run, argc, argv);
}

int run(const options& o) {
    asio::io_context io(1);
    state st(io, o);
    st.instance = net::make_instance_id(o.instance_name);
    st.instance_hex = net::to_hex(st.instance);

    std::vector<tls::reloader*> reloaders;
    if (o.edge == client_edge::http && !o.plaintext) {
        st.client_tls = std::make_unique<tls::reloader>(
            "client", std::vector<std::string>{o.tls_cert, o.tls_key, o.client_ca}, [&o] {
                return tls::make_server_context({o.tls_cert, o.tls_key, o.client_ca, false,
                                                 tls::min_version::tls1_2, "http/1.1", false});
            });
        reloaders.push_back(st.client_tls.get());
    }
    st.bridge_tls = std::make_unique<tls::reloader>(
        "bridge", std::vector<std::string>{o.bridge_cert, o.bridge_key, o.bridge_ca}, [&o] {
            return tls::make_server_context({o.bridge_cert, o.bridge_key, o.bridge_ca, true,
                                             o.tls_min, std::string(frame::alpn_id), true});
        });
    reloaders.push_back(st.bridge_tls.get());

    tcp::acceptor client_acceptor(io);
    tcp::acceptor bridge_acceptor(io);
    tcp::acceptor admin_acceptor(io);
    tcp::acceptor passthrough_acceptor(io);
    try {
        net::listen(client_acceptor, o.listen);
        if (o.passthrough_listen) {
            net::listen(passthrough_acceptor, *o.passthrough_listen);
        }
        net::listen(bridge_acceptor, o.bridge_listen);
        if (o.admin_listen) {
            net::listen(admin_acceptor, *o.admin_listen);
        }
    } catch (const boost::system::system_error& e) {
        log::error("listen_failed", {{"error", e.what()}});
        std::cerr << "taser broker: " << e.what() << "\n";
        return 1;
    }
    log::info("broker_started", {{"version", taser::version},
                                 {"instance", st.instance_hex},
                                 {"replicas", o.replicas},
                                 {"client_edge", o.edge == client_edge::passthrough ? "passthrough"
                                                 : o.plaintext                      ? "http"
                                                                                    : "https"}});
    log::info("listener_started",
              {{"listener", "client"}, {"address", net::local_address(client_acceptor)}});
    log::info("listener_started",
              {{"listener", "bridge"}, {"address", net::local_address(bridge_acceptor)}});

    if (o.admin_listen) {
        log::info("listener_started",
                  {{"listener", "admin"}, {"address", net::local_address(admin_acceptor)}});
        admin::handlers h{[&st] { return !st.draining && st.pool.ready_count() > 0; },
                          [&st] { return render_metrics(st); }};
        net::spawn(io.get_executor(), admin::serve(admin_acceptor, std::move(h)), "admin");
    }
    net::spawn(io.get_executor(), accept_clients(st, client_acceptor, o.edge), "accept_clients");
    if (o.passthrough_listen) {
        log::info("listener_started", {{"listener", "passthrough"},
                                       {"address", net::local_address(passthrough_acceptor)}});
        net::spawn(io.get_executor(),
                   accept_clients(st, passthrough_acceptor, client_edge::passthrough),
                   "accept_passthrough");
    }
    net::spawn(io.get_executor(), accept_bridges(st, bridge_acceptor), "accept_bridges");

    net::spawn(io.get_executor(), tls::watch(reloaders, o.cert_reload_interval), "cert_watch");
    net::signal_handlers signals(io, reloaders, o.drain_timeout, [&] {
        net::spawn(io.get_executor(),
                   drain(st, client_acceptor, passthrough_acceptor, bridge_acceptor), "drain");
    });

    io.run();
    // After a forced stop, sessions and streams still hold each other; closing the sessions
    // breaks those cycles before the coroutines that own the rest are destroyed.
    auto sessions = st.pool.sessions();
    for (const auto& s : sessions) {
        s->close(make_error_code(errc::cancel));
    }
    log::info("broker_stopped", {});
    return 0;
}

}  // namespace taser::broker
