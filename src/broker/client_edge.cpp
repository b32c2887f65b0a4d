// SPDX-License-Identifier: Apache-2.0
// The broker's client edge: HTTP/1.1 from pods, each exchange carried as one tunnel stream.
#include <algorithm>
#include <charconv>
#include <optional>
#include <utility>

#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>

#include "taser/config/parse.hpp"
#include "taser/http/message.hpp"
#include "taser/log/log.hpp"
#include "taser/mux/relay.hpp"
#include "taser/net/deadlines.hpp"
#include "taser/net/lifecycle.hpp"
#include "taser/net/listen.hpp"
#include "taser/net/spawn.hpp"
#include "taser/net/wait.hpp"

#include "state.hpp"

namespace taser::broker {
namespace {

namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using asio::as_tuple;
using asio::use_awaitable;
using net::deadlines;

constexpr std::size_t body_chunk_bytes = 64 * 1024;
// Response data already received is gathered into one write up to this size.
constexpr std::size_t coalesce_bytes = 256 * 1024;
// Body chunks from this size on are written from where the stream delivered them. Smaller ones
// are copied next to the HTTP text, so that a small response is one buffer (one TLS record).
constexpr std::size_t reference_from_bytes = 8 * 1024;
constexpr std::string_view continue_100 = "HTTP/1.1 100 Continue\r\n\r\n";

// The read buffer holds a whole header block, plus room to read ahead into the body.
beast::flat_buffer read_buffer(const state& st) {
    return beast::flat_buffer(static_cast<std::size_t>(st.opt.max_header_bytes) + 64 * 1024);
}

bool ordinary_end(const error_code& ec) {
    return ec == asio::error::eof || ec == asio::error::connection_reset ||
           ec == asio::error::operation_aborted || ec == asio::error::broken_pipe ||
           ec == asio::error::bad_descriptor || ec == asio::ssl::error::stream_truncated ||
           ec == bhttp::error::end_of_stream;
}

std::optional<std::uint64_t> parse_content_length(std::string_view v) {
    std::uint64_t n = 0;
    auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), n);
    if (ec != std::errc{} || end != v.data() + v.size() || v.empty()) {
        return std::nullopt;
    }
    return n;
}

// The contents of one write to the client: HTTP text (a response head, chunk framing, small
// bodies) and large body chunks as the stream delivered them, which are not copied again.
class response_batch {
public:
    void append_text(std::string_view text) {
        if (segments_.empty() || segments_.back().chunk) {
            segments_.push_back({false, text_.size(), 0});
        }
        segments_.back().size += text.size();
        text_.append(text);
        bytes_ += text.size();
    }

    void append_body(std::vector<std::uint8_t> chunk) {
        if (chunk.size() < reference_from_bytes) {
            append_text({reinterpret_cast<const char*>(chunk.data()), chunk.size()});
            return;
        }
        segments_.push_back({true, chunks_.size(), chunk.size()});
        bytes_ += chunk.size();
        chunks_.push_back(std::move(chunk));
    }

    std::size_t size() const noexcept { return bytes_; }

    // The buffers to write; valid until the next change.
    const std::vector<asio::const_buffer>& buffers() {
        buffers_.clear();
        for (const auto& seg : segments_) {
            buffers_.push_back(seg.chunk ? asio::buffer(chunks_[seg.at])
                                         : asio::buffer(text_.data() + seg.at, seg.size));
        }
        return buffers_;
    }

    void clear() {
        text_.clear();
        chunks_.clear();
        segments_.clear();
        bytes_ = 0;
    }

private:
    struct segment {
        bool chunk;  // chunks_[at], else text_ from offset at
        std::size_t at;
        std::size_t size;
    };
    std::string text_;
    std::vector<std::vector<std::uint8_t>> chunks_;
    std::vector<segment> segments_;
    std::vector<asio::const_buffer> buffers_;
    std::size_t bytes_ = 0;
};

