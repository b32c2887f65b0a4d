// SPDX-License-Identifier: Apache-2.0
// The bridge's HTTP client towards the vault.
#include "vault_client.hpp"

#include <charconv>
#include <optional>

#include <boost/asio/connect.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/http.hpp>

#include "taser/http/message.hpp"
#include "taser/log/log.hpp"
#include "taser/mux/relay.hpp"
#include "taser/net/deadlines.hpp"
#include "taser/net/event.hpp"
#include "taser/net/spawn.hpp"
#include "taser/net/wait.hpp"

namespace taser::bridge {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using asio::as_tuple;
using asio::use_awaitable;
using net::deadlines;

constexpr std::size_t body_chunk_bytes = 64 * 1024;
constexpr std::uint32_t max_response_header_bytes = 64 * 1024;

std::optional<std::uint64_t> parse_length(std::string_view v) {
    std::uint64_t n = 0;
    auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
    if (v.empty() || ec != std::errc{} || end != v.data() + v.size()) {
        return std::nullopt;
    }
    return n;
}

// Answers the stream with an error of the bridge's own, in Vault's shape.
void respond_error(const std::shared_ptr<mux::stream>& s, unsigned status, std::string_view message,
                   unsigned retry_after = 0) {
    auto body = taser::http::vault_error_body(message);
    frame::response_head head{static_cast<std::uint16_t>(status),
                              {{"Content-Type", "application/json"},
                               {"Cache-Control", "no-store"},
                               {"Content-Length", std::to_string(body.size())}}};
    if (retry_after > 0) {
        head.fields.push_back({"Retry-After", std::to_string(retry_after)});
    }
    if (s->write_response_head(head, false)) {
        return;
    }
    // The body fits in the send buffer, so this write completes without waiting.
    net::spawn(
        s->session_executor(),
        [s, body = std::move(body)]() -> asio::awaitable<void> {
            co_await s->write({reinterpret_cast<const std::uint8_t*>(body.data()), body.size()},
                              true);
        },
        "bridge_error_body");
}

struct exchange_result {
    unsigned status = 0;  // the vault's final status, 0 when none arrived
    bool reusable = false;
    bool nothing_received = true;  // the vault sent no byte of a response
    bool request_sent = false;     // head written to the vault
    error_code ec;
};

// Sends the stream's request body to the vault, chunked unless a length is known.
template <class Stream>
asio::awaitable<bool> upload(Stream& sock, deadlines& timers, std::shared_ptr<mux::stream> s,
                             std::optional<std::uint64_t> length, std::chrono::milliseconds idle) {
    std::uint64_t sent = 0;
    for (;;) {
        auto [ec, chunk] = co_await s->read();
        if (ec) {
            co_return false;
        }
        if (chunk.empty()) {
            break;
        }
        sent += chunk.size();
        if (length && sent > *length) {
            log::warn("request_body_too_long", {{"conn", s->conn_id()}, {"stream", s->id()}});
            s->reset(errc::protocol_error);
            co_return false;
        }
        std::array<asio::const_buffer, 3> parts;
        std::size_t count = 0;
        char size_line[24];
        if (!length) {
            auto [end, tec] = std::to_chars(size_line, size_line + 16, chunk.size(), 16);
            (void)tec;
            *end++ = '\r';
            *end++ = '\n';
            parts[count++] = asio::buffer(size_line, static_cast<std::size_t>(end - size_line));
        }
        parts[count++] = asio::buffer(chunk);
        if (!length) {
            parts[count++] = asio::buffer("\r\n", 2);
        }
        timers.arm(deadlines::write, idle);
        auto [wec, n] = co_await asio::async_write(sock, std::span(parts.data(), count),
                                                   as_tuple(use_awaitable));
        timers.disarm(deadlines::write);
        if (wec) {
            co_return false;
        }
    }
    if (length && sent != *length) {
        log::warn("request_body_short", {{"conn", s->conn_id()},
                                         {"stream", s->id()},
                                         {"expected", *length},
                                         {"received", sent}});
        co_return false;
    }
    if (!length) {
        timers.arm(deadlines::write, idle);
        auto [wec, n] =
            co_await asio::async_write(sock, asio::buffer("0\r\n\r\n", 5), as_tuple(use_awaitable));
        timers.disarm(deadlines::write);
        if (wec) {
            co_return false;
        }
    }
    co_return true;
}

template <class Stream>
asio::awaitable<exchange_result> exchange(Stream& sock, vault_connection& vc,
                                          std::shared_ptr<mux::stream> s, const options& opt) {
    exchange_result result;
    const auto& req = s->request();
    auto ex = s->session_executor();

    // The connection's watchdog; every slot it arms here is disarmed again before returning.
    auto& timers = vc.timers;

    // Hop-by-hop fields were removed by the broker; removing them again keeps a faulty or
    // hostile broker from choosing the framing that the vault sees.
    std::vector<frame::field> fields;
    fields.reserve(req.fields.size() + 2);
    for (const auto& f : req.fields) {
        if (!taser::http::is_hop_by_hop(f.name) && !beast::iequals(f.name, "expect")) {
            fields.push_back(f);
        }
    }
    std::optional<std::uint64_t> length;
    if (auto cl = taser::http::find_field(fields, "content-length")) {
        length = parse_length(*cl);
        if (!length || taser::http::count_fields(fields, "content-length") > 1) {
            respond_error(s, 400, "invalid Content-Length");
            result.ec = make_error_code(errc::protocol_error);
            co_return result;
        }
    }
    bool has_body = !s->remote_ended() || s->try_peek_data();
    std::string head;
    head.reserve(512);
    head += req.method;
    head += ' ';
    head += req.target;
    head += " HTTP/1.1\r\n";
    if (!taser::http::find_field(fields, "host")) {
        head += "Host: " + opt.vault.authority.to_string() + "\r\n";
    }
    taser::http::append_fields(head, fields);
    if (has_body && !length) {
        head += "Transfer-Encoding: chunked\r\n";
    }
    head += "\r\n";

    timers->arm(deadlines::write, opt.request_timeout);
    auto [wec, written] =
        co_await asio::async_write(sock, asio::buffer(head), as_tuple(use_awaitable));
    timers->disarm(deadlines::write);
    if (wec) {
        result.ec = wec;
        co_return result;
    }
    result.request_sent = true;
    // Neither is needed while the vault responds, and thousands of held requests would each
    // keep them.
    std::exchange(head, {});
    std::exchange(fields, {});

    // The body goes up while the response may already come down.
    bool upload_running = has_body;
    bool upload_ok = !has_body;
    net::event upload_finished(ex);
    if (has_body) {
        net::spawn(
            ex,
            [&, s]() -> asio::awaitable<void> {
                upload_ok = co_await upload(sock, *timers, s, length, opt.request_timeout);
                upload_running = false;
                upload_finished.notify();
            },
            "vault_upload");
    }

    // A reset from the broker (the client went away) aborts the vault request.
    auto* connection = &vc;
    s->on_failure([connection] { connection->close(); });

    bool head_request = req.method == "HEAD";
    std::optional<bhttp::response_parser<bhttp::buffer_body>> parser;
    error_code ec;
    // 1xx responses other than 101 are interim; the final response follows on the connection.
    for (int interim = 0; interim < 8; ++interim) {
        parser.emplace();
        parser->header_limit(max_response_header_bytes);
        parser->body_limit(boost::none);
        parser->skip(head_request);
        timers->arm(deadlines::read, opt.request_timeout);
        if constexpr (net::can_wait_readable<Stream>) {
            if (vc.buffer.size() == 0) {
                // The response is usually not there yet, right after the request.
                co_await net::wait_readable(sock);
            }
        }
        auto [rec, n] =
            co_await bhttp::async_read_header(sock, vc.buffer, *parser, as_tuple(use_awaitable));
        timers->disarm(deadlines::read);
        ec = rec;
        if (ec || parser->get().result_int() >= 200 || parser->get().result_int() == 101) {
            break;
        }
        result.nothing_received = false;
    }

    bool complete = false;
    if (!ec && parser->get().result_int() < 200) {
        ec = make_error_code(errc::protocol_error);  // 101 or endless interim responses
    }
    if (!ec) {
        result.nothing_received = false;
        auto& res = parser->get();
        auto status = static_cast<std::uint16_t>(res.result_int());
        result.status = status;
        frame::response_head rh{status, taser::http::end_to_end_fields(res)};
        auto content_length = parser->content_length();
        bool no_body = head_request || status == 204 || status == 304 ||
                       (content_length && *content_length == 0 && !parser->chunked()) ||
                       parser->is_done();
        if (auto wec2 = s->write_response_head(rh, no_body)) {
            ec = wec2;
        } else if (no_body) {
            complete = true;
        } else {
            // Beast reads only as much as the buffer's free capacity, so without room made here
            // a large body would come in pieces of a few KiB, each one a frame and a write.
            vc.buffer.reserve(vc.buffer.size() + body_chunk_bytes);
            auto chunk = std::make_unique_for_overwrite<std::uint8_t[]>(body_chunk_bytes);
            while (!parser->is_done()) {
                parser->get().body().data = chunk.get();
                parser->get().body().size = body_chunk_bytes;
                // Body bytes that arrived with the head are parsed at once: the wait of a read
                // would let the session send the head alone, and the broker write it alone.
                std::size_t parsed = 0;
                error_code rec;
                if (vc.buffer.size() > 0) {
                    parsed = parser->put(vc.buffer.data(), rec);
                    vc.buffer.consume(parsed);
                    if (rec == bhttp::error::need_more) {
                        rec = {};
                    }
                }
                if (parsed == 0 && !rec) {
                    timers->arm(deadlines::read, opt.request_timeout);
                    // read_some hands over what arrived, so a slow stream's pieces flow as sent.
                    std::tie(rec, std::ignore) = co_await bhttp::async_read_some(
                        sock, vc.buffer, *parser, as_tuple(use_awaitable));
                    timers->disarm(deadlines::read);
                }
                if (rec == bhttp::error::need_buffer) {
                    rec = {};
                }
                if (rec) {
                    ec = rec;
                    break;
                }
                auto got = body_chunk_bytes - parser->get().body().size;
                bool last = parser->is_done();
                if (got > 0 || last) {
                    if (auto sec = co_await s->write({chunk.get(), got}, last)) {
                        ec = sec;
                        break;
                    }
                }
            }
            complete = !ec;
        }
    }

    s->on_failure(nullptr);
    if (upload_running) {
        // The vault answered before it read the whole body: stop sending it, and tell the
        // broker that the rest of the request is not wanted.
        if (complete) {
            s->reset(errc::no_error);
        }
        vc.close();
        while (upload_running) {
            co_await upload_finished.wait();
        }
        upload_ok = false;
    }
    result.ec = ec;
    result.reusable = complete && upload_ok && parser && parser->keep_alive() && !timers->expired();
    co_return result;
}

}  // namespace

