// SPDX-License-Identifier: Apache-2.0
// One tunnel connection and the streams multiplexed on it (docs/protocol.md §4-§7).
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>

#include "taser/error.hpp"
#include "taser/frame/frame.hpp"
#include "taser/mux/transport.hpp"
#include "taser/net/event.hpp"

namespace taser::mux {

using namespace std::chrono_literals;

struct session_options {
    frame::role role = frame::role::broker;
    frame::instance_id instance{};
    frame::settings local;  // announced in our HELLO: what the peer may send us
    std::chrono::milliseconds hello_timeout = 10s;
    std::chrono::milliseconds keepalive_interval = 15s;
    std::chrono::milliseconds keepalive_timeout = 10s;
    // Bytes received but not yet read, over all streams, above which connection credit is
    // returned only as streams are read (§6.4). Memory per session stays below roughly
    // buffer_budget_bytes + initial_connection_window.
    std::size_t buffer_budget_bytes = 16 * 1024 * 1024;
    // Bytes a stream may queue for sending before write() waits.
    std::size_t stream_send_buffer_bytes = 256 * 1024;
    // Bytes all streams of the session may queue together before write() waits, so that many
    // streams towards a peer that stopped reading cannot hold more than this between them.
    std::size_t session_send_buffer_bytes = 16 * 1024 * 1024;
    // Bytes of encoded request heads that the streams of a session may hold together (the
    // bridge's side). A HEADERS frame beyond it is refused with REFUSED_STREAM, so that heads
    // cannot take max_concurrent_streams times max_header_block (1 GiB by default).
    std::size_t request_head_budget_bytes = 32 * 1024 * 1024;
    // Control frames (PING ACK, WINDOW_UPDATE, RST_STREAM) queued before the peer is cut off
    // for flooding.
    std::size_t max_queued_control_frames = 10000;
};

class session;

// Received DATA chunks in arrival order: a vector and a read position. An empty queue allocates
// nothing, where a std::deque allocates about 600 bytes, which thousands of streams would pay.
class chunk_queue {
public:
    using chunk = std::vector<std::uint8_t>;

    bool empty() const noexcept { return head_ == chunks_.size(); }
    chunk& back() { return chunks_.back(); }
    chunk& emplace_back() { return chunks_.emplace_back(); }

    chunk pop_front() {
        auto front = std::move(chunks_[head_++]);
        if (head_ == chunks_.size()) {
            clear();
        } else if (head_ >= 16 && head_ * 2 >= chunks_.size()) {
            // A reader that never quite catches up would otherwise grow the vector forever.
            chunks_.erase(chunks_.begin(), chunks_.begin() + static_cast<std::ptrdiff_t>(head_));
            head_ = 0;
        }
        return front;
    }

    void clear() noexcept {
        chunks_.clear();
        head_ = 0;
    }

private:
    std::vector<chunk> chunks_;
    std::size_t head_ = 0;
};

// One stream: an HTTP exchange or an opaque byte tunnel. Its owner (the edge handler) reads and
// writes through it; the session's loops deliver frames to it. All on one thread.
class stream : public std::enable_shared_from_this<stream> {
public:
    stream(std::shared_ptr<session> s, std::uint32_t id, std::uint32_t send_window,
           std::uint32_t recv_window);
    ~stream();
    stream(const stream&) = delete;
    stream& operator=(const stream&) = delete;

    std::uint32_t id() const noexcept { return id_; }
    std::uint64_t conn_id() const noexcept;
    const asio::any_io_executor& session_executor() const noexcept;
    // True when DATA is waiting to be read.
    bool try_peek_data() const noexcept { return !inbox_.empty(); }

    // The request head that opened the stream (the bridge's side).
    const frame::request_head& request() const noexcept { return request_; }

    // Waits for the peer's response head (the broker's side); fails with errc::timeout at the
    // deadline.
    asio::awaitable<frame::result<frame::response_head>> read_response_head(
        std::chrono::steady_clock::time_point deadline =
            std::chrono::steady_clock::time_point::max());

    // Returns the next DATA payload. An empty payload with no error means that the peer ended
    // its side of the stream. Data that arrived before an error is returned before the error.
    asio::awaitable<std::tuple<error_code, std::vector<std::uint8_t>>> read();

    enum class poll_result { data, end, error, empty };
    // Returns what read() would return without waiting, or empty when it would wait.
    std::pair<poll_result, std::vector<std::uint8_t>> try_read();