// A client connection's entry in state::clients, where the drain on SIGTERM finds it. It lives
// in the connection's coroutine frame, so the entry goes whichever way the connection ends,
// exceptions included. The entry's close function points into that frame.
class client_registration {
public:
    client_registration(state& st, std::uint64_t conn)
        : st_(&st), conn_(conn), entry_(&st.clients.try_emplace(conn).first->second) {
        entry_->busy = true;
    }
    client_registration(client_registration&& other) noexcept
        : st_(std::exchange(other.st_, nullptr)), conn_(other.conn_), entry_(other.entry_) {}
    client_registration(const client_registration&) = delete;
    client_registration& operator=(const client_registration&) = delete;
    client_registration& operator=(client_registration&&) = delete;
    ~client_registration() {
        if (st_ != nullptr) {
            st_->clients.erase(conn_);
            st_->clients_idle.notify();
            log::debug("client_closed", {{"conn", conn_}});
        }
    }

    std::uint64_t conn() const noexcept { return conn_; }
    // Stable while the registration lives: std::map does not move its nodes.
    client_entry& entry() const noexcept { return *entry_; }

private:
    state* st_;
    std::uint64_t conn_;
    client_entry* entry_;
};

// One client connection: its socket, its deadlines and what it has counted.
template <class Stream>
struct client {
    state& st;
    Stream& stream;
    std::uint64_t conn;
    client_entry& entry;
    std::string peer;
    std::shared_ptr<deadlines> timers;
    beast::flat_buffer buffer;

    // Reads until the buffer holds a whole header block; returns its length including the
    // empty line. Fails with not_found when max_bytes arrive without the end of the block.
    asio::awaitable<std::tuple<error_code, std::size_t>> read_header_block(std::size_t max_bytes) {
        std::size_t searched = 0;
        for (;;) {
            std::string_view have(static_cast<const char*>(buffer.data().data()), buffer.size());
            auto end = have.find("\r\n\r\n", searched);
            if (end != std::string_view::npos) {
                co_return std::tuple{error_code{}, end + 4};
            }
            if (have.size() >= max_bytes) {
                co_return std::tuple{make_error_code(asio::error::not_found), std::size_t{0}};
            }
            if constexpr (net::can_wait_readable<Stream>) {
                if (have.empty()) {
                    // Between two requests the socket is usually empty.
                    co_await net::wait_readable(stream);
                }
            }
            searched = have.size() < 3 ? 0 : have.size() - 3;
            // A first read of 2 KiB takes a typical request head whole, so thousands of waiting
            // connections use little memory. The buffer grows when more arrives.
            auto room = std::min<std::size_t>(max_bytes - have.size() + 4,
                                              std::max<std::size_t>(have.size(), 2048));
            auto [ec, got] =
                co_await stream.async_read_some(buffer.prepare(room), as_tuple(use_awaitable));
            if (ec) {
                co_return std::tuple{ec, std::size_t{0}};
            }
            buffer.commit(got);
            st.stats.bytes_from_clients += got;
        }
    }

    template <class ConstBuffers>
    asio::awaitable<error_code> write(const ConstBuffers& b) {
        timers->arm(deadlines::write, st.opt.idle_timeout);
        auto [ec, n] = co_await asio::async_write(stream, b, as_tuple(use_awaitable));
        timers->disarm(deadlines::write);
        st.stats.bytes_to_clients += n;
        co_return ec;
    }

    // Answers with a Vault-shaped error; returns whether the connection may serve another
    // request.
    asio::awaitable<bool> fail(unsigned status, std::string_view message, bool close,
                               unsigned retry_after = 0) {
        auto text = taser::http::error_response(status, message, close, retry_after);
        count(status);
        auto ec = co_await write(asio::buffer(text));
        co_return !ec && !close;
    }

    void count(unsigned status) {
        if (status >= 100 && status < 600) {
            ++st.stats.responses_by_class[status / 100];
        }
    }
};

