// SPDX-License-Identifier: Apache-2.0
// Unit tests of the frame encoder and decoder (docs/protocol.md §3-§5), fed raw bytes.
#include "taser/frame/frame.hpp"

#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

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
    frame::request_head h{"GET",
                          "/v1/secret/data/app?version=2",
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
        CHECK_FALSE(
            frame::decode_response_head(frame::encode_response_head({600, {}})).has_value());
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

// The examples of docs/protocol.md, byte for byte.
namespace {

// Parses hex digits and skips spaces: hex("00 01") is {0x00, 0x01}.
std::vector<std::uint8_t> hex(std::string_view text) {
    std::vector<std::uint8_t> out;
    std::string digits;
    for (char c : text) {
        if (c != ' ') {
            digits.push_back(c);
        }
    }
    REQUIRE(digits.size() % 2 == 0);
    for (std::size_t i = 0; i < digits.size(); i += 2) {
        out.push_back(static_cast<std::uint8_t>(std::stoi(digits.substr(i, 2), nullptr, 16)));
    }
    return out;
}

frame::bytes payload_of(const std::vector<std::uint8_t>& whole_frame) {
    return frame::bytes(whole_frame).subspan(frame::header_size);
}

}  // namespace

TEST_CASE("header checks follow the documented order", "[frame]") {
    SECTION("length above the maximum before an unknown type") {
        auto decoded =
            frame::decode_header(bytes({0x01, 0x00, 0x01, 0x42, 0, 0, 0, 0, 1}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::frame_size_error);
    }
    SECTION("unknown type before the stream id rule") {
        auto decoded = frame::decode_header(bytes({0, 0, 0, 0x07, 0, 0, 0, 0, 0}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::protocol_error);
    }
    SECTION("stream id rule before the length rule: PING on stream 1 with 9 bytes") {
        auto decoded = frame::decode_header(bytes({0, 0, 9, 0x05, 0, 0, 0, 0, 1}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::protocol_error);
    }
    SECTION("stream id rule before the length rule: RST_STREAM on stream 0 with 5 bytes") {
        auto decoded = frame::decode_header(bytes({0, 0, 5, 0x04, 0, 0, 0, 0, 0}), max_payload);
        REQUIRE_FALSE(decoded.has_value());
        CHECK(decoded.error() == errc::protocol_error);
    }
    SECTION("WINDOW_UPDATE is allowed on any stream") {
        CHECK(frame::decode_header(bytes({0, 0, 4, 0x03, 0, 0, 0, 0, 0}), max_payload).has_value());
        CHECK(frame::decode_header(bytes({0, 0, 4, 0x03, 0, 0, 0, 0, 9}), max_payload).has_value());
    }
    SECTION("length equal to the maximum") {
        auto decoded =
            frame::decode_header(bytes({0x01, 0x00, 0x00, 0x02, 0, 0, 0, 0, 1}), max_payload);
        REQUIRE(decoded.has_value());
        CHECK(decoded->length == max_payload);
    }
}

TEST_CASE("documented HELLO example matches the encoder", "[frame]") {
    auto wire = hex(
        "00 00 38 00 00 00 00 00 00  00 01 02 00  10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f"
        "00 01 00 01 00 00  00 02 00 40 00 00  00 03 00 00 40 00  00 04 00 01 00 00"
        "00 05 02 00 00 00  00 06 00 00 00 00");
    frame::hello h;
    h.role = frame::role::bridge;
    for (std::size_t i = 0; i < h.instance.size(); ++i) {
        h.instance[i] = static_cast<std::uint8_t>(0x10 + i);
    }

    auto header = frame::decode_header(wire, frame::min_max_frame_payload);
    auto decoded = frame::decode_hello(payload_of(wire));
    std::vector<std::uint8_t> encoded;
    frame::append_frame(encoded, frame::frame_type::hello, 0, 0, frame::encode_hello(h));

    REQUIRE(header.has_value());
    CHECK(header->length == 56);
    CHECK(header->type == frame::frame_type::hello);
    REQUIRE(decoded.has_value());
    CHECK(decoded->role == frame::role::bridge);
    CHECK(decoded->instance == h.instance);
    CHECK(decoded->settings.max_frame_payload == 65536);
    CHECK(decoded->settings.initial_connection_window == 33554432);
    CHECK(encoded == wire);
}

TEST_CASE("documented HEADERS examples match the encoders", "[frame]") {
    SECTION("request GET /v1/sys/health with two fields and END_STREAM") {
        auto wire =
            hex("00 00 39 01 01 00 00 00 01  00 03 47 45 54"
                "00 0e 2f 76 31 2f 73 79 73 2f 68 65 61 6c 74 68  00 02"
                "00 04 48 6f 73 74  00 05 76 61 75 6c 74"
                "00 0d 58 2d 56 61 75 6c 74 2d 54 6f 6b 65 6e  00 04 72 6f 6f 74");
        frame::request_head h{
            "GET", "/v1/sys/health", {{"Host", "vault"}, {"X-Vault-Token", "root"}}};

        auto header = frame::decode_header(wire, max_payload);
        auto decoded = frame::decode_request_head(payload_of(wire));
        std::vector<std::uint8_t> encoded;
        frame::append_frame(encoded, frame::frame_type::headers, frame::flag::end_stream, 1,
                            frame::encode_request_head(h));

        REQUIRE(header.has_value());
        CHECK(header->length == 57);
        CHECK(header->flags == frame::flag::end_stream);
        CHECK(header->stream_id == 1);
        REQUIRE(decoded.has_value());
        CHECK(decoded->method == "GET");
        CHECK(decoded->target == "/v1/sys/health");
        REQUIRE(decoded->fields.size() == 2);
        CHECK(decoded->fields[1].name == "X-Vault-Token");
        CHECK(decoded->fields[1].value == "root");
        CHECK(encoded == wire);
    }
    SECTION("response 200 with Content-Length") {
        auto wire =
            hex("00 00 17 01 00 00 00 00 01  00 c8  00 01"
                "00 0e 43 6f 6e 74 65 6e 74 2d 4c 65 6e 67 74 68  00 01 32");
        frame::response_head h{200, {{"Content-Length", "2"}}};

        auto decoded = frame::decode_response_head(payload_of(wire));
        std::vector<std::uint8_t> encoded;
        frame::append_frame(encoded, frame::frame_type::headers, 0, 1,
                            frame::encode_response_head(h));

        REQUIRE(decoded.has_value());
        CHECK(decoded->status == 200);
        REQUIRE(decoded->fields.size() == 1);
        CHECK(decoded->fields[0].value == "2");
        CHECK(encoded == wire);
    }
}

TEST_CASE("documented control frame examples decode", "[frame]") {
    SECTION("WINDOW_UPDATE of 1 MiB on stream 1") {
        auto wire = hex("00 00 04 03 00 00 00 00 01  00 10 00 00");
        auto header = frame::decode_header(wire, max_payload);
        auto increment = frame::decode_window_update(payload_of(wire));
        REQUIRE(header.has_value());
        CHECK(header->stream_id == 1);
        REQUIRE(increment.has_value());
        CHECK(*increment == 1048576);
    }
    SECTION("RST_STREAM CANCEL on stream 3") {
        auto wire = hex("00 00 04 04 00 00 00 00 03  00 00 00 07");
        auto header = frame::decode_header(wire, max_payload);
        REQUIRE(header.has_value());
        CHECK(header->type == frame::frame_type::rst_stream);
        CHECK(frame::decode_u32(payload_of(wire).data()) ==
              static_cast<std::uint32_t>(errc::cancel));
    }
    SECTION("GOAWAY after stream 7 with debug data") {
        auto wire = hex("00 00 0b 06 00 00 00 00 00  00 00 00 07  00 00 00 00  62 79 65");
        auto decoded = frame::decode_goaway(payload_of(wire));
        std::vector<std::uint8_t> encoded;
        frame::append_frame(encoded, frame::frame_type::goaway, 0, 0,
                            frame::encode_goaway({7, 0, "bye"}));
        REQUIRE(decoded.has_value());
        CHECK(decoded->last_stream_id == 7);
        CHECK(decoded->error_code == 0);
        CHECK(decoded->debug == "bye");
        CHECK(encoded == wire);
    }
    SECTION("PING and its ACK") {
        auto ping = frame::decode_header(hex("00 00 08 05 00 00 00 00 00"), max_payload);
        auto ack = frame::decode_header(hex("00 00 08 05 01 00 00 00 00"), max_payload);
        REQUIRE(ping.has_value());
        REQUIRE(ack.has_value());
        CHECK(ping->flags == 0);
        CHECK(ack->flags == frame::flag::ack);
    }
    SECTION("last DATA of a body") {
        auto wire = hex("00 00 02 02 01 00 00 00 01  7b 7d");
        auto header = frame::decode_header(wire, max_payload);
        REQUIRE(header.has_value());
        CHECK(header->type == frame::frame_type::data);
        CHECK(header->flags == frame::flag::end_stream);
        CHECK(header->length == 2);
    }
}

TEST_CASE("goaway decoder drops the reserved bit", "[frame]") {
    auto decoded = frame::decode_goaway(bytes({0x80, 0, 0, 5, 0, 0, 0, 1}));

    REQUIRE(decoded.has_value());
    CHECK(decoded->last_stream_id == 5);
    CHECK(decoded->error_code == 1);
    CHECK(decoded->debug.empty());
}

TEST_CASE("hello decoder keeps the last repeated setting", "[frame]") {
    auto payload = frame::encode_hello(frame::hello{});
    for (int value : {7, 9}) {
        auto extra = bytes({0, 3, 0, 0, 0, value});
        payload.insert(payload.end(), extra.begin(), extra.end());
    }

    auto decoded = frame::decode_hello(payload);

    REQUIRE(decoded.has_value());
    CHECK(decoded->settings.max_concurrent_streams == 9);
}
