// SPDX-License-Identifier: Apache-2.0
// One tunnel connection and its streams (docs/protocol.md §4-§7).
#include "taser/mux/session.hpp"

#include <algorithm>
#include <cstring>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "taser/log/log.hpp"
#include "taser/net/spawn.hpp"

namespace taser::mux {
namespace {

// The writer gathers frames up to this size per pass, so that many small frames cost one pass.
constexpr std::size_t write_batch_bytes = 256 * 1024;
// Largest DATA payload that we send, whatever the peer allows: one TLS record's worth.
constexpr std::size_t data_frame_bytes = 16 * 1024;
// A batch goes to the socket in pieces of whole frames of about this size. Control frames
// queued meanwhile (RST_STREAM, PING, WINDOW_UPDATE) go out between two pieces. So on a slow
// link they wait behind one piece and the kernel's tunnel_notsent_lowat_bytes, not behind
// the rest of the batch, which can take 8 s at 256 kbit/s (256 KiB).
constexpr std::size_t write_piece_bytes = frame::header_size + data_frame_bytes;
constexpr std::size_t read_chunk_bytes = 64 * 1024;
// Received DATA is kept in chunks of up to this size.
constexpr std::size_t coalesce_bytes = 64 * 1024;
// PINGs a peer may send in one second before it is cut off for flooding.
constexpr std::uint32_t max_pings_per_second = 100;
// Time that a closing session gives its writer to flush GOAWAY before the socket is closed.
constexpr auto flush_timeout = std::chrono::seconds(1);

std::uint32_t to_u32(std::int64_t v) {
    return static_cast<std::uint32_t>(v);
}

// Size of the whole frame that starts at out[at], read back from the header we encoded.
std::size_t frame_size_at(const std::vector<std::uint8_t>& out, std::size_t at) {
    return frame::header_size + frame::decode_length(out.data() + at);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// stream

stream::stream(std::shared_ptr<session> s, std::uint32_t id, std::uint32_t send_window,
               std::uint32_t recv_window)
    : session_(std::move(s)),
      id_(id),
      recv_window_(recv_window),
      readable_(session_->executor_),
      send_window_(send_window),
      writable_(session_->executor_) {}

stream::~stream() {
    drop_inbox();
    drop_outbox();
    session_->request_head_bytes_ -= request_bytes_;
}

void stream::drop_outbox() {
    if (outbox_.size() == 0) {
        return;
    }
    session_->queued_send_bytes_ -= outbox_.size();
    outbox_.consume(outbox_.size());
    if (session_->send_space_waiters_ > 0) {
        session_->send_space_.notify();
    }
}

std::uint64_t stream::conn_id() const noexcept {
    return session_->id();
}

const asio::any_io_executor& stream::session_executor() const noexcept {
    return session_->executor_;
}

void stream::drop_inbox() {
    if (inbox_bytes_ == 0) {
        return;
    }
    session_->buffered_bytes_ -= inbox_bytes_;
    inbox_bytes_ = 0;
    inbox_.clear();
    session_->return_connection_credit();
}

void stream::wake() {
    readable_.notify();
    writable_.notify();
}

void stream::fail(error_code ec) {
    if (error_) {
        return;
    }
    error_ = ec;
    drop_outbox();
    wake();
    if (auto fn = std::move(on_failure_)) {
        on_failure_ = nullptr;
        fn();
    }
}

asio::awaitable<frame::result<frame::response_head>> stream::read_response_head(
    std::chrono::steady_clock::time_point deadline) {
    auto self = shared_from_this();
    for (;;) {
        if (response_) {
            co_return std::move(*response_);
        }
        if (error_) {
            co_return error_;
        }
        if (co_await readable_.wait_until(deadline)) {
            co_return make_error_code(errc::timeout);
        }
    }
}

std::pair<stream::poll_result, std::vector<std::uint8_t>> stream::try_read() {
    if (!inbox_.empty()) {
        auto chunk = inbox_.pop_front();
        inbox_bytes_ -= chunk.size();
        session_->buffered_bytes_ -= chunk.size();
        recv_unreturned_ += static_cast<std::uint32_t>(chunk.size());
        session_->return_stream_credit(*this);
        session_->return_connection_credit();
        return {poll_result::data, std::move(chunk)};
    }
    // A peer that sent END_STREAM finished its message, whatever happened afterwards.
    if (remote_ended_) {
        return {poll_result::end, {}};
    }
    if (error_) {
        return {poll_result::error, {}};
    }
    return {poll_result::empty, {}};
}

asio::awaitable<std::tuple<error_code, std::vector<std::uint8_t>>> stream::read() {
    auto self = shared_from_this();
    for (;;) {
        auto [status, chunk] = try_read();
        switch (status) {
            case poll_result::data:
            case poll_result::end:
                co_return std::tuple{error_code{}, std::move(chunk)};
            case poll_result::error:
                co_return std::tuple{error_, std::vector<std::uint8_t>{}};
            case poll_result::empty:
                break;
        }
        co_await readable_.wait();
    }
}

asio::awaitable<bool> stream::wait_readable(std::chrono::steady_clock::time_point deadline) {
    auto self = shared_from_this();
    while (inbox_.empty() && !remote_ended_ && !error_) {
        if (co_await readable_.wait_until(deadline)) {
            co_return false;
        }
    }
    co_return true;
}

asio::awaitable<void> stream::wait_failed() {
    auto self = shared_from_this();
    while (!error_) {
        co_await readable_.wait();
    }
}

error_code stream::write_response_head(const frame::response_head& head, bool end_stream) {
    if (error_) {
        return error_;
    }
    auto payload = frame::encode_response_head(head);
    const auto& peer = session_->peer_hello_.settings;
    if (payload.size() > peer.max_header_block || payload.size() > peer.max_frame_payload) {
        return make_error_code(errc::frame_size_error);
    }
    session_->queue_control(frame::frame_type::headers, end_stream ? frame::flag::end_stream : 0,
                            id_, payload);
    if (end_stream) {
        local_ended_ = true;
        fin_sent_ = true;
        if (remote_ended_) {
            session_->forget(id_);
        }
    }
    return {};
}

asio::awaitable<error_code> stream::write(frame::bytes data, bool end_stream) {
    auto self = shared_from_this();
    for (;;) {
        if (error_) {
            co_return error_;
        }
        if (outbox_.size() >= session_->options_.stream_send_buffer_bytes) {
            co_await writable_.wait();
            continue;
        }
        if (!data.empty() &&
            session_->queued_send_bytes_ >= session_->options_.session_send_buffer_bytes) {
            ++session_->send_space_waiters_;
            co_await session_->send_space_.wait();
            --session_->send_space_waiters_;
            continue;
        }
        break;
    }
    if (local_ended_) {
        co_return make_error_code(errc::stream_closed);
    }
    if (!data.empty()) {
        auto room = outbox_.prepare(data.size());
        std::memcpy(room.data(), data.data(), data.size());
        outbox_.commit(data.size());
        session_->queued_send_bytes_ += data.size();
    }
    local_ended_ = end_stream;
    session_->schedule(self);
    co_return error_code{};
}

void stream::reset(errc code) {
    if (!error_ && !(fin_sent_ && remote_ended_)) {
        session_->queue_reset(id_, code);
    }
    drop_inbox();
    fail(make_error_code(code));
    session_->forget(id_);
}

// ---------------------------------------------------------------------------------------------
// session

session::session(std::unique_ptr<transport> t, const asio::any_io_executor& ex, session_options o,
                 std::uint64_t conn_id)
    : transport_(std::move(t)),
      executor_(ex),
      options_(o),
      conn_id_(conn_id),
      buffer_(frame::header_size + o.local.max_frame_payload + read_chunk_bytes),
      conn_recv_window_(o.local.initial_connection_window),
      send_space_(ex),
      writer_wake_(ex),
      writer_done_(ex),
      keepalive_timer_(ex),
      probe_answer_(ex),
      idle_(ex) {}

session::~session() = default;

bool session::can_open() const noexcept {
    return hello_done_ && !closed_ && !closing_ && !draining() &&
           streams_.size() < peer_hello_.settings.max_concurrent_streams &&
           last_stream_id_ < frame::max_stream_id;
}

asio::awaitable<error_code> session::fill(std::size_t n) {
    while (buffer_.size() < n) {
        auto room = buffer_.max_size() - buffer_.size();
        auto want = std::min(room, std::max(n - buffer_.size(), read_chunk_bytes));
        auto [ec, got] = co_await transport_->read_some(buffer_.prepare(want));
        if (ec) {
            co_return ec;
        }
        buffer_.commit(got);
        bytes_received_ += got;
    }
    co_return error_code{};
}

asio::awaitable<error_code> session::handshake() {
    auto self = shared_from_this();
    frame::hello ours{frame::protocol_version, options_.role, options_.instance, options_.local};
    std::vector<std::uint8_t> out;
    frame::append_frame(out, frame::frame_type::hello, 0, 0, frame::encode_hello(ours));

    // A watchdog closes the socket at the deadline, which ends the pending read or write.
    // The flag is shared with the handler, which may run after this frame is gone when the
    // deadline passes in the same round as the handshake's end.
    asio::steady_timer deadline(executor_, options_.hello_timeout);
    auto expired = std::make_shared<bool>(false);
    deadline.async_wait([self, expired](error_code ec) {
        if (!ec && !self->hello_done_) {
            *expired = true;
            self->transport_->close();
        }
    });

    auto [wec, written] = co_await transport_->write_all(asio::buffer(out));
    bytes_sent_ += written;
    error_code ec = wec;
    if (!ec) {
        ec = co_await fill(frame::header_size);
    }
    frame::frame_header h;
    if (!ec) {
        auto decoded = frame::decode_header(
            {static_cast<const std::uint8_t*>(buffer_.data().data()), frame::header_size},
            frame::min_max_frame_payload);
        if (!decoded) {
            ec = connection_error(errc::frame_size_error, "invalid first frame");
        } else if (decoded->type != frame::frame_type::hello) {
            ec = connection_error(errc::protocol_error, "frame before HELLO");
        } else {
            h = *decoded;
        }
    }
    if (!ec) {
        ec = co_await fill(frame::header_size + h.length);
    }
    if (!ec) {
        auto data = static_cast<const std::uint8_t*>(buffer_.data().data());
        // The version comes first, so that a later layout of HELLO still gets a clear answer.
        auto version = static_cast<std::uint16_t>((data[frame::header_size] << 8) |
                                                  data[frame::header_size + 1]);
        auto hello = frame::decode_hello({data + frame::header_size, h.length});
        if (version != frame::protocol_version) {
            log::error("version_mismatch", {{"conn", conn_id_},
                                            {"peer_version", version},
                                            {"our_version", frame::protocol_version}});
            ec = connection_error(errc::version_mismatch, "unsupported protocol version");
        } else if (!hello) {
            ec = connection_error(static_cast<errc>(to_wire_code(hello.error())), "invalid HELLO");
        } else if (hello->role == options_.role) {
            ec = connection_error(errc::protocol_error, "peer has the same role");
        } else {
            peer_hello_ = *hello;
            buffer_.consume(frame::header_size + h.length);
        }
    }
    deadline.cancel();
    bool timed_out = *expired;
    if (timed_out) {
        ec = make_error_code(errc::timeout);
    }
    if (ec) {
        // Tell the peer why, if the socket still works, then give up.
        if (!control_.empty() && !timed_out) {
            out.clear();
            take_control(out);
            co_await transport_->write_all(asio::buffer(out));
        }
        close(ec);
        co_return ec;
    }

    hello_done_ = true;
    conn_send_window_ = peer_hello_.settings.initial_connection_window;
    co_return error_code{};
}

asio::awaitable<error_code> session::run() {
    auto self = shared_from_this();
    writer_running_ = true;
    net::spawn(executor_, write_loop(), "session_write_loop");
    net::spawn(executor_, keepalive_loop(), "session_keepalive_loop");

    auto ec = co_await read_loop();

    if (!closed_) {
        // Let the writer flush a queued GOAWAY, then close whatever state it is in.
        closing_ = true;
        writer_wake_.notify();
        asio::steady_timer deadline(executor_, flush_timeout);
        deadline.async_wait([self, ec](error_code timer_ec) {
            if (!timer_ec) {
                self->close(ec);
            }
        });
        while (writer_running_) {
            co_await writer_done_.wait();
        }
        deadline.cancel();
        if (!closed_) {
            // Closing a socket with unread input makes the kernel send a reset, which can
            // destroy the GOAWAY just written before the peer reads it. So the sending side is
            // shut first and the input read and dropped for a moment.
            transport_->shutdown_send();
            asio::steady_timer linger(executor_, flush_timeout);
            linger.async_wait([self](error_code timer_ec) {
                if (!timer_ec) {
                    self->transport_->close();
                }
            });
            std::vector<std::uint8_t> sink(read_chunk_bytes);
            for (;;) {
                auto [rec, n] = co_await transport_->read_some(asio::buffer(sink));
                if (rec) {
                    break;
                }
            }
            linger.cancel();
        }
        close(ec);
    }
    while (writer_running_) {
        co_await writer_done_.wait();
    }
    co_return close_reason_;
}

void session::close(error_code reason) {
    if (closed_) {
        return;
    }
    closed_ = true;
    closing_ = true;
    close_reason_ = reason;
    transport_->close();
    keepalive_timer_.cancel();
    writer_wake_.notify();

    auto streams = std::move(streams_);
    streams_.clear();
    for (auto& [id, s] : streams) {
        s->fail(make_error_code(errc::session_closed));
    }
    ready_.clear();
    conn_blocked_.clear();
    control_.clear();
    send_space_.notify();
    idle_.notify();
}

void session::goaway(errc code, std::string_view reason) {
    if (goaway_sent_ || closed_) {
        return;
    }
    goaway_sent_ = true;
    frame::goaway g{last_stream_id_, static_cast<std::uint32_t>(code), std::string(reason)};
    queue_control(frame::frame_type::goaway, 0, 0, frame::encode_goaway(g));
    log::info("goaway_sent", {{"conn", conn_id_},
                              {"last_stream", last_stream_id_},
                              {"code", wire_code_name(static_cast<std::uint32_t>(code))}});
}

asio::awaitable<bool> session::probe(std::chrono::milliseconds timeout) {
    auto self = shared_from_this();
    if (closed_ || closing_) {
        co_return false;
    }
    // The top bit keeps probe payloads apart from the keepalive's counter.
    probe_payload_ = (std::uint64_t{1} << 63) | ++ping_counter_;
    probe_answered_ = false;
    std::array<std::uint8_t, 8> payload{};
    for (int i = 0; i < 8; ++i) {
        payload[static_cast<std::size_t>(i)] =
            static_cast<std::uint8_t>(probe_payload_ >> (56 - 8 * i));
    }
    queue_control(frame::frame_type::ping, 0, 0, payload);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!probe_answered_ && !closed_) {
        if (co_await probe_answer_.wait_until(deadline)) {
            break;
        }
    }
    probe_payload_ = 0;
    co_return probe_answered_;
}

asio::awaitable<void> session::wait_idle() {
    auto self = shared_from_this();
    while (!streams_.empty() && !closed_) {
        co_await idle_.wait();
    }
}

frame::result<std::shared_ptr<stream>> session::open(const frame::request_head& head,
                                                     bool end_stream) {
    if (!can_open()) {
        return make_error_code(errc::refused_stream);
    }
    auto payload = frame::encode_request_head(head);
    const auto& peer = peer_hello_.settings;
    if (payload.size() > peer.max_header_block || payload.size() > peer.max_frame_payload) {
        return make_error_code(errc::frame_size_error);
    }
    auto id = ++last_stream_id_;
    if (id == frame::max_stream_id) {
        // The last id: after this stream the connection can open no more, so the bridge is
        // asked to dial a fresh one.
        goaway(errc::no_error, "stream ids exhausted");
    }
    auto s = std::make_shared<stream>(shared_from_this(), id, peer.initial_stream_window,
                                      options_.local.initial_stream_window);
    s->local_ended_ = end_stream;
    s->fin_sent_ = end_stream;
    streams_.emplace(id, s);
    queue_control(frame::frame_type::headers, end_stream ? frame::flag::end_stream : 0, id,
                  payload);
    return s;
}

// --- reading ---------------------------------------------------------------------------------

asio::awaitable<error_code> session::read_loop() {
    auto self = shared_from_this();
    for (;;) {
        if (auto ec = co_await fill(frame::header_size)) {
            // A peer that announced GOAWAY and then closed ended the connection on purpose.
            bool ordinary = ec == asio::error::eof || ec == asio::ssl::error::stream_truncated;
            co_return goaway_received_&& ordinary&& buffer_.size() == 0 ? error_code{} : ec;
        }
        auto data = static_cast<const std::uint8_t*>(buffer_.data().data());
        auto h = frame::decode_header({data, frame::header_size}, options_.local.max_frame_payload);
        if (!h) {
            auto code = static_cast<errc>(to_wire_code(h.error()));
            co_return connection_error(code, code == errc::frame_size_error
                                                 ? "frame length above max_frame_payload"
                                                 : "invalid frame header");
        }

        if (auto ec = co_await fill(frame::header_size + h->length)) {
            co_return ec;
        }
        data = static_cast<const std::uint8_t*>(buffer_.data().data());
        if (log::enabled(log::level::trace)) {
            log::trace("frame_received", {{"conn", conn_id_},
                                          {"stream", h->stream_id},
                                          {"type", static_cast<unsigned>(h->type)},
                                          {"flags", static_cast<unsigned>(h->flags)},
                                          {"length", h->length}});
        }
        if (auto ec = dispatch(*h, {data + frame::header_size, h->length})) {
            co_return ec;
        }
        buffer_.consume(frame::header_size + h->length);
        if (closed_) {
            co_return close_reason_;
        }
    }
}

error_code session::dispatch(const frame::frame_header& h, frame::bytes payload) {
    switch (h.type) {
        case frame::frame_type::hello:
            return connection_error(errc::protocol_error, "second HELLO");
        case frame::frame_type::headers:
            return on_headers(h, payload);
        case frame::frame_type::data:
            return on_data(h, payload);
        case frame::frame_type::window_update:
            return on_window_update(h, payload);
        case frame::frame_type::rst_stream:
            return on_rst_stream(h, payload);
        case frame::frame_type::ping:
            return on_ping(h, payload);
        case frame::frame_type::goaway:
            return on_goaway_frame(payload);
    }
    return connection_error(errc::protocol_error, "unknown frame type");
}

bool session::known_closed(std::uint32_t stream_id) const noexcept {
    return stream_id <= last_stream_id_ && !streams_.contains(stream_id);
}

error_code session::on_headers(const frame::frame_header& h, frame::bytes payload) {
    if (h.length > options_.local.max_header_block) {
        return connection_error(errc::frame_size_error, "header block above max_header_block",
                                h.stream_id);
    }
    bool end_stream = h.flags & frame::flag::end_stream;

    if (options_.role == frame::role::bridge) {
        // §5.2: only the broker opens streams, with ids that only grow.
        if (h.stream_id <= last_stream_id_) {
            return connection_error(errc::stream_closed, "HEADERS on a stream id already used",
                                    h.stream_id);
        }
        last_stream_id_ = h.stream_id;
        if (goaway_sent_ || closing_) {
            queue_reset(h.stream_id, errc::refused_stream);
            return {};
        }
        if (streams_.size() >= options_.local.max_concurrent_streams) {
            log::write_limited(log::level::warn, "stream_refused",
                               {{"conn", conn_id_},
                                {"stream", h.stream_id},
                                {"reason", "max_concurrent_streams reached"}});
            queue_reset(h.stream_id, errc::refused_stream);
            return {};
        }
        if (request_head_bytes_ + h.length > options_.request_head_budget_bytes) {
            log::write_limited(log::level::warn, "stream_refused",
                               {{"conn", conn_id_},
                                {"stream", h.stream_id},
                                {"reason", "request heads of open streams above their budget"},
                                {"budget_bytes", options_.request_head_budget_bytes}});
            queue_reset(h.stream_id, errc::refused_stream);
            return {};
        }
        auto head = frame::decode_request_head(payload);
        if (!head) {
            log::warn("stream_error", {{"conn", conn_id_},
                                       {"stream", h.stream_id},
                                       {"code", "protocol_error"},
                                       {"error", "malformed request head"}});
            queue_reset(h.stream_id, errc::protocol_error);
            return {};
        }
        auto s = std::make_shared<stream>(shared_from_this(), h.stream_id,
                                          peer_hello_.settings.initial_stream_window,
                                          options_.local.initial_stream_window);
        s->request_ = std::move(*head);
        s->request_bytes_ = h.length;
        request_head_bytes_ += h.length;
        s->remote_ended_ = end_stream;
        streams_.emplace(h.stream_id, s);
        if (on_stream) {
            on_stream(s);
        } else {
            s->reset(errc::refused_stream);
        }
        return {};
    }

    if (h.stream_id > last_stream_id_) {
        return connection_error(errc::protocol_error, "HEADERS on a stream the broker never opened",
                                h.stream_id);
    }
    auto it = streams_.find(h.stream_id);
    if (it == streams_.end()) {
        return {};  // a stream we reset or gave up; its answer is no longer wanted
    }
    auto s = it->second;
    if (s->response_ || s->remote_ended_) {
        stream_error(s, errc::protocol_error, "second response head");
        return {};
    }
    auto head = frame::decode_response_head(payload);
    if (!head || head->status < 200) {
        stream_error(s, errc::protocol_error, "malformed response head");
        return {};
    }
    s->response_ = std::move(*head);
    s->remote_ended_ = end_stream;
    s->wake();
    if (end_stream && s->fin_sent_) {
        forget(h.stream_id);
    }
    return {};
}

error_code session::on_data(const frame::frame_header& h, frame::bytes payload) {
    if (h.length > conn_recv_window_) {
        return connection_error(errc::flow_control_error, "DATA beyond the connection window",
                                h.stream_id);
    }
    conn_recv_window_ -= h.length;
    conn_unreturned_ += h.length;

    auto it = streams_.find(h.stream_id);
    if (it == streams_.end()) {
        if (h.stream_id > last_stream_id_) {
            return connection_error(errc::protocol_error, "DATA on a stream never opened",
                                    h.stream_id);
        }
        // §6.2: DATA for a stream that is already closed still counts against the connection
        // window, and its credit comes back at once.
        return_connection_credit();
        return {};
    }
    auto s = it->second;
    if (s->remote_ended_) {
        return_connection_credit();
        stream_error(s, errc::stream_closed, "DATA after END_STREAM");
        return {};
    }
    if (options_.role == frame::role::broker && !s->response_) {
        return_connection_credit();
        stream_error(s, errc::protocol_error, "DATA before the response head");
        return {};
    }
    if (h.length > s->recv_window_) {
        return connection_error(errc::flow_control_error, "DATA beyond the stream window",
                                h.stream_id);
    }
    s->recv_window_ -= h.length;
    if (h.length > 0) {
        // Small payloads join the last buffered chunk, so that a peer sending one-byte frames
        // costs memory for its bytes, not for a buffer per frame.
        if (!s->inbox_.empty() && s->inbox_.back().size() + h.length <= coalesce_bytes) {
            auto& back = s->inbox_.back();
            back.insert(back.end(), payload.begin(), payload.end());
        } else {
            auto& chunk = s->inbox_.emplace_back();
            // A full-size frame is likely part of a large body: room for the frames after it
            // saves copying the chunk as it grows.
            chunk.reserve(h.length >= data_frame_bytes ? coalesce_bytes : h.length);
            chunk.assign(payload.begin(), payload.end());
        }
        s->inbox_bytes_ += h.length;
        buffered_bytes_ += h.length;
    }
    if (h.flags & frame::flag::end_stream) {
        s->remote_ended_ = true;
        if (s->fin_sent_) {
            forget(h.stream_id);
        }
    }
    s->readable_.notify();
    return_connection_credit();
    return {};
}

error_code session::on_window_update(const frame::frame_header& h, frame::bytes payload) {
    auto increment = frame::decode_window_update(payload);
    if (!increment) {
        return connection_error(errc::protocol_error, "WINDOW_UPDATE of 0 or above 2^31-1",
                                h.stream_id);
    }
    if (h.stream_id == 0) {
        conn_send_window_ += *increment;
        if (conn_send_window_ > frame::max_window) {
            return connection_error(errc::flow_control_error, "connection window above 2^31-1");
        }
        for (auto& s : conn_blocked_) {
            s->scheduled_ = false;  // it left the ready list when it was parked here
            schedule(s);
        }
        conn_blocked_.clear();
        writer_wake_.notify();
        return {};
    }
    auto it = streams_.find(h.stream_id);
    if (it == streams_.end()) {
        if (h.stream_id > last_stream_id_) {
            return connection_error(errc::protocol_error, "WINDOW_UPDATE on a stream never opened",
                                    h.stream_id);
        }
        return {};
    }
    auto s = it->second;
    s->send_window_ += *increment;
    if (s->send_window_ > frame::max_window) {
        stream_error(s, errc::flow_control_error, "stream window above 2^31-1");
        return {};
    }
    if (s->outbox_.size() > 0 || (s->local_ended_ && !s->fin_sent_)) {
        schedule(s);
    }
    return {};
}

error_code session::on_rst_stream(const frame::frame_header& h, frame::bytes payload) {
    auto it = streams_.find(h.stream_id);
    if (it == streams_.end()) {
        if (h.stream_id > last_stream_id_) {
            return connection_error(errc::protocol_error, "RST_STREAM on a stream never opened",
                                    h.stream_id);
        }
        return {};
    }
    auto s = it->second;
    s->peer_reset_code_ = frame::decode_u32(payload.data());
    log::debug("stream_reset_by_peer", {{"conn", conn_id_},
                                        {"stream", h.stream_id},
                                        {"code", wire_code_name(s->peer_reset_code_)}});
    // A reset after END_STREAM only stops our sending side (for example, the bridge has the
    // whole response and needs no more request body), so the data already received stays.
    if (!s->remote_ended_) {
        s->drop_inbox();
    }
    s->fail(make_error_code(errc::stream_reset_by_peer));
    forget(h.stream_id);
    return {};
}

error_code session::on_ping(const frame::frame_header& h, frame::bytes payload) {
    if (h.flags & frame::flag::ack) {
        std::uint64_t echoed = 0;
        for (auto b : payload) {
            echoed = (echoed << 8) | b;
        }
        if (probe_payload_ != 0 && echoed == probe_payload_) {
            probe_answered_ = true;
            probe_answer_.notify();
            return {};
        }
        if (ping_sent_ && echoed == ping_counter_) {
            rtt_ = std::chrono::duration_cast<std::chrono::microseconds>(
                std::chrono::steady_clock::now() - *ping_sent_);
            ping_sent_.reset();
            log::trace("ping_acknowledged", {{"conn", conn_id_}, {"rtt_us", rtt_->count()}});
        }
        return {};
    }
    if (control_.size() >= options_.max_queued_control_frames) {
        return connection_error(errc::enhance_your_calm, "control frame queue full");
    }
    // A peer's keepalive sends a PING every few seconds; hundreds in one second are a flood,
    // whether or not the answers still fit in the socket buffers.
    auto now = std::chrono::steady_clock::now();
    if (now - ping_window_start_ >= std::chrono::seconds(1)) {
        ping_window_start_ = now;
        pings_in_window_ = 0;
    }
    if (++pings_in_window_ > max_pings_per_second) {
        return connection_error(errc::enhance_your_calm, "PING flood");
    }
    queue_control(frame::frame_type::ping, frame::flag::ack, 0, payload);
    return {};
}

error_code session::on_goaway_frame(frame::bytes payload) {
    auto g = frame::decode_goaway(payload);
    if (!g) {
        return connection_error(errc::frame_size_error, "malformed GOAWAY");
    }
    goaway_received_ = true;
    peer_last_stream_id_ = g->last_stream_id;
    log::info("goaway_received", {{"conn", conn_id_},
                                  {"last_stream", g->last_stream_id},
                                  {"code", wire_code_name(g->error_code)},
                                  {"reason", g->debug.substr(0, 200)}});
    if (options_.role == frame::role::broker) {
        // §5.6: streams above last_stream_id were not processed, so they may be retried.
        std::vector<std::shared_ptr<stream>> refused;
        for (auto& [id, s] : streams_) {
            if (id > g->last_stream_id) {
                refused.push_back(s);
            }
        }
        for (auto& s : refused) {
            s->fail(make_error_code(errc::refused_stream));
            forget(s->id());
        }
    }
    if (on_goaway) {
        on_goaway();
    }
    return {};
}

error_code session::connection_error(errc code, std::string_view what, std::uint32_t stream_id) {
    log::write_limited(log::level::warn, "connection_error",
                       {{"conn", conn_id_},
                        {"stream", stream_id},
                        {"code", wire_code_name(static_cast<std::uint32_t>(code))},
                        {"error", what}});
    if (!goaway_sent_ && !closed_) {
        goaway_sent_ = true;
        frame::goaway g{last_stream_id_, static_cast<std::uint32_t>(code), std::string(what)};
        queue_control(frame::frame_type::goaway, 0, 0, frame::encode_goaway(g));
    }
    closing_ = true;
    return make_error_code(code);
}

void session::stream_error(const std::shared_ptr<stream>& s, errc code, std::string_view what) {
    log::write_limited(log::level::warn, "stream_error",
                       {{"conn", conn_id_},
                        {"stream", s->id()},
                        {"code", wire_code_name(static_cast<std::uint32_t>(code))},
                        {"error", what}});
    s->reset(code);
}

// --- writing ---------------------------------------------------------------------------------

void session::queue_reset(std::uint32_t stream_id, errc code) {
    queue_control(frame::frame_type::rst_stream, 0, stream_id,
                  frame::encode_u32(static_cast<std::uint32_t>(code)));
}

void session::queue_control(frame::frame_type type, std::uint8_t flags, std::uint32_t stream_id,
                            frame::bytes payload) {
    if (closed_) {
        return;
    }
    // A peer that makes us answer (PING, resets, credit) but never reads would grow this queue
    // without end.
    if (control_.size() >= options_.max_queued_control_frames &&
        type != frame::frame_type::goaway) {
        log::write_limited(log::level::warn, "connection_error",
                           {{"conn", conn_id_},
                            {"code", "enhance_your_calm"},
                            {"error", "control frame queue full: the peer does not read"}});
        close(make_error_code(errc::enhance_your_calm));
        return;
    }
    std::vector<std::uint8_t> f;
    f.reserve(frame::header_size + payload.size());
    frame::append_frame(f, type, flags, stream_id, payload);
    control_.push_back(std::move(f));
    writer_wake_.notify();
}

void session::schedule(const std::shared_ptr<stream>& s) {
    if (s->scheduled_ || s->error_ || closed_) {
        return;
    }
    s->scheduled_ = true;
    ready_.push_back(s);
    writer_wake_.notify();
}

void session::forget(std::uint32_t stream_id) {
    if (streams_.erase(stream_id) && streams_.empty()) {
        idle_.notify();
    }
}

void session::return_connection_credit() {
    if (closed_) {
        return;
    }
    std::uint64_t budget = options_.buffer_budget_bytes;
    std::uint64_t withheld = buffered_bytes_ > budget ? buffered_bytes_ - budget : 0;
    if (conn_unreturned_ <= withheld) {
        return;
    }
    auto returnable = conn_unreturned_ - withheld;
    auto threshold = std::max<std::uint64_t>(options_.local.initial_connection_window / 4, 1);
    if (returnable < threshold) {
        return;
    }
    conn_unreturned_ -= returnable;
    conn_recv_window_ += static_cast<std::int64_t>(returnable);
    queue_control(frame::frame_type::window_update, 0, 0,
                  frame::encode_u32(static_cast<std::uint32_t>(returnable)));
}

void session::return_stream_credit(stream& s) {
    if (s.remote_ended_ || s.error_ || closed_) {
        return;
    }
    auto threshold = std::max<std::uint32_t>(options_.local.initial_stream_window / 4, 1);
    if (s.recv_unreturned_ < threshold) {
        return;
    }
    s.recv_window_ += s.recv_unreturned_;
    queue_control(frame::frame_type::window_update, 0, s.id_,
                  frame::encode_u32(s.recv_unreturned_));
    s.recv_unreturned_ = 0;
}

void session::fill_data() {
    auto max_payload = std::min<std::int64_t>(peer_hello_.settings.max_frame_payload,
                                              std::int64_t{data_frame_bytes});
    while (!ready_.empty() && out_.size() < write_batch_bytes) {
        auto s = std::move(ready_.front());
        ready_.pop_front();
        s->scheduled_ = false;
        if (s->error_ || s->fin_sent_) {
            continue;
        }
        auto pending = static_cast<std::int64_t>(s->outbox_.size());
        auto n = std::min({pending, s->send_window_, conn_send_window_, max_payload});
        n = std::max<std::int64_t>(n, 0);
        bool fin = s->local_ended_ && n == pending;
        if (n == 0 && !fin) {
            if (s->send_window_ > 0 && conn_send_window_ <= 0) {
                s->scheduled_ = true;
                conn_blocked_.push_back(std::move(s));
            }
            // Blocked on its own window: the peer's WINDOW_UPDATE schedules it again.
            continue;
        }

        auto at = out_.size();
        out_.resize(at + frame::header_size + static_cast<std::size_t>(n));
        frame::encode_header({to_u32(n), frame::frame_type::data,
                              fin ? frame::flag::end_stream : std::uint8_t{0}, s->id_},
                             out_.data() + at);
        if (n > 0) {
            std::memcpy(out_.data() + at + frame::header_size, s->outbox_.data().data(),
                        static_cast<std::size_t>(n));
        }
        s->outbox_.consume(static_cast<std::size_t>(n));
        queued_send_bytes_ -= static_cast<std::size_t>(n);
        s->send_window_ -= n;
        conn_send_window_ -= n;

        if (fin) {
            s->fin_sent_ = true;
            if (s->remote_ended_) {
                forget(s->id_);
            }
        } else if (s->outbox_.size() > 0) {
            s->scheduled_ = true;
            ready_.push_back(s);
        }
        if (s->outbox_.size() < options_.stream_send_buffer_bytes) {
            s->writable_.notify();
        }
    }
}

void session::take_control(std::vector<std::uint8_t>& out) {
    while (!control_.empty() && out.size() < write_batch_bytes) {
        const auto& f = control_.front();
        out.insert(out.end(), f.begin(), f.end());
        control_.pop_front();
    }
}

asio::awaitable<error_code> session::write_batch() {
    std::size_t done = 0;
    bool corked = out_.size() > write_piece_bytes;
    if (corked) {
        transport_->cork(true);
    }
    while (done < out_.size()) {
        auto end = done + frame_size_at(out_, done);
        while (end < out_.size() && end + frame_size_at(out_, end) - done <= write_piece_bytes) {
            end += frame_size_at(out_, end);
        }
        auto [ec, n] = co_await transport_->write_all(asio::buffer(out_.data() + done, end - done));
        bytes_sent_ += n;
        if (ec) {
            co_return ec;
        }
        done = end;
        if (done < out_.size() && !control_.empty() && !closed_) {
            // Frames that reach the peer after a RST_STREAM of their stream are dropped there
            // (docs/protocol.md §6.2), so a reset may overtake its stream's DATA.
            control_out_.clear();
            take_control(control_out_);
            auto [cec, cn] = co_await transport_->write_all(asio::buffer(control_out_));
            bytes_sent_ += cn;
            if (cec) {
                co_return cec;
            }
        }
    }
    if (corked) {
        transport_->cork(false);
    }
    co_return error_code{};
}

asio::awaitable<void> session::write_loop() {
    auto self = shared_from_this();
    while (!closed_) {
        out_.clear();
        take_control(out_);
        // Data goes only after every queued control frame, so that a stream's HEADERS always
        // precede its DATA.
        if (!closing_ && control_.empty()) {
            fill_data();
            if (send_space_waiters_ > 0 &&
                queued_send_bytes_ < options_.session_send_buffer_bytes) {
                send_space_.notify();
            }
        }
        if (out_.empty()) {
            if (closing_) {
                break;
            }
            co_await writer_wake_.wait();
            continue;
        }
        if (auto ec = co_await write_batch()) {
            log::debug("write_failed", {{"conn", conn_id_}, {"error", ec.message()}});
            close(ec);
            break;
        }
    }
    writer_running_ = false;
    writer_done_.notify();
}

asio::awaitable<void> session::keepalive_loop() {
    auto self = shared_from_this();
    using clock = std::chrono::steady_clock;
    // A PING goes out every keepalive_interval; one unanswered for keepalive_timeout ends the
    // session. Checking four times per the shorter of the two keeps the detection within about
    // interval + timeout of the last sign of life.
    auto tick = std::max<std::chrono::milliseconds>(
        std::min(options_.keepalive_interval, options_.keepalive_timeout) / 4,
        std::chrono::milliseconds(10));
    auto next_ping = clock::now() + options_.keepalive_interval;
    while (!closed_) {
        keepalive_timer_.expires_after(tick);
        co_await keepalive_timer_.async_wait(asio::as_tuple(asio::use_awaitable));
        if (closed_) {
            break;
        }
        auto now = clock::now();
        if (ping_sent_ && now - *ping_sent_ >= options_.keepalive_timeout) {
            log::warn(
                "keepalive_timeout",
                {{"conn", conn_id_},
                 {"timeout_ms", static_cast<std::int64_t>(options_.keepalive_timeout.count())}});
            close(make_error_code(errc::timeout));
            break;
        }
        if (!ping_sent_ && now >= next_ping) {
            ++ping_counter_;
            std::array<std::uint8_t, 8> payload{};
            for (int i = 0; i < 8; ++i) {
                payload[static_cast<std::size_t>(i)] =
                    static_cast<std::uint8_t>(ping_counter_ >> (56 - 8 * i));
            }
            ping_sent_ = now;
            next_ping = now + options_.keepalive_interval;
            queue_control(frame::frame_type::ping, 0, 0, payload);
        }
    }
}

}  // namespace taser::mux