// Reads the request body from the client and sends it on the stream. Returns true when the
// whole body was read and queued.
template <class Stream>
asio::awaitable<bool> upload(client<Stream>& c, bhttp::request_parser<bhttp::buffer_body>& parser,
                             std::shared_ptr<mux::stream> s, bool& body_too_large) {
    // Beast reads only as much as the buffer's free capacity: make room for large reads.
    c.buffer.reserve(c.buffer.size() + body_chunk_bytes);
    auto chunk = std::make_unique_for_overwrite<std::uint8_t[]>(body_chunk_bytes);
    while (!parser.is_done()) {
        parser.get().body().data = chunk.get();
        parser.get().body().size = body_chunk_bytes;
        c.timers->arm(deadlines::read, c.st.opt.idle_timeout);
        // read_some hands over what arrived, so a slowly sent body flows on as it comes.
        auto [ec, n] =
            co_await bhttp::async_read_some(c.stream, c.buffer, parser, as_tuple(use_awaitable));
        c.timers->disarm(deadlines::read);
        if (ec == bhttp::error::need_buffer) {
            ec = {};
        }
        if (ec) {
            body_too_large = ec == bhttp::error::body_limit;
            if (body_too_large) {
                log::write_limited(log::level::warn, "request_rejected",
                                   {{"conn", c.conn},
                                    {"peer", c.peer},
                                    {"reason", "body larger than --max-body-size"}});
            }
            log::debug("request_body_failed",
                       {{"conn", c.conn}, {"stream", s->id()}, {"error", ec.message()}});
            s->reset(errc::cancel);
            co_return false;
        }
        auto got = body_chunk_bytes - parser.get().body().size;
        c.st.stats.bytes_from_clients += got;
        bool last = parser.is_done();
        if (got > 0 || last) {
            if (auto wec = co_await s->write({chunk.get(), got}, last)) {
                co_return false;
            }
        }
    }
    co_return true;
}

struct response_outcome {
    unsigned status = 0;
    bool complete = false;  // the whole response reached the client
    bool keep_alive = false;
    std::uint64_t body_bytes = 0;
};

// Waits for the response on the stream and writes it to the client.
template <class Stream>
asio::awaitable<response_outcome> download(client<Stream>& c, std::shared_ptr<mux::stream> s,
                                           bool head_request, bool http11, bool keep_alive,
                                           const bool& body_too_large) {
    response_outcome out;
    auto& opt = c.st.opt;

    auto head =
        co_await s->read_response_head(std::chrono::steady_clock::now() + opt.request_timeout);
    if (!head && head.error() == errc::timeout) {
        log::warn(
            "request_timeout",
            {{"conn", c.conn}, {"stream", s->id()}, {"timeout_ms", opt.request_timeout.count()}});
        s->reset(errc::timeout);
        out.status = 504;
        out.keep_alive = co_await c.fail(504, "timed out waiting for the vault's response", true);
        out.complete = true;
        co_return out;
    }
    if (!head && body_too_large) {
        // The upload stopped at --max-body-size and reset the stream: that is the reason.
        out.status = 413;
        out.keep_alive = co_await c.fail(413, "request body larger than the broker's limit", true);
        out.complete = true;
        co_return out;
    }
    if (!head) {
        auto ec = head.error();
        if (ec == errc::refused_stream ||
            (ec == errc::stream_reset_by_peer &&
             s->peer_reset_code() == static_cast<std::uint32_t>(errc::refused_stream))) {
            out.status = 503;
            out.keep_alive =
                co_await c.fail(503, "bridge refused the request; retry", !keep_alive, 1);
        } else {
            out.status = 502;
            out.keep_alive = co_await c.fail(
                502, "tunnel to the vault failed before a response arrived: " + ec.message(), true);
        }
        out.complete = true;
        co_return out;
    }

    auto status = head->status;
    out.status = status;
    auto& fields = head->fields;
    // The bridge filtered these already; a second pass keeps a faulty bridge from smuggling
    // connection-level fields to pods.
    std::erase_if(fields, [](const frame::field& f) { return taser::http::is_hop_by_hop(f.name); });
    bool no_body = head_request || status == 204 || status == 304 || status < 200;
    std::optional<std::uint64_t> length;
    if (auto cl = taser::http::find_field(fields, "content-length")) {
        length = parse_content_length(*cl);
        if (!length || taser::http::count_fields(fields, "content-length") > 1) {
            s->reset(errc::protocol_error);
            out.keep_alive = co_await c.fail(502, "bridge sent an invalid Content-Length", true);
            out.complete = true;
            co_return out;
        }
    }
    bool chunked = !no_body && !length && http11;
    if (!no_body && !length && !http11) {
        keep_alive = false;  // HTTP/1.0 has no chunked coding: the end of the body is the close
    }
    if (c.st.draining) {
        keep_alive = false;
    }

    std::string head_text;
    head_text.reserve(512);
    taser::http::append_status_line(head_text, status);
    taser::http::append_fields(head_text, fields);
    if (chunked) {
        head_text += "Transfer-Encoding: chunked\r\n";
    }
    if (!keep_alive) {
        head_text += "Connection: close\r\n";
    }
    head_text += "\r\n";
    c.count(status);
    response_batch batch;
    batch.append_text(head_text);

    std::uint64_t sent = 0;
    bool ended = no_body;
    if (no_body) {
        // Whatever the bridge still sends for this stream is not wanted.
        if (!s->remote_ended()) {
            s->reset(errc::cancel);
        }
    }
    for (;;) {
        // Gather what has arrived without waiting, then write it in one go.
        while (!ended && batch.size() < coalesce_bytes) {
            auto [status_now, chunk] = s->try_read();
            if (status_now == mux::stream::poll_result::empty) {
                break;
            }
            if (status_now == mux::stream::poll_result::error) {
                log::debug(
                    "response_body_failed",
                    {{"conn", c.conn}, {"stream", s->id()}, {"error", s->error().message()}});
                co_await c.write(batch.buffers());
                co_return out;  // the client sees a message cut short, never a short one
            }
            if (status_now == mux::stream::poll_result::end) {
                ended = true;
                if (length && sent != *length) {
                    log::warn("response_truncated", {{"conn", c.conn},
                                                     {"stream", s->id()},
                                                     {"expected", *length},
                                                     {"received", sent}});
                    co_await c.write(batch.buffers());
                    co_return out;
                }
                if (chunked) {
                    batch.append_text("0\r\n\r\n");
                }
                break;
            }
            sent += chunk.size();
            if (length && sent > *length) {
                log::warn("response_too_long",
                          {{"conn", c.conn}, {"stream", s->id()}, {"expected", *length}});
                s->reset(errc::protocol_error);
                co_await c.write(batch.buffers());
                co_return out;
            }
            if (chunked) {
                char size_line[24];
                auto [end, ec] = std::to_chars(size_line, size_line + 16, chunk.size(), 16);
                (void)ec;
                *end++ = '\r';
                *end++ = '\n';
                batch.append_text({size_line, end});
                batch.append_body(std::move(chunk));
                batch.append_text("\r\n");
            } else {
                batch.append_body(std::move(chunk));
            }
        }
        if (batch.size() > 0) {
            if (auto ec = co_await c.write(batch.buffers())) {
                log::debug("client_write_failed", {{"conn", c.conn}, {"error", ec.message()}});
                s->reset(errc::cancel);
                co_return out;
            }
            batch.clear();
        }
        if (ended) {
            break;
        }
        // Nothing buffered: wait for more, but not longer than a connection may stay idle.
        if (!co_await s->wait_readable(std::chrono::steady_clock::now() + opt.idle_timeout)) {
            log::warn(
                "response_stalled",
                {{"conn", c.conn}, {"stream", s->id()}, {"timeout_ms", opt.idle_timeout.count()}});
            s->reset(errc::timeout);
            co_return out;
        }
    }
    out.body_bytes = sent;
    out.complete = true;
    out.keep_alive = keep_alive;
    co_return out;
}