asio::awaitable<std::tuple<error_code, tcp::resolver::results_type>> vault_client::resolve(
    const config::host_port& where) {
    // A numeric address needs no lookup, and Asio's resolver would hand it to a thread.
    if (config::is_ip_literal(where.host)) {
        auto address = asio::ip::make_address(where.host);
        co_return std::tuple{error_code{}, tcp::resolver::results_type::create(
                                               tcp::endpoint(address, where.port), where.host,
                                               std::to_string(where.port))};
    }
    tcp::resolver resolver(executor_);
    co_return co_await resolver.async_resolve(where.host, std::to_string(where.port),
                                              as_tuple(use_awaitable));
}

vault_connection::~vault_connection() {
    if (timers) {
        timers->stop();
    }
}

void vault_connection::close() noexcept {
    error_code ignored;
    if (tls) {
        tls->lowest_layer().shutdown(tcp::socket::shutdown_both, ignored);
        tls->lowest_layer().close(ignored);
    }
    if (plain) {
        plain->shutdown(tcp::socket::shutdown_both, ignored);
        plain->close(ignored);
    }
}

vault_client::vault_client(const asio::any_io_executor& ex, const options& o, tls::reloader* tls)
    : executor_(ex), options_(o), tls_(tls), slot_freed_(ex) {}