    // Waits until the stream fails (reset by either side, or its session closed).
    asio::awaitable<void> wait_failed();
    // Waits until try_read() would return something other than empty; returns false when the
    // deadline passed first.
    asio::awaitable<bool> wait_readable(std::chrono::steady_clock::time_point deadline =
                                            std::chrono::steady_clock::time_point::max());

    // Calls fn once if the stream fails (reset by either side, or its session closed) while
    // fn is set; an empty fn clears it. The bridge uses it to abort the request to the vault.
    void on_failure(std::function<void()> fn) { on_failure_ = std::move(fn); }

    // Queues a response head (the bridge's side).
    error_code write_response_head(const frame::response_head& head, bool end_stream);

    // Copies data into the stream's send buffer, waiting first while it holds more than
    // stream_send_buffer_bytes; end_stream half-closes our side after the data.
    asio::awaitable<error_code> write(frame::bytes data, bool end_stream);

    // Aborts the stream: sends RST_STREAM with code unless the stream is already closed, drops
    // what is queued either way, and wakes every reader and writer with an error.
    void reset(errc code);

    bool remote_ended() const noexcept { return remote_ended_; }
    bool local_ended() const noexcept { return local_ended_; }
    // The error that ended the stream, or none.
    error_code error() const noexcept { return error_; }
    // The code of the RST_STREAM the peer sent, when error() is stream_reset_by_peer.
    std::uint32_t peer_reset_code() const noexcept { return peer_reset_code_; }

private:
    friend class session;

    void fail(error_code ec);
    void wake();
    void drop_inbox();
    void drop_outbox();

    std::shared_ptr<session> session_;
    std::uint32_t id_;
    frame::request_head request_;
    std::size_t request_bytes_ = 0;  // the encoded head's share of request_head_budget_bytes

    // Receiving.
    std::optional<frame::response_head> response_;
    chunk_queue inbox_;
    std::size_t inbox_bytes_ = 0;
    std::int64_t recv_window_;
    std::uint32_t recv_unreturned_ = 0;
    bool remote_ended_ = false;
    net::event readable_;

    // Sending.
    boost::beast::flat_buffer outbox_;
    std::int64_t send_window_;
    bool local_ended_ = false;  // write() was told end_stream
    bool fin_sent_ = false;     // the frame with END_STREAM has been encoded
    bool scheduled_ = false;    // in the session's ready list
    net::event writable_;

    error_code error_;
    std::uint32_t peer_reset_code_ = 0;
    std::function<void()> on_failure_;
};

// A tunnel connection. The broker opens streams with open(); the bridge is told of new streams
// through on_stream. One read_loop, one write_loop and one keepalive_loop run per session.
class session : public std::enable_shared_from_this<session> {
public:
    session(std::unique_ptr<transport> t, const asio::any_io_executor& ex, session_options o,
            std::uint64_t conn_id);
    ~session();

    // Sends our HELLO and waits for the peer's, checking version and role.
    asio::awaitable<error_code> handshake();

    // Runs the session until the connection ends; returns why it ended (no error for a clean
    // close). Every stream still open then fails with session_closed.
    asio::awaitable<error_code> run();

    // Opens a stream carrying a request head (broker only). Fails with refused_stream when the
    // session is draining, closed or at the peer's stream limit.
    frame::result<std::shared_ptr<stream>> open(const frame::request_head& head, bool end_stream);

    // Called for each stream the peer opens (bridge only).
    std::function<void(std::shared_ptr<stream>)> on_stream;
    // Called when the peer announces GOAWAY.
    std::function<void()> on_goaway;

    // Sends GOAWAY: the peer opens no new streams, running ones go on.
    void goaway(errc code, std::string_view reason);
    // Ends the session at once.
    void close(error_code reason);

    std::uint64_t id() const noexcept { return conn_id_; }
    bool closed() const noexcept { return closed_; }
    // True after either side sent GOAWAY: no new streams.
    bool draining() const noexcept { return goaway_sent_ || goaway_received_; }
    bool can_open() const noexcept;
    std::size_t open_streams() const noexcept { return streams_.size(); }
    const frame::hello& peer_hello() const noexcept { return peer_hello_; }
    std::optional<std::chrono::microseconds> rtt() const noexcept { return rtt_; }
    std::uint64_t bytes_sent() const noexcept { return bytes_sent_; }
    std::uint64_t bytes_received() const noexcept { return bytes_received_; }

    // Waits until open_streams() is zero or the session closes.
    asio::awaitable<void> wait_idle();