// Opens a byte tunnel stream and waits until the bridge reports that it reached the vault.
// Returns the stream, or null with the reason in `status`: 0 when no bridge took the stream,
// else the bridge's answer (503 when it cannot reach the vault) or 502 when none came.
asio::awaitable<std::shared_ptr<mux::stream>> open_tunnel(state& st, std::uint64_t conn,
                                                          std::string authority, unsigned& status) {
    auto session = co_await st.pool.acquire(st.opt.bridge_wait);
    if (!session) {
        ++st.stats.requests_no_bridge;
        log::write_limited(log::level::warn, "no_bridge",
                           {{"conn", conn}, {"wait_ms", st.opt.bridge_wait.count()}});
        status = 0;
        co_return nullptr;
    }
    auto opened = session->open({"CONNECT", std::move(authority), {}}, false);
    if (!opened) {
        status = 0;
        co_return nullptr;
    }
    auto s = *opened;
    auto head =
        co_await s->read_response_head(std::chrono::steady_clock::now() + st.opt.request_timeout);
    if (!head) {
        s->reset(errc::cancel);
        status = 502;
        co_return nullptr;
    }
    status = head->status;
    if (status != 200) {
        log::write_limited(log::level::warn, "tunnel_refused",
                           {{"conn", conn}, {"stream", s->id()}, {"status", status}});
        s->reset(errc::cancel);
        co_return nullptr;
    }
    co_return s;
}

