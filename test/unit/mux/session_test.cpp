// SPDX-License-Identifier: Apache-2.0
// Unit tests of the stream multiplexer (docs/protocol.md §4-§7). The first half runs a broker
// session against a bridge session over loopback TCP. The second half feeds one session
// hand-made frames from a plain socket and checks what it sends back.
//
// Every test drives its io_context with run_task(), which fails the test when the task has not
// finished within a few seconds, so that a hang fails fast instead of blocking the suite.
#include "taser/mux/session.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <catch2/catch.hpp>

#include "taser/error.hpp"
#include "taser/frame/frame.hpp"
#include "taser/mux/transport.hpp"
#include "taser/net/event.hpp"

namespace asio = boost::asio;
namespace frame = taser::frame;
namespace mux = taser::mux;
namespace net = taser::net;
using asio::ip::tcp;
using taser::errc;
using taser::error_code;
using namespace std::chrono_literals;

namespace {

using byte_vector = std::vector<std::uint8_t>;
using steady = std::chrono::steady_clock;

// Time a test task may take before it counts as hung.
constexpr steady::duration task_limit = 5s;
// Time after which data that a sender should not have sent would have arrived on loopback.
constexpr auto settle_time = 30ms;

// ---------------------------------------------------------------------------------------------
// Bytes

// Parses hex digits and skips spaces: hex("0001 02") is {0x00, 0x01, 0x02}.
byte_vector hex(std::string_view text) {
    byte_vector out;
    int high = -1;
    for (char c : text) {
        if (c == ' ') {
            continue;
        }
        int digit = 0;
        if (c >= '0' && c <= '9') {
            digit = c - '0';
        } else if (c >= 'a' && c <= 'f') {
            digit = c - 'a' + 10;
        } else {
            throw std::invalid_argument("hex: invalid digit in \"" + std::string(text) + "\"");
        }
        if (high < 0) {
            high = digit;
        } else {
            out.push_back(static_cast<std::uint8_t>(high * 16 + digit));
            high = -1;
        }
    }
    if (high >= 0) {
        throw std::invalid_argument("hex: odd number of digits in \"" + std::string(text) + "\"");
    }
    return out;
}

// Variadic rather than an initializer_list: g++ 12 rejects a braced list of vectors inside a
// coroutine ("array used as initializer").
template <class... Parts>
byte_vector join(const Parts&... parts) {
    byte_vector out;
    (out.insert(out.end(), parts.begin(), parts.end()), ...);
    return out;
}

// Returns n bytes of a pattern that starts at seed, so that a lost, doubled or reordered chunk
// shows.
byte_vector pattern(std::size_t n, std::uint8_t seed = 0) {
    byte_vector out(n);
    for (std::size_t i = 0; i < n; ++i) {
        out[i] = static_cast<std::uint8_t>(seed + i * 7 + i / 251);
    }
    return out;
}

// Builds one frame byte by byte, independent of the encoder under test.
byte_vector make_frame(std::uint8_t type, std::uint8_t flags, std::uint32_t stream_id,
                       const byte_vector& payload) {
    auto length = static_cast<std::uint32_t>(payload.size());
    byte_vector out{static_cast<std::uint8_t>(length >> 16),
                    static_cast<std::uint8_t>(length >> 8),
                    static_cast<std::uint8_t>(length),
                    type,
                    flags,
                    static_cast<std::uint8_t>(stream_id >> 24),
                    static_cast<std::uint8_t>(stream_id >> 16),
                    static_cast<std::uint8_t>(stream_id >> 8),
                    static_cast<std::uint8_t>(stream_id)};
    out.insert(out.end(), payload.begin(), payload.end());
    return out;
}

constexpr std::uint8_t type_hello = 0x0;
constexpr std::uint8_t type_headers = 0x1;
constexpr std::uint8_t type_data = 0x2;
constexpr std::uint8_t type_rst_stream = 0x4;
constexpr std::uint8_t type_ping = 0x5;
constexpr std::uint8_t type_goaway = 0x6;

// A HELLO with the given role byte (01 broker, 02 bridge) and an all-zero instance id.
// settings_hex contains 6-byte settings (2-byte id, 4-byte value), and settings left out keep
// their defaults.
byte_vector hello_frame(std::string_view role_hex, std::string_view settings_hex = "",
                        std::string_view version_hex = "0001") {
    std::string payload = std::string(version_hex) + std::string(role_hex) + "00" +
                          "00000000000000000000000000000000" + std::string(settings_hex);
    return make_frame(type_hello, 0, 0, hex(payload));
}

// The HELLO that a peer of the other role sends to a session of role r.
byte_vector peer_hello(frame::role r, std::string_view settings_hex = "") {
    return hello_frame(r == frame::role::broker ? "02" : "01", settings_hex);
}

std::uint32_t wire(errc e) {
    return static_cast<std::uint32_t>(e);
}

// ---------------------------------------------------------------------------------------------
// Driving the io_context

struct task_state {
    bool done = false;
    std::exception_ptr error;
};

// Starts task on io. The returned state records when it finished and what it threw.
std::shared_ptr<task_state> start_task(asio::io_context& io, asio::awaitable<void> task) {
    auto state = std::make_shared<task_state>();
    asio::co_spawn(io, std::move(task), [state](std::exception_ptr e) {
        state->done = true;
        state->error = e;
    });
    return state;
}

// Runs io until task finishes and rethrows what it threw (a failed REQUIRE, for example).
// Fails the test when the task is still running after limit.
void run_task(asio::io_context& io, asio::awaitable<void> task,
              steady::duration limit = task_limit) {
    auto state = start_task(io, std::move(task));
    io.restart();
    auto deadline = steady::now() + limit;
    while (!state->done && steady::now() < deadline) {
        io.run_one_until(deadline);
        if (io.stopped()) {
            break;
        }
    }
    if (state->error) {
        std::rethrow_exception(state->error);
    }
    INFO("the test task did not finish within "
         << std::chrono::duration_cast<std::chrono::milliseconds>(limit).count() << " ms");
    REQUIRE(state->done);
}

// Waits until condition() is true, checking every millisecond. run_task bounds the wait.
template <class Condition>
asio::awaitable<void> wait_until(Condition condition) {
    while (!condition()) {
        co_await net::sleep(1ms);
    }
}

// Waits for a task started with start_task and rethrows what it threw.
asio::awaitable<void> join(std::shared_ptr<task_state> t) {
    co_await wait_until([t] { return t->done; });
    if (t->error) {
        std::rethrow_exception(t->error);
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions

std::pair<tcp::socket, tcp::socket> connected_sockets(asio::io_context& io) {
    tcp::acceptor acceptor(io, {asio::ip::make_address_v4("127.0.0.1"), 0});
    tcp::socket client(io);
    client.connect(acceptor.local_endpoint());
    tcp::socket server = acceptor.accept();
    client.set_option(tcp::no_delay(true));
    server.set_option(tcp::no_delay(true));
    return {std::move(client), std::move(server)};
}

mux::session_options options_for(frame::role role) {
    mux::session_options o;
    o.role = role;
    o.instance.fill(role == frame::role::broker ? 0xb0 : 0xb1);
    o.hello_timeout = 2s;
    return o;
}

std::shared_ptr<mux::session> make_session(asio::io_context& io, tcp::socket socket,
                                           const mux::session_options& options,
                                           std::uint64_t conn_id) {
    auto transport = std::make_unique<mux::stream_transport<tcp::socket>>(std::move(socket));
    return std::make_shared<mux::session>(std::move(transport), io.get_executor(), options,
                                          conn_id);
}

// What handshake() and run() of one session returned.
struct outcome {
    bool handshake_done = false;
    error_code handshake;
    bool finished = false;  // run() returned, or the handshake failed
    error_code run;
};

asio::awaitable<void> serve(std::shared_ptr<mux::session> s, std::shared_ptr<outcome> out) {
    out->handshake = co_await s->handshake();
    out->handshake_done = true;
    if (!out->handshake) {
        out->run = co_await s->run();
    }
    out->finished = true;
}

// Collects the streams that a bridge session accepts.
class stream_inbox {
public:
    explicit stream_inbox(asio::io_context& io) : ready_(io.get_executor()) {}

    void attach(mux::session& bridge) {
        bridge.on_stream = [this](std::shared_ptr<mux::stream> s) {
            streams_.push_back(std::move(s));
            ready_.notify();
        };
    }

    asio::awaitable<std::shared_ptr<mux::stream>> next() {
        while (streams_.empty()) {
            co_await ready_.wait();
        }
        auto s = std::move(streams_.front());
        streams_.pop_front();
        co_return s;
    }

    std::size_t waiting() const noexcept { return streams_.size(); }

private:
    std::deque<std::shared_ptr<mux::stream>> streams_;
    net::event ready_;
};

// A broker session and a bridge session on the two ends of a loopback connection. Both start
// their handshake at construction. The destructor closes both sessions but does not run io
// again: the io_context destroys the suspended coroutines without resuming them, so none of
// them touches a local of a test that already ended.
class session_pair {
public:
    explicit session_pair(
        const mux::session_options& broker_options = options_for(frame::role::broker),
        const mux::session_options& bridge_options = options_for(frame::role::bridge))
        : incoming(io) {
        auto [a, b] = connected_sockets(io);
        broker = make_session(io, std::move(a), broker_options, 1);
        bridge = make_session(io, std::move(b), bridge_options, 2);
        incoming.attach(*bridge);
        asio::co_spawn(io, serve(broker, broker_outcome), asio::detached);
        asio::co_spawn(io, serve(bridge, bridge_outcome), asio::detached);
    }

    ~session_pair() {
        broker->close({});
        bridge->close({});
    }

    session_pair(const session_pair&) = delete;
    session_pair& operator=(const session_pair&) = delete;

    void run(asio::awaitable<void> task, steady::duration limit = task_limit) {
        run_task(io, std::move(task), limit);
    }

    // Runs both handshakes and requires that both succeed.
    void start() {
        run(wait_until(
            [this] { return broker_outcome->handshake_done && bridge_outcome->handshake_done; }));
        REQUIRE_FALSE(broker_outcome->handshake);
        REQUIRE_FALSE(bridge_outcome->handshake);
    }

    asio::io_context io;  // first member, so that it is destroyed last
    std::shared_ptr<mux::session> broker;
    std::shared_ptr<mux::session> bridge;
    std::shared_ptr<outcome> broker_outcome = std::make_shared<outcome>();
    std::shared_ptr<outcome> bridge_outcome = std::make_shared<outcome>();
    stream_inbox incoming;
};

frame::request_head post_request(std::string target = "/v1/secret/data/app") {
    return {"POST", std::move(target), {{"Content-Type", "application/json"}}};
}

frame::request_head get_request(std::string target = "/v1/sys/health") {
    return {"GET", std::move(target), {}};
}

// Reads DATA until the peer ends the stream. Returns the bytes and the error that stopped it.
asio::awaitable<std::tuple<byte_vector, error_code>> read_body(std::shared_ptr<mux::stream> s) {
    byte_vector body;
    for (int i = 0; i < 1'000'000; ++i) {
        auto [ec, chunk] = co_await s->read();
        if (ec) {
            co_return std::tuple{std::move(body), ec};
        }
        if (chunk.empty()) {
            break;
        }
        body.insert(body.end(), chunk.begin(), chunk.end());
    }
    co_return std::tuple{std::move(body), error_code{}};
}

// Writes body in writes of at most chunk bytes, the last one with END_STREAM.
asio::awaitable<error_code> write_body(std::shared_ptr<mux::stream> s, byte_vector body,
                                       std::size_t chunk) {
    std::size_t at = 0;
    do {
        auto n = std::min(chunk, body.size() - at);
        bool last = at + n == body.size();
        if (auto ec = co_await s->write({body.data() + at, n}, last)) {
            co_return ec;
        }
        at += n;
    } while (at < body.size());
    co_return error_code{};
}

// Reads every DATA payload that is available without waiting, and sets ended at END_STREAM.
std::size_t drain_available(mux::stream& s, bool& ended) {
    std::size_t total = 0;
    for (int i = 0; i < 100'000; ++i) {
        auto [status, chunk] = s.try_read();
        if (status == mux::stream::poll_result::data) {
            total += chunk.size();
            continue;
        }
        ended = status == mux::stream::poll_result::end;
        break;
    }
    return total;
}

}  // namespace

// =============================================================================================
// A broker session and a bridge session

TEST_CASE("session handshake exchanges settings", "[mux]") {
    auto broker_options = options_for(frame::role::broker);
    for (std::size_t i = 0; i < broker_options.instance.size(); ++i) {
        broker_options.instance[i] = static_cast<std::uint8_t>(i);
    }
    broker_options.local.max_frame_payload = 32 * 1024;
    broker_options.local.initial_stream_window = 100'000;
    broker_options.local.max_concurrent_streams = 77;
    broker_options.local.max_header_block = 4096;
    broker_options.local.initial_connection_window = 200'000;
    broker_options.local.replicas = 3;
    auto bridge_options = options_for(frame::role::bridge);
    bridge_options.local.max_frame_payload = 20'000;
    bridge_options.local.initial_stream_window = 300'000;
    bridge_options.local.max_concurrent_streams = 5;
    bridge_options.local.max_header_block = 2048;
    bridge_options.local.initial_connection_window = 400'000;
    session_pair p(broker_options, bridge_options);

    p.start();

    const auto& seen_by_bridge = p.bridge->peer_hello();
    CHECK(seen_by_bridge.version == frame::protocol_version);
    CHECK(seen_by_bridge.role == frame::role::broker);
    CHECK(seen_by_bridge.instance == broker_options.instance);
    CHECK(seen_by_bridge.settings.max_frame_payload == 32 * 1024);
    CHECK(seen_by_bridge.settings.initial_stream_window == 100'000);
    CHECK(seen_by_bridge.settings.max_concurrent_streams == 77);
    CHECK(seen_by_bridge.settings.max_header_block == 4096);
    CHECK(seen_by_bridge.settings.initial_connection_window == 200'000);
    CHECK(seen_by_bridge.settings.replicas == 3);

    const auto& seen_by_broker = p.broker->peer_hello();
    CHECK(seen_by_broker.version == frame::protocol_version);
    CHECK(seen_by_broker.role == frame::role::bridge);
    CHECK(seen_by_broker.instance == bridge_options.instance);
    CHECK(seen_by_broker.settings.max_frame_payload == 20'000);
    CHECK(seen_by_broker.settings.initial_stream_window == 300'000);
    CHECK(seen_by_broker.settings.max_concurrent_streams == 5);
    CHECK(seen_by_broker.settings.max_header_block == 2048);
    CHECK(seen_by_broker.settings.initial_connection_window == 400'000);
    CHECK(seen_by_broker.settings.replicas == 0);

    CHECK(p.broker->can_open());
    CHECK_FALSE(p.broker->draining());
    CHECK_FALSE(p.broker->closed());
    CHECK_FALSE(p.bridge->closed());
    CHECK(p.broker->open_streams() == 0);
    CHECK(p.broker->bytes_sent() > 0);
    CHECK(p.bridge->bytes_received() == p.broker->bytes_sent());
}

TEST_CASE("handshake rejects a peer of the same role", "[mux]") {
    session_pair p(options_for(frame::role::broker), options_for(frame::role::broker));

    p.run(wait_until([&] { return p.broker_outcome->finished && p.bridge_outcome->finished; }));

    CHECK(p.broker_outcome->handshake == errc::protocol_error);
    CHECK(p.bridge_outcome->handshake == errc::protocol_error);
    CHECK(p.broker->closed());
    CHECK(p.bridge->closed());
}

TEST_CASE("stream carries request and response bodies", "[mux]") {
    session_pair p;
    p.start();
    const auto request_body = pattern(100'000, 1);
    const auto response_body = pattern(300'000, 7);

    auto bridge_side = [&]() -> asio::awaitable<void> {
        auto s = co_await p.incoming.next();
        CHECK(s->id() == 1);
        CHECK(s->request().method == "POST");
        CHECK(s->request().target == "/v1/secret/data/app");
        REQUIRE(s->request().fields.size() == 1);
        CHECK(s->request().fields[0].name == "Content-Type");
        CHECK(s->request().fields[0].value == "application/json");
        CHECK_FALSE(s->remote_ended());

        auto [body, ec] = co_await read_body(s);
        CHECK_FALSE(ec);
        CHECK(body.size() == request_body.size());
        CHECK((body == request_body));
        CHECK(s->remote_ended());

        auto head_error = s->write_response_head({201, {{"X-Vault-Index", "a"}}}, false);
        CHECK_FALSE(head_error);
        auto write_error = co_await write_body(s, response_body, 50'000);
        CHECK_FALSE(write_error);
    };
    auto broker_side = [&]() -> asio::awaitable<void> {
        auto opened = p.broker->open(post_request(), false);
        REQUIRE(opened.has_value());
        auto s = *opened;
        CHECK(s->id() == 1);
        auto write_error = co_await write_body(s, request_body, 16'000);
        CHECK_FALSE(write_error);

        auto head = co_await s->read_response_head();
        REQUIRE(head.has_value());
        CHECK(head->status == 201);
        REQUIRE(head->fields.size() == 1);
        CHECK(head->fields[0].name == "X-Vault-Index");
        CHECK(head->fields[0].value == "a");

        auto [body, ec] = co_await read_body(s);
        CHECK_FALSE(ec);
        CHECK(body.size() == response_body.size());
        CHECK((body == response_body));
        CHECK_FALSE(s->error());
    };

    auto bridge_task = start_task(p.io, bridge_side());
    p.run(broker_side());
    p.run(join(bridge_task));
    // A stream that both sides ended leaves both sessions.
    p.run(
        wait_until([&] { return p.broker->open_streams() == 0 && p.bridge->open_streams() == 0; }));
}

TEST_CASE("session runs many concurrent streams", "[mux]") {
    constexpr int stream_count = 200;
    session_pair p;
    p.start();
    int echoed = 0;
    int completed = 0;

    // The bridge echoes each request body back as the response body.
    auto echo = [&](std::shared_ptr<mux::stream> s) -> asio::awaitable<void> {
        auto [body, ec] = co_await read_body(s);
        CHECK_FALSE(ec);
        CHECK_FALSE(s->write_response_head({200, {}}, false));
        auto write_error = co_await write_body(s, std::move(body), 700);
        CHECK_FALSE(write_error);
        ++echoed;
    };
    auto accept_all = [&]() -> asio::awaitable<void> {
        for (int i = 0; i < stream_count; ++i) {
            auto s = co_await p.incoming.next();
            start_task(p.io, echo(s));
        }
    };
    auto exchange = [&](int i) -> asio::awaitable<void> {
        auto opened = p.broker->open(post_request("/v1/kv/" + std::to_string(i)), false);
        REQUIRE(opened.has_value());
        auto s = *opened;
        auto body = pattern(1000 + static_cast<std::size_t>(i) * 37, static_cast<std::uint8_t>(i));
        auto write_error = co_await write_body(s, body, 512);
        CHECK_FALSE(write_error);
        auto head = co_await s->read_response_head();
        REQUIRE(head.has_value());
        CHECK(head->status == 200);
        auto [echo_body, ec] = co_await read_body(s);
        CHECK_FALSE(ec);
        CHECK(echo_body.size() == body.size());
        CHECK((echo_body == body));
        ++completed;
    };

    auto acceptor = start_task(p.io, accept_all());
    std::vector<std::shared_ptr<task_state>> exchanges;
    for (int i = 0; i < stream_count; ++i) {
        exchanges.push_back(start_task(p.io, exchange(i)));
    }
    p.run(wait_until([&] { return completed + echoed == 2 * stream_count; }));
    p.run(join(acceptor));
    for (auto& t : exchanges) {
        p.run(join(t));
    }

    CHECK(completed == stream_count);
    CHECK(echoed == stream_count);
    p.run(
        wait_until([&] { return p.broker->open_streams() == 0 && p.bridge->open_streams() == 0; }));
}

TEST_CASE("stream window pauses the sender", "[mux]") {
    constexpr std::size_t window = 1000;
    constexpr std::size_t body_size = 4500;
    auto bridge_options = options_for(frame::role::bridge);
    bridge_options.local.initial_stream_window = window;
    session_pair p(options_for(frame::role::broker), bridge_options);
    p.start();

    auto test = [&]() -> asio::awaitable<void> {
        auto opened = p.broker->open(post_request(), false);
        REQUIRE(opened.has_value());
        auto sent = co_await (*opened)->write(pattern(body_size), true);
        CHECK_FALSE(sent);
        auto s = co_await p.incoming.next();

        // Each round the broker may send one window of DATA, and no more until the bridge
        // reads it and the session returns the credit in a WINDOW_UPDATE.
        std::size_t received = 0;
        bool ended = false;
        for (int round = 0; round < 10 && !ended; ++round) {
            co_await s->wait_readable();
            co_await net::sleep(settle_time);
            auto drained = drain_available(*s, ended);
            INFO("round " << round);
            CHECK(drained == std::min(window, body_size - received));
            received += drained;
        }
        CHECK(received == body_size);
        CHECK(ended);
    };
    p.run(test());
}

// A stream that had stream credit but no connection credit waits for a connection
// WINDOW_UPDATE; this guards against such a stream never being sent again.
TEST_CASE("connection window pauses the sender", "[mux]") {
    constexpr std::size_t window = 3000;
    constexpr std::size_t body_size = 2000;
    constexpr std::size_t stream_count = 3;
    auto bridge_options = options_for(frame::role::bridge);
    bridge_options.local.initial_connection_window = window;
    // With no budget for buffered bytes, connection credit comes back only as streams are read.
    bridge_options.buffer_budget_bytes = 0;
    session_pair p(options_for(frame::role::broker), bridge_options);
    p.start();

    auto test = [&]() -> asio::awaitable<void> {
        for (std::size_t i = 0; i < stream_count; ++i) {
            auto opened = p.broker->open(post_request(), false);
            REQUIRE(opened.has_value());
            auto sent = co_await (*opened)->write(pattern(body_size), true);
            CHECK_FALSE(sent);
        }
        std::vector<std::shared_ptr<mux::stream>> streams;
        for (std::size_t i = 0; i < stream_count; ++i) {
            streams.push_back(co_await p.incoming.next());
        }
        co_await net::sleep(settle_time);

        std::size_t first_round = 0;
        std::vector<bool> ended(stream_count, false);
        for (std::size_t i = 0; i < stream_count; ++i) {
            bool end = false;
            first_round += drain_available(*streams[i], end);
            ended[i] = end;
        }
        CHECK(first_round == window);

        // The reads above returned the credit, so the rest arrives in later rounds.
        std::size_t received = first_round;
        for (int round = 0; round < 20 && received < stream_count * body_size; ++round) {
            co_await net::sleep(settle_time);
            for (std::size_t i = 0; i < stream_count; ++i) {
                bool end = false;
                auto drained = drain_available(*streams[i], end);
                CHECK(drained <= window);
                received += drained;
                if (end) {
                    ended[i] = true;
                }
            }
        }
        CHECK(received == stream_count * body_size);
        for (std::size_t i = 0; i < stream_count; ++i) {
            INFO("stream " << i);
            CHECK(ended[i]);
        }
    };
    p.run(test(), 3s);
}

TEST_CASE("stalled stream leaves other streams running", "[mux]") {
    auto bridge_options = options_for(frame::role::bridge);
    bridge_options.local.initial_stream_window = 16 * 1024;
    session_pair p(options_for(frame::role::broker), bridge_options);
    p.start();
    const auto body = pattern(200'000, 3);

    auto test = [&]() -> asio::awaitable<void> {
        auto stalled = p.broker->open(post_request("/v1/stalled"), false);
        auto moving = p.broker->open(post_request("/v1/moving"), false);
        REQUIRE(stalled.has_value());
        REQUIRE(moving.has_value());
        auto stalled_write = co_await (*stalled)->write(body, true);
        auto moving_write = co_await (*moving)->write(body, true);
        CHECK_FALSE(stalled_write);
        CHECK_FALSE(moving_write);

        auto first = co_await p.incoming.next();
        auto second = co_await p.incoming.next();
        REQUIRE(first->request().target == "/v1/stalled");
        REQUIRE(second->request().target == "/v1/moving");

        // Only the second stream is read, while the first keeps its window full.
        auto [received, ec] = co_await read_body(second);
        CHECK_FALSE(ec);
        CHECK(received.size() == body.size());
        CHECK((received == body));
        CHECK(first->try_peek_data());
        CHECK_FALSE(first->remote_ended());
    };
    p.run(test());
}

TEST_CASE("session send buffer limit blocks writers", "[mux]") {
    auto broker_options = options_for(frame::role::broker);
    broker_options.session_send_buffer_bytes = 3000;
    auto bridge_options = options_for(frame::role::bridge);
    bridge_options.local.initial_stream_window = 1000;
    session_pair p(broker_options, bridge_options);
    p.start();
    error_code blocked_write_error;
    bool blocked_write_done = false;

    auto second_writer = [&](std::shared_ptr<mux::stream> s) -> asio::awaitable<void> {
        blocked_write_error = co_await s->write(pattern(100), true);
        blocked_write_done = true;
    };
    auto test = [&]() -> asio::awaitable<void> {
        auto first = p.broker->open(post_request("/v1/first"), false);
        auto second = p.broker->open(post_request("/v1/second"), false);
        REQUIRE(first.has_value());
        REQUIRE(second.has_value());
        // 5000 bytes fit the first stream's own buffer, but 4000 of them stay queued behind
        // the bridge's window of 1000, above the session's limit of 3000.
        auto first_write = co_await (*first)->write(pattern(5000), true);
        CHECK_FALSE(first_write);
        auto writer = start_task(p.io, second_writer(*second));
        auto first_incoming = co_await p.incoming.next();
        auto second_incoming = co_await p.incoming.next();
        co_await net::sleep(settle_time);
        CHECK_FALSE(blocked_write_done);

        // Reading the first stream lets its bytes go, which makes room for the second.
        auto [first_body, first_error] = co_await read_body(first_incoming);
        CHECK_FALSE(first_error);
        CHECK(first_body.size() == 5000);
        co_await join(writer);
        CHECK_FALSE(blocked_write_error);
        auto [second_body, second_error] = co_await read_body(second_incoming);
        CHECK_FALSE(second_error);
        CHECK(second_body.size() == 100);
    };
    p.run(test());
}

TEST_CASE("HEADERS with END_STREAM carries no body", "[mux]") {
    session_pair p;
    p.start();

    auto test = [&]() -> asio::awaitable<void> {
        auto opened = p.broker->open(get_request(), true);
        REQUIRE(opened.has_value());
        auto s = *opened;
        CHECK(s->local_ended());

        auto incoming = co_await p.incoming.next();
        CHECK(incoming->request().method == "GET");
        CHECK(incoming->remote_ended());
        auto [request_body, request_error] = co_await read_body(incoming);
        CHECK_FALSE(request_error);
        CHECK(request_body.empty());
        CHECK_FALSE(incoming->write_response_head({204, {}}, true));

        auto head = co_await s->read_response_head();
        REQUIRE(head.has_value());
        CHECK(head->status == 204);
        auto [response_body, response_error] = co_await read_body(s);
        CHECK_FALSE(response_error);
        CHECK(response_body.empty());
        CHECK(s->remote_ended());

        byte_vector late{1, 2, 3};
        auto late_write = co_await s->write(late, false);
        CHECK(late_write == errc::stream_closed);
        co_await wait_until(
            [&] { return p.broker->open_streams() == 0 && p.bridge->open_streams() == 0; });
    };
    p.run(test());
}

TEST_CASE("empty DATA with END_STREAM ends a stream", "[mux]") {
    session_pair p;
    p.start();

    auto test = [&]() -> asio::awaitable<void> {
        auto opened = p.broker->open(post_request(), false);
        REQUIRE(opened.has_value());
        auto s = *opened;
        auto incoming = co_await p.incoming.next();
        CHECK_FALSE(incoming->remote_ended());

        auto end_request = co_await s->write({}, true);
        CHECK_FALSE(end_request);
        auto [request_body, request_error] = co_await read_body(incoming);
        CHECK_FALSE(request_error);
        CHECK(request_body.empty());
        CHECK(incoming->remote_ended());

        CHECK_FALSE(incoming->write_response_head({200, {}}, false));
        auto end_response = co_await incoming->write({}, true);
        CHECK_FALSE(end_response);
        auto head = co_await s->read_response_head();
        REQUIRE(head.has_value());
        auto [response_body, response_error] = co_await read_body(s);
        CHECK_FALSE(response_error);
        CHECK(response_body.empty());
        co_await wait_until(
            [&] { return p.broker->open_streams() == 0 && p.bridge->open_streams() == 0; });
    };
    p.run(test());
}

TEST_CASE("broker reset wakes bridge reader and writer", "[mux]") {
    // A small window on the broker and a small send buffer on the bridge make the bridge's
    // second write wait.
    auto broker_options = options_for(frame::role::broker);
    broker_options.local.initial_stream_window = 1000;
    auto bridge_options = options_for(frame::role::bridge);
    bridge_options.stream_send_buffer_bytes = 1000;
    session_pair p(broker_options, bridge_options);
    p.start();
    error_code reader_error;
    error_code first_write_error;
    error_code second_write_error;
    bool writer_waiting = false;

    auto bridge_reader = [&](std::shared_ptr<mux::stream> s) -> asio::awaitable<void> {
        auto [ec, chunk] = co_await s->read();
        reader_error = ec;
        CHECK(chunk.empty());
    };
    auto bridge_writer = [&](std::shared_ptr<mux::stream> s) -> asio::awaitable<void> {
        first_write_error = co_await s->write(pattern(5000), false);
        writer_waiting = true;
        second_write_error = co_await s->write(pattern(5000), false);
    };
    auto test = [&]() -> asio::awaitable<void> {
        auto opened = p.broker->open(post_request(), false);
        REQUIRE(opened.has_value());
        auto s = *opened;
        auto incoming = co_await p.incoming.next();
        CHECK_FALSE(incoming->write_response_head({200, {}}, false));
        auto reader = start_task(p.io, bridge_reader(incoming));
        auto writer = start_task(p.io, bridge_writer(incoming));
        co_await wait_until([&] { return writer_waiting; });
        co_await net::sleep(settle_time);
        CHECK_FALSE(writer->done);
        CHECK_FALSE(reader->done);

        s->reset(errc::cancel);
        CHECK(s->error() == errc::cancel);
        auto [own_error, own_chunk] = co_await s->read();
        CHECK(own_error == errc::cancel);

        co_await join(reader);
        co_await join(writer);
        CHECK(reader_error == errc::stream_reset_by_peer);
        CHECK_FALSE(first_write_error);
        CHECK(second_write_error == errc::stream_reset_by_peer);
        CHECK(incoming->error() == errc::stream_reset_by_peer);
        CHECK(incoming->peer_reset_code() == wire(errc::cancel));
        co_await wait_until(
            [&] { return p.broker->open_streams() == 0 && p.bridge->open_streams() == 0; });
        CHECK_FALSE(p.broker->closed());
        CHECK_FALSE(p.bridge->closed());
    };
    p.run(test());
}

TEST_CASE("bridge reset wakes broker reader and writer", "[mux]") {
    auto broker_options = options_for(frame::role::broker);
    broker_options.stream_send_buffer_bytes = 1000;
    auto bridge_options = options_for(frame::role::bridge);
    bridge_options.local.initial_stream_window = 1000;
    session_pair p(broker_options, bridge_options);
    p.start();
    error_code head_error;
    error_code second_write_error;
    bool writer_waiting = false;

    auto broker_reader = [&](std::shared_ptr<mux::stream> s) -> asio::awaitable<void> {
        auto head = co_await s->read_response_head();
        CHECK_FALSE(head.has_value());
        if (!head) {
            head_error = head.error();
        }
    };
    auto broker_writer = [&](std::shared_ptr<mux::stream> s) -> asio::awaitable<void> {
        auto first = co_await s->write(pattern(5000), false);
        CHECK_FALSE(first);
        writer_waiting = true;
        second_write_error = co_await s->write(pattern(5000), false);
    };
    auto test = [&]() -> asio::awaitable<void> {
        auto opened = p.broker->open(post_request(), false);
        REQUIRE(opened.has_value());
        auto s = *opened;
        auto reader = start_task(p.io, broker_reader(s));
        auto writer = start_task(p.io, broker_writer(s));
        auto incoming = co_await p.incoming.next();
        co_await wait_until([&] { return writer_waiting; });
        co_await net::sleep(settle_time);
        CHECK_FALSE(writer->done);
        CHECK_FALSE(reader->done);

        incoming->reset(errc::internal_error);

        co_await join(reader);
        co_await join(writer);
        CHECK(head_error == errc::stream_reset_by_peer);
        CHECK(second_write_error == errc::stream_reset_by_peer);
        CHECK(s->peer_reset_code() == wire(errc::internal_error));
        CHECK(incoming->error() == errc::internal_error);
        co_await wait_until(
            [&] { return p.broker->open_streams() == 0 && p.bridge->open_streams() == 0; });
    };
    p.run(test());
}

TEST_CASE("reset after END_STREAM keeps received data", "[mux]") {
    session_pair p;
    p.start();
    const auto response_body = pattern(20'000, 5);

    auto test = [&]() -> asio::awaitable<void> {
        auto opened = p.broker->open(post_request(), false);
        REQUIRE(opened.has_value());
        auto s = *opened;
        auto incoming = co_await p.incoming.next();

        // The bridge sends its whole response before it reads the request body, then stops the
        // broker's upload with RST_STREAM NO_ERROR.
        CHECK_FALSE(incoming->write_response_head({200, {}}, false));
        auto response_sent = co_await incoming->write(response_body, true);
        CHECK_FALSE(response_sent);
        co_await wait_until([&] { return s->remote_ended(); });
        incoming->reset(errc::no_error);
        co_await wait_until([&] { return static_cast<bool>(s->error()); });
        CHECK(s->error() == errc::stream_reset_by_peer);
        CHECK(s->peer_reset_code() == wire(errc::no_error));

        auto head = co_await s->read_response_head();
        REQUIRE(head.has_value());
        CHECK(head->status == 200);
        auto [body, ec] = co_await read_body(s);
        CHECK_FALSE(ec);
        CHECK(body.size() == response_body.size());
        CHECK((body == response_body));
        auto late_write = co_await s->write(pattern(10), true);
        CHECK(late_write == errc::stream_reset_by_peer);
    };
    p.run(test());
}

TEST_CASE("bridge GOAWAY stops only new streams", "[mux]") {
    session_pair p;
    bool goaway_seen = false;
    p.broker->on_goaway = [&] { goaway_seen = true; };
    p.start();

    auto test = [&]() -> asio::awaitable<void> {
        auto opened = p.broker->open(post_request(), false);
        REQUIRE(opened.has_value());
        auto s = *opened;
        auto incoming = co_await p.incoming.next();

        p.bridge->goaway(errc::no_error, "bridge is shutting down");
        CHECK(p.bridge->draining());
        co_await wait_until([&] { return goaway_seen; });
        CHECK(p.broker->draining());
        CHECK_FALSE(p.broker->can_open());
        auto refused = p.broker->open(get_request(), true);
        REQUIRE_FALSE(refused.has_value());
        CHECK(refused.error() == errc::refused_stream);

        // The stream opened before the GOAWAY runs to its end.
        auto request_sent = co_await s->write(pattern(3000), true);
        CHECK_FALSE(request_sent);
        auto [request_body, request_error] = co_await read_body(incoming);
        CHECK_FALSE(request_error);
        CHECK(request_body.size() == 3000);
        CHECK_FALSE(incoming->write_response_head({200, {}}, false));
        auto response_sent = co_await incoming->write(pattern(5000), true);
        CHECK_FALSE(response_sent);
        auto head = co_await s->read_response_head();
        REQUIRE(head.has_value());
        auto [response_body, response_error] = co_await read_body(s);
        CHECK_FALSE(response_error);
        CHECK(response_body.size() == 5000);
        CHECK_FALSE(p.broker->closed());
    };
    p.run(test());
}

TEST_CASE("GOAWAY refuses streams above last_stream_id", "[mux]") {
    session_pair p;
    p.start();

    auto test = [&]() -> asio::awaitable<void> {
        auto first = p.broker->open(post_request(), false);
        REQUIRE(first.has_value());
        auto incoming = co_await p.incoming.next();

        // Streams 2 and 3 are opened in the same step as the bridge's GOAWAY, so the bridge
        // announces last_stream_id 1.
        auto second = p.broker->open(get_request(), true);
        auto third = p.broker->open(get_request(), true);
        REQUIRE(second.has_value());
        REQUIRE(third.has_value());
        p.bridge->goaway(errc::no_error, "draining");

        auto second_head = co_await (*second)->read_response_head();
        auto third_head = co_await (*third)->read_response_head();
        REQUIRE_FALSE(second_head.has_value());
        REQUIRE_FALSE(third_head.has_value());
        CHECK(second_head.error() == errc::refused_stream);
        CHECK(third_head.error() == errc::refused_stream);
        CHECK_FALSE((*first)->error());

        co_await net::sleep(settle_time);
        CHECK(p.incoming.waiting() == 0);
        CHECK(p.broker->open_streams() == 1);
        CHECK(p.bridge->open_streams() == 1);

        auto request_sent = co_await (*first)->write(pattern(10), true);
        CHECK_FALSE(request_sent);
        CHECK_FALSE(incoming->write_response_head({200, {}}, true));
        auto head = co_await (*first)->read_response_head();
        CHECK(head.has_value());
    };
    p.run(test());
}

TEST_CASE("broker GOAWAY stops new streams", "[mux]") {
    session_pair p;
    bool goaway_seen = false;
    p.bridge->on_goaway = [&] { goaway_seen = true; };
    p.start();

    auto test = [&]() -> asio::awaitable<void> {
        p.broker->goaway(errc::no_error, "broker is shutting down");
        CHECK(p.broker->draining());
        CHECK_FALSE(p.broker->can_open());
        auto refused = p.broker->open(get_request(), true);
        REQUIRE_FALSE(refused.has_value());
        CHECK(refused.error() == errc::refused_stream);
        co_await wait_until([&] { return goaway_seen; });
        CHECK(p.bridge->draining());
        CHECK_FALSE(p.bridge->closed());
    };
    p.run(test());
}

TEST_CASE("open obeys peer max_concurrent_streams", "[mux]") {
    auto bridge_options = options_for(frame::role::bridge);
    bridge_options.local.max_concurrent_streams = 2;
    session_pair p(options_for(frame::role::broker), bridge_options);
    p.start();

    auto test = [&]() -> asio::awaitable<void> {
        auto first = p.broker->open(get_request(), true);
        auto second = p.broker->open(get_request(), true);
        REQUIRE(first.has_value());
        REQUIRE(second.has_value());
        CHECK_FALSE(p.broker->can_open());
        auto third = p.broker->open(get_request(), true);
        REQUIRE_FALSE(third.has_value());
        CHECK(third.error() == errc::refused_stream);

        // When a stream ends, its slot is free again.
        auto incoming = co_await p.incoming.next();
        CHECK_FALSE(incoming->write_response_head({204, {}}, true));
        auto head = co_await (*first)->read_response_head();
        CHECK(head.has_value());
        co_await wait_until([&] { return p.broker->open_streams() == 1; });
        CHECK(p.broker->can_open());
    };
    p.run(test());
}

TEST_CASE("open rejects an oversized request head", "[mux]") {
    auto bridge_options = options_for(frame::role::bridge);
    bridge_options.local.max_header_block = 1024;
    session_pair p(options_for(frame::role::broker), bridge_options);
    p.start();

    auto head = get_request();
    head.fields.push_back({"X-Large", std::string(2000, 'a')});
    auto opened = p.broker->open(head, true);

    REQUIRE_FALSE(opened.has_value());
    CHECK(opened.error() == errc::frame_size_error);
    CHECK(p.broker->open_streams() == 0);
}

TEST_CASE("keepalive measures the round-trip time", "[mux]") {
    auto broker_options = options_for(frame::role::broker);
    broker_options.keepalive_interval = 20ms;
    broker_options.keepalive_timeout = 1s;
    auto bridge_options = options_for(frame::role::bridge);
    bridge_options.keepalive_interval = 20ms;
    bridge_options.keepalive_timeout = 1s;
    session_pair p(broker_options, bridge_options);
    p.start();

    p.run(net::sleep(200ms));

    CHECK_FALSE(p.broker->closed());
    CHECK_FALSE(p.bridge->closed());
    CHECK(p.broker->rtt().has_value());
    CHECK(p.bridge->rtt().has_value());
}

TEST_CASE("close fails open streams with session_closed", "[mux]") {
    constexpr std::size_t stream_count = 3;
    session_pair p;
    p.start();
    std::vector<error_code> broker_errors;
    std::vector<error_code> bridge_errors;

    auto broker_reader = [&](std::shared_ptr<mux::stream> s) -> asio::awaitable<void> {
        auto head = co_await s->read_response_head();
        broker_errors.push_back(head ? error_code{} : head.error());
    };
    auto bridge_reader = [&](std::shared_ptr<mux::stream> s) -> asio::awaitable<void> {
        auto [ec, chunk] = co_await s->read();
        bridge_errors.push_back(ec);
    };
    auto test = [&]() -> asio::awaitable<void> {
        std::vector<std::shared_ptr<mux::stream>> opened;
        std::vector<std::shared_ptr<task_state>> readers;
        for (std::size_t i = 0; i < stream_count; ++i) {
            auto s = p.broker->open(post_request(), false);
            REQUIRE(s.has_value());
            opened.push_back(*s);
            readers.push_back(start_task(p.io, broker_reader(*s)));
        }
        for (std::size_t i = 0; i < stream_count; ++i) {
            auto accepted = co_await p.incoming.next();
            readers.push_back(start_task(p.io, bridge_reader(accepted)));
        }
        co_await net::sleep(5ms);

        p.broker->close({});

        for (auto& r : readers) {
            co_await join(r);
        }
        REQUIRE(broker_errors.size() == stream_count);
        REQUIRE(bridge_errors.size() == stream_count);
        for (std::size_t i = 0; i < stream_count; ++i) {
            INFO("stream " << i);
            CHECK(broker_errors[i] == errc::session_closed);
            CHECK(bridge_errors[i] == errc::session_closed);
        }
        for (auto& s : opened) {
            CHECK(s->error() == errc::session_closed);
            auto write_error = co_await s->write(pattern(10), false);
            CHECK(write_error == errc::session_closed);
        }
        CHECK(p.broker->closed());
        CHECK(p.broker->open_streams() == 0);
        auto refused = p.broker->open(get_request(), true);
        REQUIRE_FALSE(refused.has_value());
        CHECK(refused.error() == errc::refused_stream);

        co_await wait_until(
            [&] { return p.broker_outcome->finished && p.bridge_outcome->finished; });
        CHECK_FALSE(p.broker_outcome->run);  // closed without an error
        CHECK(p.bridge_outcome->run);        // the connection ended under it
        CHECK(p.bridge->closed());
        CHECK(p.bridge->open_streams() == 0);
        co_await p.broker->wait_idle();
    };
    p.run(test());
}

// =============================================================================================
// One session fed hand-made frames

namespace {

// A frame as read from the wire.
struct raw_frame {
    std::uint8_t type = 0;
    std::uint8_t flags = 0;
    std::uint32_t stream_id = 0;
    byte_vector payload;
};

constexpr std::uint32_t no_code = 0xffffffff;

// Returns the error code of the first GOAWAY among frames, or no_code.
std::uint32_t goaway_code(const std::vector<raw_frame>& frames) {
    for (const auto& f : frames) {
        if (f.type == type_goaway && f.payload.size() >= 8) {
            return frame::decode_u32(f.payload.data() + 4);
        }
    }
    return no_code;
}

// Returns the last stream id of the first GOAWAY among frames, or no_code.
std::uint32_t goaway_last_stream_id(const std::vector<raw_frame>& frames) {
    for (const auto& f : frames) {
        if (f.type == type_goaway && f.payload.size() >= 8) {
            return frame::decode_u32(f.payload.data());
        }
    }
    return no_code;
}

// Returns the error code of the first RST_STREAM on stream_id among frames, or no_code.
std::uint32_t rst_stream_code(const std::vector<raw_frame>& frames, std::uint32_t stream_id) {
    for (const auto& f : frames) {
        if (f.type == type_rst_stream && f.stream_id == stream_id && f.payload.size() == 4) {
            return frame::decode_u32(f.payload.data());
        }
    }
    return no_code;
}

// A real session on one end of a loopback connection and a plain socket on the other end,
// through which the test plays the peer. The destructor works like session_pair's.
class wire_peer {
public:
    explicit wire_peer(const mux::session_options& options) : incoming(io), socket(io) {
        auto [a, b] = connected_sockets(io);
        socket = std::move(a);
        session = make_session(io, std::move(b), options, 1);
        incoming.attach(*session);
        asio::co_spawn(io, serve(session, result), asio::detached);
    }

    ~wire_peer() { session->close({}); }

    wire_peer(const wire_peer&) = delete;
    wire_peer& operator=(const wire_peer&) = delete;

    void run(asio::awaitable<void> task, steady::duration limit = task_limit) {
        run_task(io, std::move(task), limit);
    }

    asio::awaitable<void> send(byte_vector bytes) {
        co_await asio::async_write(socket, asio::buffer(bytes), asio::use_awaitable);
    }

    // Sends bytes one per write, pausing after each, so that every frame reaches the session in
    // pieces.
    asio::awaitable<void> send_bytewise(byte_vector bytes) {
        for (auto b : bytes) {
            co_await asio::async_write(socket, asio::buffer(&b, 1), asio::use_awaitable);
            co_await net::sleep(100us);
        }
    }

    // Reads one frame, or returns nothing once the session closed the connection.
    asio::awaitable<std::optional<raw_frame>> read_frame() {
        std::uint8_t header[frame::header_size];
        auto [ec, n] = co_await asio::async_read(socket, asio::buffer(header),
                                                 asio::as_tuple(asio::use_awaitable));
        if (ec) {
            co_return std::nullopt;
        }
        raw_frame f;
        auto length =
            (std::uint32_t{header[0]} << 16) | (std::uint32_t{header[1]} << 8) | header[2];
        f.type = header[3];
        f.flags = header[4];
        f.stream_id = frame::decode_u32(header + 5);
        f.payload.resize(length);
        auto [payload_ec, m] = co_await asio::async_read(socket, asio::buffer(f.payload),
                                                         asio::as_tuple(asio::use_awaitable));
        if (payload_ec) {
            co_return std::nullopt;
        }
        co_return f;
    }

    // Reads frames until the session closes the connection.
    asio::awaitable<std::vector<raw_frame>> read_until_closed() {
        std::vector<raw_frame> frames;
        for (int i = 0; i < 100'000; ++i) {
            auto f = co_await read_frame();
            if (!f) {
                break;
            }
            frames.push_back(std::move(*f));
        }
        co_return frames;
    }

    // Reads frames until one of type arrives with all of flags set. Fails at end of stream.
    asio::awaitable<raw_frame> read_until(std::uint8_t type, std::uint8_t flags = 0) {
        for (int i = 0; i < 100'000; ++i) {
            auto f = co_await read_frame();
            REQUIRE(f.has_value());
            if (f->type == type && (f->flags & flags) == flags) {
                co_return std::move(*f);
            }
        }
        FAIL("no frame of type " << int{type} << " among the first 100000");
        co_return raw_frame{};
    }

    asio::awaitable<void> wait_finished() {
        auto r = result;
        co_await wait_until([r] { return r->finished; });
    }

    asio::io_context io;  // first member, so that it is destroyed last
    stream_inbox incoming;
    tcp::socket socket;
    std::shared_ptr<mux::session> session;
    std::shared_ptr<outcome> result = std::make_shared<outcome>();
};

// Sends the HELLO of the other role and then frames to a session with options. Checks that
// the session sends GOAWAY with expected and closes the connection, and that its run() returns
// expected.
void check_connection_error(const mux::session_options& options, byte_vector frames,
                            errc expected) {
    wire_peer t(options);
    std::vector<raw_frame> received;
    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(join(peer_hello(options.role), frames));
        received = co_await t.read_until_closed();
        co_await t.wait_finished();
    };
    t.run(test());

    REQUIRE_FALSE(received.empty());
    CHECK(received.front().type == type_hello);
    CHECK(goaway_code(received) == wire(expected));
    CHECK_FALSE(t.result->handshake);
    CHECK(t.result->run == expected);
    CHECK(t.session->closed());
}

// Sends first_frames in place of a valid HELLO to a session with options. Checks that the
// handshake fails with expected and that the session sends GOAWAY with the same code.
void check_handshake_error(const mux::session_options& options, byte_vector first_frames,
                           errc expected) {
    wire_peer t(options);
    std::vector<raw_frame> received;
    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(first_frames);
        received = co_await t.read_until_closed();
        co_await t.wait_finished();
    };
    t.run(test());

    REQUIRE_FALSE(received.empty());
    CHECK(received.front().type == type_hello);
    CHECK(goaway_code(received) == wire(expected));
    CHECK(goaway_last_stream_id(received) == 0);
    CHECK(t.result->handshake == expected);
    CHECK(t.session->closed());
}

// HEADERS of GET / on stream 1 with END_STREAM: method "GET", target "/", no fields.
const std::string get_stream_1 = "00000a 01 01 00000001 0003 474554 0001 2f 0000";
// HEADERS of POST / on stream 1, the body still to come.
const std::string post_stream_1 = "00000b 01 00 00000001 0004 504f5354 0001 2f 0000";
const std::string ping_frame = "000008 05 00 00000000 0102030405060708";

// Opens POST / on streams 1 and 3 towards a bridge session with options. Checks that the
// session refuses stream 3 with REFUSED_STREAM and keeps stream 1.
void check_second_stream_refused(const mux::session_options& options) {
    wire_peer t(options);
    raw_frame reset;

    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(join(peer_hello(frame::role::bridge), hex(post_stream_1),
                             hex("00000b 01 00 00000003 0004 504f5354 0001 2f 0000")));
        reset = co_await t.read_until(type_rst_stream);
        co_await net::sleep(settle_time);
    };
    t.run(test());

    CHECK(reset.stream_id == 3);
    CHECK(reset.payload == hex("00000006"));  // refused_stream
    CHECK(t.incoming.waiting() == 1);
    CHECK(t.session->open_streams() == 1);
}

}  // namespace

TEST_CASE("session rejects a frame before HELLO", "[mux][wire]") {
    check_handshake_error(options_for(frame::role::broker), hex(ping_frame), errc::protocol_error);
}

TEST_CASE("session rejects a HELLO of another version", "[mux][wire]") {
    check_handshake_error(options_for(frame::role::broker), hello_frame("02", "", "0002"),
                          errc::version_mismatch);
}

TEST_CASE("session rejects a HELLO of its own role", "[mux][wire]") {
    check_handshake_error(options_for(frame::role::broker), hello_frame("01"),
                          errc::protocol_error);
}

TEST_CASE("session rejects a HELLO with an invalid setting", "[mux][wire]") {
    SECTION("max_frame_payload below 16 KiB") {
        check_handshake_error(options_for(frame::role::broker), hello_frame("02", "0001 000003e8"),
                              errc::protocol_error);
    }
    SECTION("initial_stream_window above 2^31-1") {
        check_handshake_error(options_for(frame::role::broker), hello_frame("02", "0002 80000000"),
                              errc::flow_control_error);
    }
}

TEST_CASE("session rejects an unknown frame type before HELLO", "[mux][wire]") {
    // Before the HELLO, every failed header check is FRAME_SIZE_ERROR ("invalid first frame").
    check_handshake_error(options_for(frame::role::broker), hex("000000 07 00 00000000"),
                          errc::frame_size_error);
}

TEST_CASE("handshake times out without HELLO", "[mux][wire]") {
    auto options = options_for(frame::role::broker);
    options.hello_timeout = 100ms;
    wire_peer t(options);
    std::vector<raw_frame> received;

    auto test = [&]() -> asio::awaitable<void> {
        received = co_await t.read_until_closed();
        co_await t.wait_finished();
    };
    t.run(test());

    CHECK(t.result->handshake == errc::timeout);
    REQUIRE(received.size() == 1);
    CHECK(received.front().type == type_hello);
}

TEST_CASE("session rejects a second HELLO", "[mux][wire]") {
    check_connection_error(options_for(frame::role::broker), hello_frame("02"),
                           errc::protocol_error);
}

TEST_CASE("session rejects an unknown frame type", "[mux][wire]") {
    check_connection_error(options_for(frame::role::broker), hex("000000 07 00 00000000"),
                           errc::protocol_error);
}

TEST_CASE("broker rejects HEADERS from the bridge side", "[mux][wire]") {
    // A response head (status 200, no fields) on stream 1, which the broker never opened.
    check_connection_error(options_for(frame::role::broker), hex("000004 01 00 00000001 00c8 0000"),
                           errc::protocol_error);
}

TEST_CASE("bridge rejects HEADERS that reuse a stream id", "[mux][wire]") {
    auto stream_3 = "00000a 01 01 00000003 0003 474554 0001 2f 0000";
    check_connection_error(options_for(frame::role::bridge), join(hex(stream_3), hex(get_stream_1)),
                           errc::stream_closed);
}

TEST_CASE("session rejects DATA on a stream never opened", "[mux][wire]") {
    check_connection_error(options_for(frame::role::bridge), hex("000001 02 00 00000005 41"),
                           errc::protocol_error);
}

TEST_CASE("session rejects RST_STREAM on a stream never opened", "[mux][wire]") {
    check_connection_error(options_for(frame::role::bridge), hex("000004 04 00 00000005 00000007"),
                           errc::protocol_error);
}

TEST_CASE("session rejects WINDOW_UPDATE on a stream never opened", "[mux][wire]") {
    check_connection_error(options_for(frame::role::bridge), hex("000004 03 00 00000005 00000001"),
                           errc::protocol_error);
}

TEST_CASE("bridge rejects HEADERS above its max_header_block", "[mux][wire]") {
    auto options = options_for(frame::role::bridge);
    options.local.max_header_block = 1024;
    check_connection_error(options, make_frame(type_headers, 0, 1, pattern(1025)),
                           errc::frame_size_error);
}

TEST_CASE("session rejects a WINDOW_UPDATE of 0", "[mux][wire]") {
    check_connection_error(options_for(frame::role::broker), hex("000004 03 00 00000000 00000000"),
                           errc::protocol_error);
}

TEST_CASE("session rejects a GOAWAY shorter than 8 bytes", "[mux][wire]") {
    check_connection_error(options_for(frame::role::broker), hex("000004 06 00 00000000 00000001"),
                           errc::frame_size_error);
}

TEST_CASE("session rejects a frame above its max_frame_payload", "[mux][wire]") {
    auto options = options_for(frame::role::bridge);
    options.local.max_frame_payload = frame::min_max_frame_payload;
    // DATA of exactly max_frame_payload is accepted, but the header of one byte more is not.
    auto largest = make_frame(type_data, 0, 1, pattern(frame::min_max_frame_payload));
    check_connection_error(options, join(hex(post_stream_1), largest, hex("004001 02 00 00000001")),
                           errc::frame_size_error);
}

TEST_CASE("session rejects DATA beyond the stream window", "[mux][wire]") {
    auto options = options_for(frame::role::bridge);
    options.local.initial_stream_window = 1000;
    // 1000 bytes fill the window exactly, so one more byte exceeds it.
    auto full = make_frame(type_data, 0, 1, pattern(1000));
    check_connection_error(options, join(hex(post_stream_1), full, hex("000001 02 00 00000001 41")),
                           errc::flow_control_error);
}

TEST_CASE("session rejects DATA beyond the connection window", "[mux][wire]") {
    auto options = options_for(frame::role::bridge);
    options.local.initial_connection_window = 1000;
    options.buffer_budget_bytes = 0;  // credit comes back only as the stream is read
    auto full = make_frame(type_data, 0, 1, pattern(1000));
    check_connection_error(options, join(hex(post_stream_1), full, hex("000001 02 00 00000001 41")),
                           errc::flow_control_error);
}

TEST_CASE("connection window overflow closes the session", "[mux][wire]") {
    // The peer announces a connection window of 0x7ffffff0. An increment of 0x0f reaches
    // 2^31-1 exactly, and one more byte of credit is too much.
    wire_peer t(options_for(frame::role::broker));
    std::vector<raw_frame> received;

    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(join(hello_frame("02", "0005 7ffffff0"),
                             hex("000004 03 00 00000000 0000000f"), hex(ping_frame)));
        auto ack = co_await t.read_until(type_ping, frame::flag::ack);
        CHECK(ack.payload == hex("0102030405060708"));
        co_await t.send(hex("000004 03 00 00000000 00000001"));
        received = co_await t.read_until_closed();
        co_await t.wait_finished();
    };
    t.run(test());

    CHECK(goaway_code(received) == wire(errc::flow_control_error));
    CHECK(t.result->run == errc::flow_control_error);
}

TEST_CASE("stream window overflow resets the stream", "[mux][wire]") {
    // The peer's HELLO keeps the default stream window of 4 MiB (0x400000), so
    // 0x7fffffff - 0x400000 = 0x7fbfffff more reaches 2^31-1 exactly.
    wire_peer t(options_for(frame::role::broker));
    std::vector<raw_frame> received;
    std::shared_ptr<mux::stream> s;

    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(peer_hello(frame::role::broker));
        co_await wait_until([&] { return t.result->handshake_done; });
        auto opened = t.session->open(get_request(), false);
        REQUIRE(opened.has_value());
        s = *opened;
        auto headers = co_await t.read_until(type_headers);
        CHECK(headers.stream_id == 1);

        co_await t.send(join(hex("000004 03 00 00000001 7fbfffff"), hex(ping_frame)));
        co_await t.read_until(type_ping, frame::flag::ack);
        CHECK_FALSE(s->error());
        co_await t.send(join(hex("000004 03 00 00000001 00000001"), hex(ping_frame)));
        for (int i = 0; i < 10; ++i) {
            auto f = co_await t.read_frame();
            REQUIRE(f.has_value());
            received.push_back(*f);
            if (f->type == type_ping) {
                break;
            }
        }
    };
    t.run(test());

    CHECK(rst_stream_code(received, 1) == wire(errc::flow_control_error));
    CHECK(goaway_code(received) == no_code);
    CHECK(s->error() == errc::flow_control_error);
    CHECK_FALSE(t.session->closed());
}

TEST_CASE("PING flood gets enhance_your_calm", "[mux][wire]") {
    auto options = options_for(frame::role::broker);
    options.max_queued_control_frames = 8;
    // All PINGs go in one write, so that the session reads them before its writer runs.
    byte_vector pings;
    for (int i = 0; i < 64; ++i) {
        auto p = hex(ping_frame);
        pings.insert(pings.end(), p.begin(), p.end());
    }
    check_connection_error(options, pings, errc::enhance_your_calm);
}

TEST_CASE("PING gets an ACK with the same payload", "[mux][wire]") {
    wire_peer t(options_for(frame::role::bridge));

    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(
            join(peer_hello(frame::role::bridge), hex("000008 05 00 00000000 00000000cafef00d")));
        auto ack = co_await t.read_until(type_ping, frame::flag::ack);
        CHECK(ack.stream_id == 0);
        CHECK(ack.payload == hex("00000000cafef00d"));
    };
    t.run(test());
}

TEST_CASE("keepalive timeout closes a silent session", "[mux][wire]") {
    auto options = options_for(frame::role::broker);
    options.keepalive_interval = 30ms;
    options.keepalive_timeout = 60ms;
    wire_peer t(options);
    std::vector<raw_frame> received;

    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(peer_hello(frame::role::broker));
        received = co_await t.read_until_closed();
        co_await t.wait_finished();
    };
    auto started = steady::now();
    t.run(test());
    auto elapsed = steady::now() - started;

    CHECK(t.result->run == errc::timeout);
    CHECK(t.session->closed());
    bool ping_seen = std::any_of(received.begin(), received.end(), [](const raw_frame& f) {
        return f.type == type_ping && (f.flags & frame::flag::ack) == 0;
    });
    CHECK(ping_seen);
    CHECK(goaway_code(received) == no_code);  // a keepalive timeout sends no GOAWAY
    CHECK(elapsed >= 90ms);
    CHECK(elapsed < 2s);
}

TEST_CASE("malformed request head resets the stream", "[mux][wire]") {
    wire_peer t(options_for(frame::role::bridge));
    std::vector<raw_frame> received;

    auto test = [&]() -> asio::awaitable<void> {
        // The target "a b" contains a space.
        co_await t.send(join(peer_hello(frame::role::bridge),
                             hex("00000c 01 01 00000001 0003 474554 0003 612062 0000"),
                             hex(ping_frame)));
        for (int i = 0; i < 10; ++i) {
            auto f = co_await t.read_frame();
            REQUIRE(f.has_value());
            received.push_back(*f);
            if (f->type == type_ping) {
                break;
            }
        }
        // The connection goes on: the next stream is accepted.
        co_await t.send(hex("00000a 01 01 00000003 0003 474554 0001 2f 0000"));
        auto s = co_await t.incoming.next();
        CHECK(s->id() == 3);
    };
    t.run(test());

    CHECK(rst_stream_code(received, 1) == wire(errc::protocol_error));
    CHECK(goaway_code(received) == no_code);
    CHECK_FALSE(t.session->closed());
}

TEST_CASE("bridge refuses streams above max_concurrent_streams", "[mux][wire]") {
    auto options = options_for(frame::role::bridge);
    options.local.max_concurrent_streams = 1;
    check_second_stream_refused(options);
}

TEST_CASE("bridge refuses request heads above their budget", "[mux][wire]") {
    auto options = options_for(frame::role::bridge);
    // Each POST head of the check is 11 bytes: the first fits, the second does not.
    options.request_head_budget_bytes = 20;
    check_second_stream_refused(options);
}

TEST_CASE("peer GOAWAY refuses streams above last_stream_id", "[mux][wire]") {
    wire_peer t(options_for(frame::role::broker));
    bool goaway_seen = false;
    t.session->on_goaway = [&] { goaway_seen = true; };
    std::vector<std::shared_ptr<mux::stream>> streams;

    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(peer_hello(frame::role::broker));
        co_await wait_until([&] { return t.result->handshake_done; });
        for (int i = 0; i < 3; ++i) {
            auto opened = t.session->open(get_request(), true);
            REQUIRE(opened.has_value());
            streams.push_back(*opened);
        }
        // GOAWAY: last_stream_id 1, no_error, debug text "bye".
        co_await t.send(hex("00000b 06 00 00000000 00000001 00000000 627965"));
        co_await wait_until([&] { return goaway_seen; });
    };
    t.run(test());

    CHECK_FALSE(streams[0]->error());
    CHECK(streams[1]->error() == errc::refused_stream);
    CHECK(streams[2]->error() == errc::refused_stream);
    CHECK(t.session->open_streams() == 1);
    CHECK(t.session->draining());
    CHECK_FALSE(t.session->can_open());
    CHECK_FALSE(t.session->closed());
}

TEST_CASE("DATA after END_STREAM resets the stream", "[mux][wire]") {
    wire_peer t(options_for(frame::role::bridge));
    std::vector<raw_frame> received;

    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(join(peer_hello(frame::role::bridge), hex(get_stream_1),
                             hex("000001 02 00 00000001 41"), hex(ping_frame)));
        for (int i = 0; i < 10; ++i) {
            auto f = co_await t.read_frame();
            REQUIRE(f.has_value());
            received.push_back(*f);
            if (f->type == type_ping) {
                break;
            }
        }
    };
    t.run(test());

    CHECK(rst_stream_code(received, 1) == wire(errc::stream_closed));
    CHECK(goaway_code(received) == no_code);
    CHECK_FALSE(t.session->closed());
    CHECK(t.session->open_streams() == 0);
}

TEST_CASE("DATA before the response head resets the stream", "[mux][wire]") {
    wire_peer t(options_for(frame::role::broker));
    std::vector<raw_frame> received;
    std::shared_ptr<mux::stream> s;

    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(peer_hello(frame::role::broker));
        co_await wait_until([&] { return t.result->handshake_done; });
        auto opened = t.session->open(get_request(), true);
        REQUIRE(opened.has_value());
        s = *opened;
        co_await t.read_until(type_headers);
        co_await t.send(join(hex("000002 02 01 00000001 6f6b"), hex(ping_frame)));
        for (int i = 0; i < 10; ++i) {
            auto f = co_await t.read_frame();
            REQUIRE(f.has_value());
            received.push_back(*f);
            if (f->type == type_ping) {
                break;
            }
        }
        auto head = co_await s->read_response_head();
        REQUIRE_FALSE(head.has_value());
        CHECK(head.error() == errc::protocol_error);
    };
    t.run(test());

    CHECK(rst_stream_code(received, 1) == wire(errc::protocol_error));
    CHECK(goaway_code(received) == no_code);
    CHECK_FALSE(t.session->closed());
}

TEST_CASE("second response head resets the stream", "[mux][wire]") {
    wire_peer t(options_for(frame::role::broker));
    std::vector<raw_frame> received;
    std::shared_ptr<mux::stream> s;

    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(peer_hello(frame::role::broker));
        co_await wait_until([&] { return t.result->handshake_done; });
        auto opened = t.session->open(get_request(), true);
        REQUIRE(opened.has_value());
        s = *opened;
        co_await t.read_until(type_headers);
        // Two response heads of status 200 without END_STREAM.
        co_await t.send(join(hex("000004 01 00 00000001 00c8 0000"),
                             hex("000004 01 00 00000001 00c8 0000"), hex(ping_frame)));
        for (int i = 0; i < 10; ++i) {
            auto f = co_await t.read_frame();
            REQUIRE(f.has_value());
            received.push_back(*f);
            if (f->type == type_ping) {
                break;
            }
        }
    };
    t.run(test());

    CHECK(rst_stream_code(received, 1) == wire(errc::protocol_error));
    CHECK(goaway_code(received) == no_code);
    CHECK(s->error() == errc::protocol_error);
    CHECK_FALSE(t.session->closed());
}

TEST_CASE("bridge refuses streams after its GOAWAY", "[mux][wire]") {
    wire_peer t(options_for(frame::role::bridge));
    raw_frame goaway;
    raw_frame reset;

    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send(peer_hello(frame::role::bridge));
        co_await wait_until([&] { return t.result->handshake_done; });
        t.session->goaway(errc::no_error, "bridge is shutting down");
        goaway = co_await t.read_until(type_goaway);
        co_await t.send(hex(get_stream_1));
        reset = co_await t.read_until(type_rst_stream);
    };
    t.run(test());

    CHECK(goaway.payload ==
          join(hex("00000000 00000000"), byte_vector{std::begin("bridge is shutting down"),
                                                     std::end("bridge is shutting down") - 1}));
    CHECK(reset.stream_id == 1);
    CHECK(reset.payload == hex("00000006"));  // refused_stream
    CHECK(t.incoming.waiting() == 0);
    CHECK_FALSE(t.session->closed());
}

TEST_CASE("bridge reads frames fed one byte at a time", "[mux][wire]") {
    wire_peer t(options_for(frame::role::bridge));
    // POST /v1/kv with "Host: vault", then DATA "hello", then an empty DATA with END_STREAM.
    auto request = join(peer_hello(frame::role::bridge),
                        hex("00001d 01 00 00000001 0004 504f5354 0006 2f76312f6b76 "
                            "0001 0004 486f7374 0005 7661756c74"),
                        hex("000005 02 00 00000001 68656c6c6f"), hex("000000 02 01 00000001"));
    byte_vector response_body;
    std::optional<frame::response_head> response_head;
    // Built outside the coroutine: g++ 12 rejects a braced vector inside one.
    const byte_vector world{'w', 'o', 'r', 'l', 'd'};

    auto bridge_side = [&]() -> asio::awaitable<void> {
        auto s = co_await t.incoming.next();
        CHECK(s->request().method == "POST");
        CHECK(s->request().target == "/v1/kv");
        REQUIRE(s->request().fields.size() == 1);
        CHECK(s->request().fields[0].name == "Host");
        CHECK(s->request().fields[0].value == "vault");
        auto [body, ec] = co_await read_body(s);
        CHECK_FALSE(ec);
        CHECK(std::string(body.begin(), body.end()) == "hello");
        CHECK_FALSE(s->write_response_head({200, {}}, false));
        auto written = co_await s->write(world, true);
        CHECK_FALSE(written);
    };
    auto peer_side = [&]() -> asio::awaitable<void> {
        co_await t.send_bytewise(request);
        for (int i = 0; i < 100; ++i) {
            auto f = co_await t.read_frame();
            REQUIRE(f.has_value());
            if (f->type == type_headers) {
                auto head = frame::decode_response_head(f->payload);
                REQUIRE(head.has_value());
                response_head = *head;
            } else if (f->type == type_data) {
                CHECK(f->stream_id == 1);
                response_body.insert(response_body.end(), f->payload.begin(), f->payload.end());
                if (f->flags & frame::flag::end_stream) {
                    break;
                }
            }
        }
    };

    auto bridge_task = start_task(t.io, bridge_side());
    t.run(peer_side());
    t.run(join(bridge_task));

    REQUIRE(response_head.has_value());
    CHECK(response_head->status == 200);
    CHECK(std::string(response_body.begin(), response_body.end()) == "world");
    CHECK(t.session->bytes_received() == request.size());
    CHECK_FALSE(t.session->closed());
}

TEST_CASE("broker reads a response fed one byte at a time", "[mux][wire]") {
    wire_peer t(options_for(frame::role::broker));
    std::shared_ptr<mux::stream> s;

    auto test = [&]() -> asio::awaitable<void> {
        co_await t.send_bytewise(peer_hello(frame::role::broker));
        co_await wait_until([&] { return t.result->handshake_done; });
        REQUIRE_FALSE(t.result->handshake);
        auto opened = t.session->open(get_request(), true);
        REQUIRE(opened.has_value());
        s = *opened;
        co_await t.read_until(type_headers);
        // Status 200 with "Content-Length: 2", then DATA "ok" with END_STREAM.
        co_await t.send_bytewise(
            join(hex("000017 01 00 00000001 00c8 0001 000e 436f6e74656e742d4c656e677468 0001 32"),
                 hex("000002 02 01 00000001 6f6b")));
        auto head = co_await s->read_response_head();
        REQUIRE(head.has_value());
        CHECK(head->status == 200);
        REQUIRE(head->fields.size() == 1);
        CHECK(head->fields[0].name == "Content-Length");
        CHECK(head->fields[0].value == "2");
        auto [body, ec] = co_await read_body(s);
        CHECK_FALSE(ec);
        CHECK(std::string(body.begin(), body.end()) == "ok");
    };
    t.run(test());

    CHECK(t.session->open_streams() == 0);
}
