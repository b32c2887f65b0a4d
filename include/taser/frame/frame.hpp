// SPDX-License-Identifier: Apache-2.0
// Encoder and decoder of tunnel frames (docs/protocol.md §3-§5). Pure: no sockets, no clocks,
// so that every function can be fed plain byte arrays by unit tests and the fuzzer.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <boost/system/result.hpp>

#include "taser/error.hpp"

namespace taser::frame {

template <class T>
using result = boost::system::result<T>;
using bytes = std::span<const std::uint8_t>;

inline constexpr std::size_t header_size = 9;
inline constexpr std::uint16_t protocol_version = 1;
// ALPN protocol id of the tunnel; the digit is the protocol version.
inline constexpr std::string_view alpn_id = "taser/1";

// Limits fixed by the format itself (docs/protocol.md §8).
inline constexpr std::uint32_t max_length_field = (1u << 24) - 1;
inline constexpr std::uint32_t min_max_frame_payload = 16 * 1024;
inline constexpr std::uint32_t max_window = 0x7fffffff;
inline constexpr std::uint32_t max_stream_id = 0x7fffffff;
inline constexpr std::size_t max_fields = 512;

enum class frame_type : std::uint8_t {
    hello = 0x0,
    headers = 0x1,
    data = 0x2,
    window_update = 0x3,
    rst_stream = 0x4,
    ping = 0x5,
    goaway = 0x6,
};

namespace flag {
inline constexpr std::uint8_t end_stream = 0x1;  // HEADERS, DATA
inline constexpr std::uint8_t ack = 0x1;         // PING
}  // namespace flag

struct frame_header {
    std::uint32_t length = 0;
    frame_type type = frame_type::data;
    std::uint8_t flags = 0;
    std::uint32_t stream_id = 0;
};

// Decodes and checks a frame header against the receiver's max_payload_bytes. Checks that only
// need the header happen here: length range per type and the stream id rule per type.
result<frame_header> decode_header(bytes header, std::uint32_t max_payload_bytes);
void encode_header(const frame_header& h, std::uint8_t* out);

// Appends one whole frame (header and payload) to out.
void append_frame(std::vector<std::uint8_t>& out, frame_type type, std::uint8_t flags,
                  std::uint32_t stream_id, bytes payload);

enum class role : std::uint8_t { broker = 1, bridge = 2 };
std::string_view role_name(role r) noexcept;

enum class setting_id : std::uint16_t {
    max_frame_payload = 0x1,
    initial_stream_window = 0x2,
    max_concurrent_streams = 0x3,
    max_header_block = 0x4,
    initial_connection_window = 0x5,
    replicas = 0x6,
};

// Limits that one side announces in its HELLO; they bind what the other side may send.
struct settings {
    std::uint32_t max_frame_payload = 64 * 1024;
    std::uint32_t initial_stream_window = 4 * 1024 * 1024;
    std::uint32_t max_concurrent_streams = 16384;
    std::uint32_t max_header_block = 64 * 1024;
    std::uint32_t initial_connection_window = 32 * 1024 * 1024;
    std::uint32_t replicas = 0;  // broker only: how many broker replicas exist, 0 when unknown
};

using instance_id = std::array<std::uint8_t, 16>;

struct hello {
    std::uint16_t version = protocol_version;
    frame::role role = role::broker;
    instance_id instance{};
    frame::settings settings;
};

std::vector<std::uint8_t> encode_hello(const hello& h);
// Decodes a HELLO payload and checks each setting's range. The version is not compared here:
// the session does that, so that it can name both versions in its error.
result<hello> decode_hello(bytes payload);

struct field {
    std::string name;
    std::string value;
};

// The head of an HTTP request (broker to bridge) or response (bridge to broker), §5.2.
struct request_head {
    std::string method;
    std::string target;
    std::vector<field> fields;
};

struct response_head {
    std::uint16_t status = 0;
    std::vector<field> fields;
};

std::vector<std::uint8_t> encode_request_head(const request_head& h);
std::vector<std::uint8_t> encode_response_head(const response_head& h);
result<request_head> decode_request_head(bytes payload);
result<response_head> decode_response_head(bytes payload);

struct goaway {
    std::uint32_t last_stream_id = 0;
    std::uint32_t error_code = 0;
    std::string debug;
};

std::vector<std::uint8_t> encode_goaway(const goaway& g);
result<goaway> decode_goaway(bytes payload);

std::array<std::uint8_t, 4> encode_u32(std::uint32_t v);
std::uint32_t decode_u32(const std::uint8_t* p);
// Reads the 24-bit length field at the start of a frame header, without any check.
std::uint32_t decode_length(const std::uint8_t* header);

// A window increment of 0 or above 2^31-1 is a protocol error (§6.3).
result<std::uint32_t> decode_window_update(bytes payload);

// Header field syntax of RFC 9110 §5: tokens for names and methods, no CR, LF or NUL in values.
bool is_token(std::string_view s) noexcept;
bool is_field_value(std::string_view s) noexcept;
bool is_request_target(std::string_view s) noexcept;

}  // namespace taser::frame