// Serves CONNECT: only to the authorities of --allow-connect, and the answer 200 is sent only
// once the bridge reached the vault. The connection carries nothing else afterwards.
template <class Stream>
asio::awaitable<bool> connect_tunnel(client<Stream>& c, std::string authority) {
    auto& st = c.st;
    config::host_port asked;
    bool valid = true;
    try {
        asked = config::parse_host_port("CONNECT", authority);
    } catch (const config::invalid_value&) {
        valid = false;
    }
    if (!valid) {
        co_return co_await c.fail(400, "invalid CONNECT authority", true);
    }
    auto allowed =
        std::any_of(st.opt.connect_authorities.begin(), st.opt.connect_authorities.end(),
                    [&](const config::host_port& a) {
                        return a.port == asked.port && beast::iequals(a.host, asked.host);
                    });
    if (!allowed) {
        log::write_limited(log::level::warn, "request_rejected",
                           {{"conn", c.conn},
                            {"peer", c.peer},
                            {"reason", "CONNECT to an authority not allowed"},
                            {"authority", asked.to_string()}});
        co_return co_await c.fail(403, "CONNECT is allowed only to the vault's address", true);
    }

    unsigned status = 0;
    auto s = co_await open_tunnel(st, c.conn, asked.to_string(), status);
    if (!s) {
        std::string_view why = status == 0     ? "no bridge to the vault is connected; retry later"
                               : status == 503 ? "the bridge cannot reach the vault; retry later"
                                               : "the bridge refused or failed to open the tunnel";
        bool never_reached = status == 0 || status == 503;
        co_return co_await c.fail(never_reached ? 503 : 502, why, true, never_reached ? 1 : 0);
    }
    c.count(200);
    if (co_await c.write(
            asio::buffer(std::string_view("HTTP/1.1 200 Connection Established\r\n\r\n")))) {
        s->reset(errc::cancel);
        co_return false;
    }
    // Bytes the client sent right after its CONNECT head belong to the tunnel.
    auto first = static_cast<const std::uint8_t*>(c.buffer.data().data());
    std::vector<std::uint8_t> prefix(first, first + c.buffer.size());
    c.buffer.consume(c.buffer.size());
    ++st.stats.tunnels_total;
    auto counts =
        co_await mux::relay(c.stream, s, *c.timers, st.opt.tunnel_idle_timeout, std::move(prefix));
    st.stats.tunnel_bytes_up += counts.to_stream;
    st.stats.tunnel_bytes_down += counts.from_stream;
    log::debug("tunnel_closed", {{"conn", c.conn},
                                 {"stream", s->id()},
                                 {"bytes_up", counts.to_stream},
                                 {"bytes_down", counts.from_stream},
                                 {"clean", counts.clean}});
    co_return false;
}

