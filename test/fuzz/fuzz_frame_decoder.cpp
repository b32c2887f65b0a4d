// SPDX-License-Identifier: Apache-2.0
// libFuzzer target for the frame header decoder and the payload decoders of HEADERS, GOAWAY,
// WINDOW_UPDATE and HELLO. The input is one frame: a 9-byte header, then the payload. Wherever
// the encoding is canonical, a decoded value is encoded again and compared with the input.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "taser/frame/frame.hpp"

namespace frame = taser::frame;

namespace {

// Aborts with message when condition is false, so that libFuzzer stores the input as a crash.
void check(bool condition, const char* message) {
    if (!condition) {
        std::fprintf(stderr, "fuzz_frame_decoder: check failed: %s\n", message);
        std::abort();
    }
}

bool same_bytes(frame::bytes a, frame::bytes b) {
    return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

void check_fields(const std::vector<frame::field>& fields) {
    check(fields.size() <= frame::max_fields, "more fields than max_fields");
    for (const auto& f : fields) {
        check(frame::is_token(f.name), "decoded field name is not a token");
        check(frame::is_field_value(f.value), "decoded field value contains a forbidden byte");
    }
}

void check_header(frame::bytes input) {
    auto loose = frame::decode_header(input, frame::max_length_field);
    auto strict = frame::decode_header(input, frame::min_max_frame_payload);
    if (strict) {
        // A header valid under the smaller limit stays valid under the larger one.
        check(loose.has_value(), "header valid at 16 KiB but invalid at 2^24-1");
        check(loose->length == strict->length, "header length depends on the limit");
    }
    if (!loose) {
        return;
    }
    check(input.size() >= frame::header_size, "header decoded from fewer than 9 bytes");
    check(loose->stream_id <= frame::max_stream_id, "stream id has the reserved bit");

    std::uint8_t encoded[frame::header_size];
    frame::encode_header(*loose, encoded);
    std::uint8_t expected[frame::header_size];
    std::copy_n(input.begin(), frame::header_size, expected);
    expected[5] &= 0x7f;  // the decoder drops the reserved bit of the stream id
    check(std::equal(encoded, encoded + frame::header_size, expected),
          "header encoding differs from the input");
}

void check_request_head(frame::bytes payload) {
    auto head = frame::decode_request_head(payload);
    if (!head) {
        return;
    }
    check(frame::is_token(head->method), "decoded method is not a token");
    check(frame::is_request_target(head->target), "decoded target is invalid");
    check_fields(head->fields);
    check(same_bytes(frame::encode_request_head(*head), payload),
          "request head encoding differs from the input");
}

void check_response_head(frame::bytes payload) {
    auto head = frame::decode_response_head(payload);
    if (!head) {
        return;
    }
    check(head->status >= 100 && head->status <= 599, "decoded status outside 100-599");
    check_fields(head->fields);
    check(same_bytes(frame::encode_response_head(*head), payload),
          "response head encoding differs from the input");
}

void check_goaway(frame::bytes payload) {
    auto g = frame::decode_goaway(payload);
    check(g.has_value() == (payload.size() >= 8), "GOAWAY accepted iff 8 bytes or more");
    if (!g) {
        return;
    }
    check(g->last_stream_id <= frame::max_stream_id, "last_stream_id has the reserved bit");
    check(g->debug.size() == payload.size() - 8, "GOAWAY debug text lost bytes");
    auto encoded = frame::encode_goaway(*g);
    std::vector<std::uint8_t> expected(payload.begin(), payload.end());
    expected[0] &= 0x7f;  // the decoder drops the reserved bit of last_stream_id
    check(encoded == expected, "GOAWAY encoding differs from the input");
}

void check_window_update(frame::bytes payload) {
    auto increment = frame::decode_window_update(payload);
    if (payload.size() != 4) {
        check(!increment, "WINDOW_UPDATE accepted with a payload other than 4 bytes");
        return;
    }
    auto raw = frame::decode_u32(payload.data());
    check(increment.has_value() == (raw >= 1 && raw <= frame::max_window),
          "WINDOW_UPDATE accepted iff 1 <= increment <= 2^31-1");
    if (increment) {
        auto encoded = frame::encode_u32(*increment);
        check(same_bytes(encoded, payload), "WINDOW_UPDATE encoding differs from the input");
    }
}

void check_hello(frame::bytes payload) {
    auto hello = frame::decode_hello(payload);
    if (!hello) {
        return;
    }
    // Settings may come in any order, repeat or be unknown, so only the values round-trip.
    auto again = frame::decode_hello(frame::encode_hello(*hello));
    check(again.has_value(), "encoded HELLO does not decode");
    check(again->version == hello->version, "HELLO version changed in a round trip");
    check(again->role == hello->role, "HELLO role changed in a round trip");
    check(again->instance == hello->instance, "HELLO instance changed in a round trip");
    const auto& a = again->settings;
    const auto& b = hello->settings;
    check(a.max_frame_payload == b.max_frame_payload &&
              a.initial_stream_window == b.initial_stream_window &&
              a.max_concurrent_streams == b.max_concurrent_streams &&
              a.max_header_block == b.max_header_block &&
              a.initial_connection_window == b.initial_connection_window &&
              a.replicas == b.replicas,
          "HELLO settings changed in a round trip");
}

// Builds a frame from a decoded header and its payload, then decodes it again.
void check_append_frame(const frame::frame_header& h, frame::bytes payload) {
    std::vector<std::uint8_t> out;
    frame::append_frame(out, h.type, h.flags, h.stream_id, payload);
    check(out.size() == frame::header_size + payload.size(), "append_frame wrote a wrong size");
    auto decoded = frame::decode_header(out, frame::max_length_field);
    check(decoded.has_value(), "frame built by append_frame does not decode");
    check(decoded->length == h.length && decoded->type == h.type && decoded->flags == h.flags &&
              decoded->stream_id == h.stream_id,
          "append_frame header differs from the decoded one");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    frame::bytes input(data, size);
    check_header(input);
    if (size < frame::header_size) {
        return 0;
    }

    // The payload decoders run on whatever follows the header, picked by the raw type byte, so
    // that they are reached even when the header itself is invalid.
    auto payload = input.subspan(frame::header_size);
    switch (data[3]) {
        case static_cast<std::uint8_t>(frame::frame_type::hello):
            check_hello(payload);
            break;
        case static_cast<std::uint8_t>(frame::frame_type::headers):
            check_request_head(payload);
            check_response_head(payload);
            break;
        case static_cast<std::uint8_t>(frame::frame_type::window_update):
            check_window_update(payload);
            break;
        case static_cast<std::uint8_t>(frame::frame_type::goaway):
            check_goaway(payload);
            break;
        default:
            break;
    }

    auto h = frame::decode_header(input, frame::max_length_field);
    if (h && h->length == payload.size()) {
        check_append_frame(*h, payload);
    }
    return 0;
}