asio::awaitable<std::unique_ptr<vault_connection>> vault_client::connect(error_code& ec) {
    auto c = std::make_unique<vault_connection>();
    auto* raw_connection = c.get();
    c->timers =
        std::make_shared<deadlines>(executor_, [raw_connection] { raw_connection->close(); });
    c->timers->start();
    const auto& where = options_.vault.authority;
    auto [rec, endpoints] = co_await resolve(where);
    if (rec) {
        ec = rec;
        co_return nullptr;
    }
    tcp::socket socket(executor_);
    auto timers = std::make_shared<deadlines>(executor_, [&socket] {
        error_code e;
        socket.close(e);
    });
    timers->start();
    timers->arm(deadlines::write, options_.connect_timeout);
    auto [cec, endpoint] = co_await asio::async_connect(socket, endpoints, as_tuple(use_awaitable));
    timers->disarm(deadlines::write);
    if (cec) {
        timers->stop();
        ec = timers->expired() ? make_error_code(errc::timeout) : cec;
        co_return nullptr;
    }
    error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    if (!tls_) {
        timers->stop();
        c->plain = std::make_unique<tcp::socket>(std::move(socket));
        co_return c;
    }
    timers->stop();
    // The connection keeps the context it started with alive; a reload affects new ones.
    c->tls_context = tls_->current();
    c->tls = std::make_unique<asio::ssl::stream<tcp::socket>>(std::move(socket), *c->tls_context);
    tls::prepare_client_stream(c->tls->native_handle(), where.host);
    auto* raw = c.get();
    auto handshake_timers = std::make_shared<deadlines>(executor_, [raw] { raw->close(); });
    handshake_timers->start();
    handshake_timers->arm(deadlines::read, options_.connect_timeout);
    auto [hec] =
        co_await c->tls->async_handshake(asio::ssl::stream_base::client, as_tuple(use_awaitable));
    handshake_timers->stop();
    if (hec) {
        ec = hec;
        co_return nullptr;
    }
    co_return c;
}