// Serves one request whose header has been parsed. Returns whether the connection may serve
// another request.
template <class Stream>
asio::awaitable<bool> exchange(client<Stream>& c,
                               bhttp::request_parser<bhttp::buffer_body>& parser) {
    auto& st = c.st;
    auto& req = parser.get();
    auto started = std::chrono::steady_clock::now();
    ++st.stats.requests_total;

    // RFC 9112 §6.3: a message with both framings, or with conflicting lengths, could be read
    // differently by the vault; such requests are rejected, never repaired.
    std::size_t lengths = 0;
    std::size_t codings = 0;
    bool bad_coding = false;
    for (const auto& f : req) {
        if (beast::iequals(f.name_string(), "content-length")) {
            ++lengths;
        } else if (beast::iequals(f.name_string(), "transfer-encoding")) {
            ++codings;
            if (!beast::iequals(f.value(), "chunked")) {
                bad_coding = true;
            }
        }
    }
    if (lengths > 1 || (lengths && codings) || codings > 1 || bad_coding) {
        log::write_limited(
            log::level::warn, "request_rejected",
            {{"conn", c.conn}, {"peer", c.peer}, {"reason", "ambiguous body framing"}});
        co_return co_await c.fail(400,
                                  "ambiguous request framing (Content-Length and "
                                  "Transfer-Encoding)",
                                  true);
    }
    if (req.method() == bhttp::verb::connect) {
        co_return co_await connect_tunnel(c, std::string(req.target()));
    }
    auto target = taser::http::to_origin_form(req.target());
    if (!target) {
        log::write_limited(
            log::level::warn, "request_rejected",
            {{"conn", c.conn}, {"peer", c.peer}, {"reason", "invalid request target"}});
        co_return co_await c.fail(400, "invalid request target", true);
    }

    // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing for any
    // HTTP/1.0 hop in front of us, so the connection ends after this exchange.
    bool keep_alive = req.keep_alive() && !st.draining && !(req.version() < 11 && codings > 0);
    bool http11 = req.version() >= 11;
    bool head_request = req.method() == bhttp::verb::head;
    auto length = parser.content_length();
    bool has_body = parser.chunked() || (length && *length > 0);
    bool expect_continue = beast::iequals(req[bhttp::field::expect], "100-continue");

    frame::request_head head{std::string(req.method_string()), std::move(*target),
                             taser::http::end_to_end_fields(req, {"expect"})};
    // The tunnel carries at most frame::max_fields fields in a head; more are rejected here,
    // where the client can still be told why.
    if (head.fields.size() > frame::max_fields) {
        log::write_limited(
            log::level::warn, "request_rejected",
            {{"conn", c.conn}, {"peer", c.peer}, {"reason", "too many header fields"}});
        co_return co_await c.fail(431, "too many request header fields", true);
    }

    auto session = co_await st.pool.acquire(st.opt.bridge_wait);
    if (!session) {
        ++st.stats.requests_no_bridge;
        log::write_limited(log::level::warn, "no_bridge",
                           {{"conn", c.conn}, {"wait_ms", st.opt.bridge_wait.count()}});
        // An unread body leaves the connection unusable for another request.
        std::string_view why = st.pool.size() == 0
                                   ? "no bridge to the vault is connected; retry later"
                                   : "every bridge is at its stream limit or draining; retry later";
        co_return co_await c.fail(503, why, has_body || !keep_alive, 1);
    }
    auto opened = session->open(head, !has_body);
    // The fields went into the stream's HEADERS frame; only the target is logged at the end.
    std::exchange(head.fields, {});
    if (!opened) {
        if (opened.error() == errc::frame_size_error) {
            co_return co_await c.fail(431, "request header fields too large for the tunnel", true);
        }
        co_return co_await c.fail(503, "bridge cannot take more requests; retry later",
                                  has_body || !keep_alive, 1);
    }
    auto s = *opened;

    if (expect_continue && has_body) {
        if (co_await c.write(asio::buffer(continue_100))) {
            s->reset(errc::cancel);
            co_return false;
        }
    }

    // The body goes up while the response may already come down (Vault may answer early).
    bool upload_ok = !has_body;
    bool upload_running = has_body;
    bool body_too_large = false;
    net::event upload_finished(st.io.get_executor());
    if (has_body) {
        net::spawn(
            st.io.get_executor(),
            [&, s]() -> asio::awaitable<void> {
                upload_ok = co_await upload(c, parser, s, body_too_large);
                upload_running = false;
                upload_finished.notify();
            },
            "client_upload");
    }

    auto out = co_await download(c, s, head_request, http11, keep_alive, body_too_large);

    if (upload_running) {
        // The response is out (or failed) before the body was read: stop reading it. The
        // connection cannot carry another request because the rest of the body is unread.
        s->reset(errc::cancel);
        beast::get_lowest_layer(c.stream).cancel();
        while (upload_running) {
            co_await upload_finished.wait();
        }
        out.keep_alive = false;
    }
    if (!upload_ok) {
        out.keep_alive = false;
    }

    st.stats.request_duration.observe(std::chrono::steady_clock::now() - started);
    if (log::enabled(log::level::debug)) {
        auto elapsed = std::chrono::duration_cast<std::chrono::microseconds>(
            std::chrono::steady_clock::now() - started);
        // Redacted from the origin form, so that an absolute-form target cannot carry a token
        // past the check of its path.
        auto path = taser::http::loggable_path(head.target);
        log::debug("request", {{"conn", c.conn},
                               {"bridge_conn", s->conn_id()},
                               {"stream", s->id()},
                               {"method", req.method_string()},
                               {"path", path},
                               {"status", out.status},
                               {"complete", out.complete},
                               {"response_bytes", out.body_bytes},
                               {"duration_us", elapsed.count()}});
    }
    co_return out.complete&& out.keep_alive;
}

using tls_stream = asio::ssl::stream<tcp::socket>;

