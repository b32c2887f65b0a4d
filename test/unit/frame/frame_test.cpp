// SPDX-License-Identifier: Apache-2.0
// Unit tests of the frame encoder and decoder (docs/protocol.md §3-§5), fed raw bytes.
#include <catch2/catch.hpp>

#include <vector>

#include "taser/frame/frame.hpp"

namespace frame = taser::frame;
using taser::errc;

namespace {

std::vector<std::uint8_t> bytes(std::initializer_list<int> list) {
    std::vector<std::uint8_t> out;
    for (int b : list) {
        out.push_back(static_cast<std::uint8_t>(b));
    }
    return out;
}

constexpr std::uint32_t max_payload = 64 * 1024;

}  // namespace

TEST_CASE("header round trip keeps every field", "[frame]") {
    frame::frame_header h{0x012345, frame::frame_type::data, frame::flag::end_stream, 7};
    std::uint8_t out[frame::header_size];

    frame::encode_header(h, out);
    auto decoded = frame::decode_header({out, frame::header_size}, 0xffffff);

    REQUIRE(decoded.has_value());
    CHECK(decoded->length == 0x012345);
    CHECK(decoded->type == frame::frame_type::data);
    CHECK(decoded->flags == frame::flag::end_stream);
    CHECK(decoded->stream_id == 7);
}

TEST_CASE("header decoder rejects a short header", "[frame]") {
    auto in = bytes({0, 0, 4, 3, 0, 0, 0, 0});

    auto decoded = frame::decode_header(in, max_payload);

    REQUIRE_FALSE(decoded.has_value());
    CHECK(decoded.error() == errc::frame_size_error);
}

TEST_CASE("header decoder rejects a length above max_payload_bytes", "[frame]") {
    auto in = bytes({0x01, 0x00, 0x01, 0x02, 0, 0, 0, 0, 1});  // 65537 bytes of DATA

    auto decoded = frame::decode_header(in, max_payload);

    REQUIRE_FALSE(decoded.has_value());
    CHECK(decoded.error() == errc::frame_size_error);
}

TEST_CASE("header decoder rejects an unknown frame type", "[frame]") {
    auto in = bytes({0, 0, 0, 0x42, 0, 0, 0, 0, 1});

    auto decoded = frame::decode_header(in, max_payload);

    REQUIRE_FALSE(decoded.has_value());
    CHECK(decoded.error() == errc::protocol_error);
}