asio::awaitable<std::unique_ptr<vault_connection>> vault_client::acquire(
    error_code& ec, std::chrono::steady_clock::time_point deadline) {
    auto now = std::chrono::steady_clock::now();
    while (!idle_.empty()) {
        auto c = std::move(idle_.back());
        idle_.pop_back();
        if (now - c->idle_since < options_.vault_idle_timeout) {
            c->reused = true;
            co_return c;
        }
        c->close();
        --open_;
    }
    // Limitation: waiters are not served in arrival order; under a sustained overload one
    // request may wait longer than others, up to its deadline.
    while (open_ >= options_.vault_max_connections) {
        if (std::chrono::steady_clock::now() >= deadline) {
            ec = make_error_code(errc::timeout);
            co_return nullptr;
        }
        // One shared timer wakes the waiters once a second to check their deadlines, which
        // costs far less than a timer for each of thousands of waiting streams.
        if (waiters_++ == 0) {
            net::spawn(executor_, tick_waiters(), "vault_wait_ticker");
        }
        co_await slot_freed_.wait();
        --waiters_;
        if (!idle_.empty()) {
            auto c = std::move(idle_.back());
            idle_.pop_back();
            c->reused = true;
            co_return c;
        }
    }
    ++open_;
    auto c = co_await connect(ec);
    if (!c) {
        --open_;
        slot_freed_.notify();
    }
    co_return c;
}

asio::awaitable<void> vault_client::tick_waiters() {
    while (waiters_ > 0) {
        co_await net::sleep(std::chrono::seconds(1));
        slot_freed_.notify();
    }
}

void vault_client::release(std::unique_ptr<vault_connection> c, bool reusable) {
    if (reusable && idle_.size() < options_.vault_max_idle) {
        c->idle_since = std::chrono::steady_clock::now();
        c->reused = false;
        idle_.push_back(std::move(c));
    } else {
        c->close();
        --open_;
    }
    slot_freed_.notify();
}