// What the coroutine of an accepted connection owns, passed as one parameter. Compilers
// destroy separate coroutine parameters in different orders, but members always in reverse
// order. So the registration, whose close function points to the stream, goes first, and the
// TLS context (null without TLS) outlives the stream made with it.
template <class Stream>
struct connection_parts {
    std::shared_ptr<asio::ssl::context> tls_context;
    Stream stream;
    client_registration reg;
};

// Serves one client connection: the TLS handshake when Stream is a TLS stream, then the
// requests one after another until one of them ends the connection, then the close. Each
// header block is checked for what Beast's parser would accept but a vault might read
// differently (obsolete line folding). It is one coroutine for the whole connection, because
// every frame counts when thousands of requests are held open at once.
template <class Stream>
asio::awaitable<void> serve_connection(state& st, connection_parts<Stream> parts,
                                       std::string peer) {
    auto& stream = parts.stream;
    auto& reg = parts.reg;
    auto close_socket = [&stream] {
        error_code e;
        beast::get_lowest_layer(stream).close(e);
    };
    auto timers = std::make_shared<deadlines>(st.io.get_executor(), close_socket);
    timers->start();
    net::deadlines_guard stop_timers(*timers);
    reg.entry().close = close_socket;
    const auto& opt = st.opt;

    if constexpr (std::is_same_v<Stream, tls_stream>) {
        timers->arm(deadlines::read, opt.header_timeout);
        auto [ec] = co_await stream.async_handshake(asio::ssl::stream_base::server,
                                                    as_tuple(use_awaitable));
        timers->disarm(deadlines::read);
        if (ec) {
            log::write_limited(log::level::warn, "client_handshake_failed",
                               {{"conn", reg.conn()}, {"peer", peer}, {"error", ec.message()}});
            ++st.stats.client_rejected_total;
            timers->stop();
            co_return;
        }
    }

    client<Stream> c{st, stream, reg.conn(), reg.entry(), std::move(peer), timers, read_buffer(st)};
    for (bool first = true; !st.draining; first = false) {
        c.entry.busy = false;
        timers->arm(deadlines::read, first ? opt.header_timeout : opt.idle_timeout);
        auto [ec, n] = co_await c.read_header_block(opt.max_header_bytes);
        timers->disarm(deadlines::read);
        if (ec) {
            if (ec == asio::error::not_found) {
                log::write_limited(
                    log::level::warn, "request_rejected",
                    {{"conn", c.conn}, {"peer", c.peer}, {"reason", "header too large"}});
                co_await c.fail(431, "request header fields too large", true);
            } else if (timers->expired()) {
                log::debug("client_timeout", {{"conn", c.conn}, {"peer", c.peer}});
            } else if (!ordinary_end(ec)) {
                log::debug("client_read_failed", {{"conn", c.conn}, {"error", ec.message()}});
            }
            break;
        }
        std::string_view block(static_cast<const char*>(c.buffer.data().data()), n);
        if (block.find("\r\n ") != std::string_view::npos ||
            block.find("\r\n\t") != std::string_view::npos) {
            log::write_limited(
                log::level::warn, "request_rejected",
                {{"conn", c.conn}, {"peer", c.peer}, {"reason", "obsolete line folding"}});
            co_await c.fail(400, "obsolete line folding in request header", true);
            break;
        }

        bhttp::request_parser<bhttp::buffer_body> parser;
        parser.header_limit(static_cast<std::uint32_t>(opt.max_header_bytes));
        parser.body_limit(opt.max_body_bytes);
        error_code pec;
        auto used = parser.put(asio::buffer(block), pec);
        if (!pec && !parser.is_header_done()) {
            pec = bhttp::error::partial_message;
        }
        if (pec) {
            log::write_limited(log::level::warn, "request_rejected",
                               {{"conn", c.conn}, {"peer", c.peer}, {"reason", pec.message()}});
            unsigned status = pec == bhttp::error::body_limit ? 413 : 400;
            co_await c.fail(status, "malformed request: " + pec.message(), true);
            break;
        }
        c.buffer.consume(used);
        if (c.buffer.size() == 0) {
            // Nothing read ahead: the buffer is not needed while the request is served, and
            // thousands of requests in flight would each hold one.
            c.buffer.shrink_to_fit();
        }
        c.entry.busy = true;
        if (!co_await exchange(c, parser)) {
            break;
        }
    }

    if constexpr (std::is_same_v<Stream, tls_stream>) {
        // close_notify, bounded by the write deadline, so the client can tell the end from a
        // cut.
        timers->arm(deadlines::write, std::chrono::seconds(2));
        co_await stream.async_shutdown(as_tuple(use_awaitable));
        timers->stop();
        close_socket();
    } else {
        timers->stop();
        error_code ignored;
        stream.shutdown(tcp::socket::shutdown_both, ignored);
    }
}

