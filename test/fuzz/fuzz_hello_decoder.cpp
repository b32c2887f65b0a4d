// SPDX-License-Identifier: Apache-2.0
// libFuzzer target for the HELLO payload decoder. The input is a HELLO payload. The decoder is
// compared with a plain model of the format: fixed part, then 6-byte settings applied in order,
// the last value of a repeated setting winning and unknown ids ignored.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>

#include "taser/frame/frame.hpp"

namespace frame = taser::frame;
using taser::errc;

namespace {

constexpr std::size_t fixed_bytes = 20;  // version, role, reserved byte, 16-byte instance id
constexpr std::size_t setting_bytes = 6;

// Aborts with message when condition is false, so that libFuzzer stores the input as a crash.
void check(bool condition, const char* message) {
    if (!condition) {
        std::fprintf(stderr, "fuzz_hello_decoder: check failed: %s\n", message);
        std::abort();
    }
}

bool same_settings(const frame::settings& a, const frame::settings& b) {
    return a.max_frame_payload == b.max_frame_payload &&
           a.initial_stream_window == b.initial_stream_window &&
           a.max_concurrent_streams == b.max_concurrent_streams &&
           a.max_header_block == b.max_header_block &&
           a.initial_connection_window == b.initial_connection_window && a.replicas == b.replicas;
}

// Applies one setting to s. Returns the error that the decoder must report for an invalid value.
std::optional<errc> apply_setting(frame::settings& s, std::uint16_t id, std::uint32_t value) {
    switch (id) {
        case 0x1:
            if (value < frame::min_max_frame_payload || value > frame::max_length_field) {
                return errc::protocol_error;
            }
            s.max_frame_payload = value;
            break;
        case 0x2:
            if (value == 0) {
                return errc::protocol_error;  // no WINDOW_UPDATE could ever start a body
            }
            if (value > frame::max_window) {
                return errc::flow_control_error;
            }
            s.initial_stream_window = value;
            break;
        case 0x3:
            s.max_concurrent_streams = value;
            break;
        case 0x4:
            if (value < 1024) {
                return errc::protocol_error;
            }
            s.max_header_block = value;
            break;
        case 0x5:
            if (value == 0) {
                return errc::protocol_error;
            }
            if (value > frame::max_window) {
                return errc::flow_control_error;
            }
            s.initial_connection_window = value;
            break;
        case 0x6:
            s.replicas = value;
            break;
        default:
            break;
    }
    return std::nullopt;
}

// The model's verdict: a HELLO, or the error the decoder must return.
struct verdict {
    std::optional<errc> error;
    frame::hello hello;
};

verdict model_decode(frame::bytes p) {
    verdict v;
    if (p.size() < fixed_bytes || (p.size() - fixed_bytes) % setting_bytes != 0) {
        v.error = errc::frame_size_error;
        return v;
    }
    v.hello.version = static_cast<std::uint16_t>((p[0] << 8) | p[1]);
    if (p[2] != 1 && p[2] != 2) {
        v.error = errc::protocol_error;
        return v;
    }
    v.hello.role = static_cast<frame::role>(p[2]);
    for (std::size_t i = 0; i < v.hello.instance.size(); ++i) {
        v.hello.instance[i] = p[4 + i];
    }
    for (std::size_t at = fixed_bytes; at < p.size(); at += setting_bytes) {
        auto id = static_cast<std::uint16_t>((p[at] << 8) | p[at + 1]);
        auto value = frame::decode_u32(p.data() + at + 2);
        if (auto error = apply_setting(v.hello.settings, id, value)) {
            v.error = error;
            return v;
        }
    }
    return v;
}

// Checks that decode_header accepts the HELLO length exactly when decode_hello does.
void check_header_agrees(frame::bytes payload, const frame::result<frame::hello>& decoded) {
    if (payload.size() > frame::max_length_field) {
        return;
    }
    std::uint8_t header[frame::header_size];
    frame::encode_header(
        {static_cast<std::uint32_t>(payload.size()), frame::frame_type::hello, 0, 0}, header);
    auto h = frame::decode_header({header, frame::header_size}, frame::max_length_field);
    bool decoder_rejected_size = !decoded && decoded.error() == errc::frame_size_error;
    check(h.has_value() != decoder_rejected_size,
          "decode_header and decode_hello disagree on the HELLO length");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    frame::bytes payload(data, size);
    auto decoded = frame::decode_hello(payload);
    auto expected = model_decode(payload);
    check_header_agrees(payload, decoded);

    if (expected.error) {
        check(!decoded, "decoder accepted a HELLO that the model rejects");
        check(decoded.error() == *expected.error, "decoder returned another error than the model");
        return 0;
    }
    check(decoded.has_value(), "decoder rejected a HELLO that the model accepts");
    check(decoded->version == expected.hello.version, "version differs from the model");
    check(decoded->role == expected.hello.role, "role differs from the model");
    check(decoded->instance == expected.hello.instance, "instance differs from the model");
    check(same_settings(decoded->settings, expected.hello.settings),
          "settings differ from the model");

    // Encoding writes every setting once, so a second decode returns the same values.
    auto encoded = frame::encode_hello(*decoded);
    check(encoded.size() == fixed_bytes + 6 * setting_bytes, "encoded HELLO has a wrong size");
    auto again = frame::decode_hello(encoded);
    check(again.has_value(), "encoded HELLO does not decode");
    check(again->version == decoded->version, "version changed in a round trip");
    check(again->role == decoded->role, "role changed in a round trip");
    check(again->instance == decoded->instance, "instance changed in a round trip");
    check(same_settings(again->settings, decoded->settings), "settings changed in a round trip");
    return 0;
}