asio::awaitable<void> vault_client::tunnel(std::shared_ptr<mux::stream> s) {
    if (!options_.allow_tunnels) {
        log::write_limited(log::level::warn, "tunnel_rejected",
                           {{"conn", s->conn_id()},
                            {"stream", s->id()},
                            {"reason", "byte tunnels are not enabled (--allow-tunnels)"}});
        respond_error(s, 403, "byte tunnels are not enabled on this bridge");
        co_return;
    }
    // The authority that the stream names is ignored on purpose: a tunnel always ends at the
    // vault's address, whatever a broker asks for.
    const auto& where = options_.vault.authority;
    auto [rec, endpoints] = co_await resolve(where);
    tcp::socket socket(executor_);
    auto timers = std::make_shared<deadlines>(executor_, [&socket] {
        error_code e;
        socket.close(e);
    });
    timers->start();
    error_code ec = rec;
    if (!ec) {
        timers->arm(deadlines::write, options_.connect_timeout);
        auto [cec, endpoint] =
            co_await asio::async_connect(socket, endpoints, as_tuple(use_awaitable));
        timers->disarm(deadlines::write);
        ec = timers->expired() ? make_error_code(errc::timeout) : cec;
    }
    if (ec) {
        timers->stop();
        ++unreachable_;
        log::write_limited(log::level::error, "vault_unreachable",
                           {{"address", where.to_string()}, {"error", ec.message()}});
        respond_error(s, 503, "the bridge cannot reach the vault: " + ec.message(), 1);
        co_return;
    }
    error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    if (s->write_response_head({200, {}}, false)) {
        timers->stop();
        co_return;
    }
    ++tunnels_;
    auto counts = co_await mux::relay(socket, s, *timers, options_.tunnel_idle_timeout);
    timers->stop();
    log::debug("tunnel_closed", {{"conn", s->conn_id()},
                                 {"stream", s->id()},
                                 {"bytes_up", counts.from_stream},
                                 {"bytes_down", counts.to_stream},
                                 {"clean", counts.clean}});
}

// Not a coroutine itself, so that a tunnel, which may stay open for minutes, holds only its own
// coroutine frame.
asio::awaitable<void> vault_client::serve(std::shared_ptr<mux::stream> s) {
    if (s->request().method == "CONNECT") {
        return tunnel(std::move(s));
    }
    return forward(std::move(s));
}

asio::awaitable<void> vault_client::forward(std::shared_ptr<mux::stream> s) {
    const auto& req = s->request();
    // Only origin-form targets reach the vault: whatever authority a request names, the
    // bridge connects to --vault-address and nothing else.
    if (!req.target.starts_with("/")) {
        log::write_limited(
            log::level::warn, "request_rejected",
            {{"conn", s->conn_id()}, {"stream", s->id()}, {"reason", "target not in origin form"}});
        respond_error(s, 400, "request target must be a path");
        co_return;
    }

    // Only a request that cannot change anything may be sent twice.
    bool idempotent = req.method == "GET" || req.method == "HEAD" || req.method == "OPTIONS" ||
                      req.method == "LIST";
    bool replayable = idempotent && s->remote_ended() && !s->try_peek_data();
    for (int attempt = 0; attempt < 2; ++attempt) {
        error_code ec;
        auto c = co_await acquire(ec, std::chrono::steady_clock::now() + options_.request_timeout);
        if (ec == errc::timeout) {
            log::write_limited(log::level::warn, "vault_busy",
                               {{"conn", s->conn_id()},
                                {"stream", s->id()},
                                {"max_connections", options_.vault_max_connections}});
            respond_error(s, 503, "all connections to the vault are busy; retry later", 1);
            co_return;
        }
        if (s->error()) {
            // The broker gave up on this request while it waited: do not send it.
            if (c) {
                release(std::move(c), true);
            }
            co_return;
        }
        if (!c) {
            ++unreachable_;
            log::write_limited(
                log::level::error, "vault_unreachable",
                {{"address", options_.vault.authority.to_string()}, {"error", ec.message()}});
            respond_error(s, 503, "the bridge cannot reach the vault: " + ec.message(), 1);
            co_return;
        }
        bool reused = c->reused;
        exchange_result r = c->tls ? co_await exchange(*c->tls, *c, s, options_)
                                   : co_await exchange(*c->plain, *c, s, options_);
        release(std::move(c), r.reusable);
        if (r.status >= 100 && r.status < 600) {
            ++by_class_[r.status / 100];
        }
        if (!r.ec) {
            co_return;
        }
        // A kept-alive connection that the vault closed meanwhile fails before any response
        // byte; an idempotent request without a body is then sent again on a new connection.
        if (reused && replayable && r.nothing_received && !s->error()) {
            continue;
        }
        log::debug("vault_exchange_failed",
                   {{"conn", s->conn_id()}, {"stream", s->id()}, {"error", r.ec.message()}});
        if (!s->error()) {
            s->reset(r.nothing_received ? errc::connect_error : errc::internal_error);
        }
        co_return;
    }
}

}  // namespace taser::bridge