    // Sends a PING of its own and waits up to timeout for its ACK; returns whether the peer
    // answered, that is, whether the connection still works.
    asio::awaitable<bool> probe(std::chrono::milliseconds timeout);

private:
    friend class stream;

    asio::awaitable<error_code> read_loop();
    asio::awaitable<void> write_loop();
    asio::awaitable<void> keepalive_loop();
    // Appends DATA frames of ready streams to out_, one frame per stream per round.
    void fill_data();
    // Moves queued control frames to out, up to one batch.
    void take_control(std::vector<std::uint8_t>& out);
    // Writes out_, letting control frames queued meanwhile go ahead of what is left of it.
    asio::awaitable<error_code> write_batch();

    // Reads until buffer_ holds at least n bytes.
    asio::awaitable<error_code> fill(std::size_t n);

    error_code dispatch(const frame::frame_header& h, frame::bytes payload);
    error_code on_headers(const frame::frame_header& h, frame::bytes payload);
    error_code on_data(const frame::frame_header& h, frame::bytes payload);
    error_code on_window_update(const frame::frame_header& h, frame::bytes payload);
    error_code on_rst_stream(const frame::frame_header& h, frame::bytes payload);
    error_code on_ping(const frame::frame_header& h, frame::bytes payload);
    error_code on_goaway_frame(frame::bytes payload);

    // Ends the connection because the peer broke the protocol: logs, sends GOAWAY, closes.
    error_code connection_error(errc code, std::string_view what, std::uint32_t stream_id = 0);
    // Resets one stream because the peer broke a rule that concerns only that stream.
    void stream_error(const std::shared_ptr<stream>& s, errc code, std::string_view what);

    void queue_control(frame::frame_type type, std::uint8_t flags, std::uint32_t stream_id,
                       frame::bytes payload);
    // Queues a RST_STREAM with the given code.
    void queue_reset(std::uint32_t stream_id, errc code);
    void schedule(const std::shared_ptr<stream>& s);
    void forget(std::uint32_t stream_id);
    void return_connection_credit();
    void return_stream_credit(stream& s);
    bool known_closed(std::uint32_t stream_id) const noexcept;

    std::unique_ptr<transport> transport_;
    asio::any_io_executor executor_;
    session_options options_;
    std::uint64_t conn_id_;
    frame::hello peer_hello_{};
    bool hello_done_ = false;

    std::unordered_map<std::uint32_t, std::shared_ptr<stream>> streams_;
    std::uint32_t last_stream_id_ = 0;    // highest id opened on this connection, by either rule
    std::size_t request_head_bytes_ = 0;  // encoded request heads that streams hold

    // Reading.
    boost::beast::flat_buffer buffer_;
    std::int64_t conn_recv_window_ = 0;
    std::uint64_t conn_unreturned_ = 0;
    std::size_t buffered_bytes_ = 0;  // inbox bytes over all streams

    // Writing.
    std::deque<std::vector<std::uint8_t>> control_;
    std::deque<std::shared_ptr<stream>> ready_;
    std::vector<std::shared_ptr<stream>> conn_blocked_;  // waiting for connection credit
    std::int64_t conn_send_window_ = 0;
    std::size_t queued_send_bytes_ = 0;  // outbox bytes over all streams
    std::size_t send_space_waiters_ = 0;
    net::event send_space_;
    std::vector<std::uint8_t> out_;
    std::vector<std::uint8_t> control_out_;  // control frames written in the middle of out_
    net::event writer_wake_;
    net::event writer_done_;
    bool writer_running_ = false;

    // Liveness.
    asio::steady_timer keepalive_timer_;
    std::uint64_t ping_counter_ = 0;
    std::optional<std::chrono::steady_clock::time_point> ping_sent_;
    std::optional<std::chrono::microseconds> rtt_;
    std::uint64_t probe_payload_ = 0;  // payload of the outstanding probe PING, 0 when none
    bool probe_answered_ = false;
    net::event probe_answer_;
    std::chrono::steady_clock::time_point ping_window_start_{};
    std::uint32_t pings_in_window_ = 0;

    net::event idle_;
    bool closed_ = false;
    bool closing_ = false;  // reading has stopped; the writer flushes control frames and ends
    bool goaway_sent_ = false;
    bool goaway_received_ = false;
    std::uint32_t peer_last_stream_id_ = frame::max_stream_id;
    error_code close_reason_;
    std::uint64_t bytes_sent_ = 0;
    std::uint64_t bytes_received_ = 0;
};

}  // namespace taser::mux