// Starts serving an accepted client connection, with or without TLS. Not a coroutine itself, so
// that the connection has one coroutine frame, not two.
asio::awaitable<void> serve_client(state& st, tcp::socket socket, client_registration reg) {
    error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    auto peer = net::format_endpoint(socket.remote_endpoint(ignored));
    log::debug("client_connected", {{"conn", reg.conn()}, {"peer", peer}});
    if (!st.client_tls) {
        return serve_connection(
            st, connection_parts<tcp::socket>{nullptr, std::move(socket), std::move(reg)},
            std::move(peer));
    }
    auto tls_context = st.client_tls->current();
    tls_stream stream(std::move(socket), *tls_context);
    return serve_connection(
        st, connection_parts<tls_stream>{std::move(tls_context), std::move(stream), std::move(reg)},
        std::move(peer));
}

// Passthrough: the connection's bytes, TLS records of the client's own session with the vault,
// go unread to the bridge as one tunnel stream.
asio::awaitable<void> serve_passthrough(state& st, connection_parts<tcp::socket> parts) {
    auto& socket = parts.stream;
    auto conn = parts.reg.conn();
    error_code ignored;
    socket.set_option(tcp::no_delay(true), ignored);
    auto close_socket = [&socket] {
        error_code e;
        socket.close(e);
    };
    parts.reg.entry().close = close_socket;
    auto timers = std::make_shared<deadlines>(st.io.get_executor(), close_socket);
    timers->start();
    net::deadlines_guard stop_timers(*timers);

    unsigned status = 0;
    auto s = co_await open_tunnel(st, conn, "passthrough", status);
    if (!s) {
        // Closed unanswered (a reset if the client already sent bytes): the client sees a
        // connection error and retries.
        log::debug("passthrough_refused", {{"conn", conn}, {"status", status}});
        timers->stop();
        co_return;
    }
    ++st.stats.tunnels_total;
    auto counts = co_await mux::relay(socket, s, *timers, st.opt.tunnel_idle_timeout);
    timers->stop();
    st.stats.tunnel_bytes_up += counts.to_stream;
    st.stats.tunnel_bytes_down += counts.from_stream;
    st.stats.bytes_from_clients += counts.to_stream;
    st.stats.bytes_to_clients += counts.from_stream;
    log::debug("tunnel_closed", {{"conn", conn},
                                 {"stream", s->id()},
                                 {"bytes_up", counts.to_stream},
                                 {"bytes_down", counts.from_stream},
                                 {"clean", counts.clean}});
}

}  // namespace

asio::awaitable<void> accept_clients(state& st, tcp::acceptor& acceptor, client_edge edge) {
    for (;;) {
        auto accepted = co_await net::accept_next(acceptor, "client");
        if (!accepted) {
            co_return;
        }
        auto socket = std::move(*accepted);
        if (st.clients.size() >= st.opt.max_client_connections) {
            ++st.stats.client_rejected_total;
            log::write_limited(log::level::warn, "client_rejected",
                               {{"reason", "max client connections reached"},
                                {"limit", st.opt.max_client_connections}});
            continue;  // the socket closes as it goes out of scope
        }
        ++st.stats.client_connections_total;
        auto conn = st.next_conn_id();
        // Setting up a connection can throw (no memory for its frame or its TLS session). Then
        // only that connection is lost, not the listener.
        try {
            client_registration reg(st, conn);
            if (edge == client_edge::passthrough) {
                net::spawn(
                    st.io.get_executor(),
                    serve_passthrough(st, connection_parts<tcp::socket>{nullptr, std::move(socket),
                                                                        std::move(reg)}),
                    "client_connection");
            } else {
                net::spawn(st.io.get_executor(),
                           serve_client(st, std::move(socket), std::move(reg)),
                           "client_connection");
            }
        } catch (const std::exception& e) {
            ++st.stats.client_rejected_total;
            log::write_limited(log::level::error, "client_setup_failed",
                               {{"conn", conn}, {"error", e.what()}});
        }
    }
}

}  // namespace taser::broker