TEST_CASE("header decoder checks stream id rules per type", "[frame]") {
    SECTION("DATA on stream 0") {
        auto decoded = frame::decode_header(bytes({0, 0, 1, 0x02, 0, 0, 0, 0, 0}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::protocol_error);
    }
    SECTION("HEADERS on stream 0") {
        auto decoded = frame::decode_header(bytes({0, 0, 1, 0x01, 0, 0, 0, 0, 0}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::protocol_error);
    }
    SECTION("PING on a stream") {
        auto decoded = frame::decode_header(bytes({0, 0, 8, 0x05, 0, 0, 0, 0, 3}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::protocol_error);
    }
    SECTION("GOAWAY on a stream") {
        auto decoded = frame::decode_header(bytes({0, 0, 8, 0x06, 0, 0, 0, 0, 3}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::protocol_error);
    }
    SECTION("HELLO on a stream") {
        auto decoded = frame::decode_header(bytes({0, 0, 20, 0x00, 0, 0, 0, 0, 1}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::protocol_error);
    }
    SECTION("RST_STREAM on stream 0") {
        auto decoded = frame::decode_header(bytes({0, 0, 4, 0x04, 0, 0, 0, 0, 0}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::protocol_error);
    }
}

TEST_CASE("header decoder checks fixed lengths", "[frame]") {
    SECTION("WINDOW_UPDATE of 3 bytes") {
        auto decoded = frame::decode_header(bytes({0, 0, 3, 0x03, 0, 0, 0, 0, 1}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::frame_size_error);
    }
    SECTION("PING of 7 bytes") {
        auto decoded = frame::decode_header(bytes({0, 0, 7, 0x05, 0, 0, 0, 0, 0}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::frame_size_error);
    }
    SECTION("RST_STREAM of 5 bytes") {
        auto decoded = frame::decode_header(bytes({0, 0, 5, 0x04, 0, 0, 0, 0, 1}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::frame_size_error);
    }
    SECTION("GOAWAY of 7 bytes") {
        auto decoded = frame::decode_header(bytes({0, 0, 7, 0x06, 0, 0, 0, 0, 0}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::frame_size_error);
    }
    SECTION("HELLO whose settings are cut") {
        auto decoded = frame::decode_header(bytes({0, 0, 23, 0x00, 0, 0, 0, 0, 0}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::frame_size_error);
    }
}

TEST_CASE("header decoder ignores the reserved bit of the stream id", "[frame]") {
    auto decoded = frame::decode_header(bytes({0, 0, 0, 0x02, 1, 0x80, 0, 0, 5}), max_payload);

    REQUIRE(decoded.has_value());
    CHECK(decoded->stream_id == 5);
}

TEST_CASE("hello round trip keeps settings", "[frame]") {
    frame::hello h;
    h.role = frame::role::bridge;
    h.instance[0] = 0xab;
    h.settings.max_frame_payload = 32 * 1024;
    h.settings.initial_stream_window = 1 << 20;
    h.settings.max_concurrent_streams = 99;
    h.settings.replicas = 3;

    auto decoded = frame::decode_hello(frame::encode_hello(h));

    REQUIRE(decoded.has_value());
    CHECK(decoded->version == frame::protocol_version);
    CHECK(decoded->role == frame::role::bridge);
    CHECK(decoded->instance[0] == 0xab);
    CHECK(decoded->settings.max_frame_payload == 32 * 1024);
    CHECK(decoded->settings.initial_stream_window == 1u << 20);
    CHECK(decoded->settings.max_concurrent_streams == 99);
    CHECK(decoded->settings.replicas == 3);
}

TEST_CASE("hello decoder rejects invalid settings", "[frame]") {
    auto base = frame::encode_hello(frame::hello{});
    auto with_setting = [&](std::uint16_t id, std::uint32_t value) {
        auto b = base;
        b.push_back(static_cast<std::uint8_t>(id >> 8));
        b.push_back(static_cast<std::uint8_t>(id));
        for (int shift = 24; shift >= 0; shift -= 8) {
            b.push_back(static_cast<std::uint8_t>(value >> shift));
        }
        return b;
    };

    SECTION("max frame payload below 16 KiB") {
        auto decoded = frame::decode_hello(with_setting(0x1, 1000));
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::protocol_error);
    }
    SECTION("stream window above 2^31-1") {
        auto decoded = frame::decode_hello(with_setting(0x2, 0x80000000u));
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::flow_control_error);
    }
    SECTION("unknown setting is ignored") {
        auto decoded = frame::decode_hello(with_setting(0x7f, 5));
        CHECK(decoded.has_value());
    }
    SECTION("unknown role") {
        auto b = base;
        b[2] = 9;
        auto decoded = frame::decode_hello(b);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::protocol_error);
    }
    SECTION("payload shorter than the fixed part") {
        auto decoded = frame::decode_hello(bytes({0, 1, 1, 0}));
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::frame_size_error);
    }
}

TEST_CASE("request head round trip keeps field order and repeats", "[frame]") {
    frame::request_head h{"GET", "/v1/secret/data/app?version=2",
                          {{"X-Vault-Index", "a"}, {"Host", "vault"}, {"X-Vault-Index", "b"}}};

    auto decoded = frame::decode_request_head(frame::encode_request_head(h));

    REQUIRE(decoded.has_value());
    CHECK(decoded->method == "GET");
    CHECK(decoded->target == "/v1/secret/data/app?version=2");
    REQUIRE(decoded->fields.size() == 3);
    CHECK(decoded->fields[0].value == "a");
    CHECK(decoded->fields[1].name == "Host");
    CHECK(decoded->fields[2].value == "b");
}

TEST_CASE("head decoders reject malformed heads", "[frame]") {
    SECTION("field value with CR LF") {
        frame::request_head h{"GET", "/", {{"X-A", "a\r\nX-Injected: 1"}}};
        CHECK_FALSE(frame::decode_request_head(frame::encode_request_head(h)).has_value());
    }
    SECTION("field name with a space") {
        frame::request_head h{"GET", "/", {{"X A", "a"}}};
        CHECK_FALSE(frame::decode_request_head(frame::encode_request_head(h)).has_value());
    }
    SECTION("method that is not a token") {
        frame::request_head h{"GE T", "/", {}};
        CHECK_FALSE(frame::decode_request_head(frame::encode_request_head(h)).has_value());
    }
    SECTION("target with a space") {
        frame::request_head h{"GET", "/a b", {}};
        CHECK_FALSE(frame::decode_request_head(frame::encode_request_head(h)).has_value());
    }
    SECTION("string length beyond the payload") {
        CHECK_FALSE(frame::decode_request_head(bytes({0, 3, 'G', 'E'})).has_value());
    }
    SECTION("trailing bytes after the fields") {
        auto b = frame::encode_request_head({"GET", "/", {}});
        b.push_back(0);
        CHECK_FALSE(frame::decode_request_head(b).has_value());
    }
    SECTION("status outside 100-599") {
        CHECK_FALSE(frame::decode_response_head(frame::encode_response_head({600, {}})).has_value());
        CHECK_FALSE(frame::decode_response_head(frame::encode_response_head({99, {}})).has_value());
    }
    SECTION("field count above the limit") {
        auto b = bytes({0, 200, 0x02, 0x01});  // status 200, 513 fields announced
        CHECK_FALSE(frame::decode_response_head(b).has_value());
    }
}

TEST_CASE("window update decoder rejects 0 and values above 2^31-1", "[frame]") {
    CHECK_FALSE(frame::decode_window_update(bytes({0, 0, 0, 0})).has_value());
    CHECK_FALSE(frame::decode_window_update(bytes({0x80, 0, 0, 0})).has_value());
    auto ok = frame::decode_window_update(bytes({0x7f, 0xff, 0xff, 0xff}));
    REQUIRE(ok.has_value());
    CHECK(*ok == 0x7fffffffu);
}

TEST_CASE("goaway round trip keeps its reason", "[frame]") {
    frame::goaway g{41, static_cast<std::uint32_t>(errc::no_error), "draining"};

    auto decoded = frame::decode_goaway(frame::encode_goaway(g));

    REQUIRE(decoded.has_value());
    CHECK(decoded->last_stream_id == 41);
    CHECK(decoded->error_code == 0);
    CHECK(decoded->debug == "draining");
}
