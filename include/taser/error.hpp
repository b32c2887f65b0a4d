// SPDX-License-Identifier: Apache-2.0
// Error codes of the tunnel protocol and of taser itself (docs/protocol.md §7).
#pragma once

#include <cstdint>
#include <string_view>
#include <system_error>

#include <boost/system/error_code.hpp>

namespace taser {

using error_code = boost::system::error_code;

// Each value below 0x100 is sent on the wire as is, in RST_STREAM and GOAWAY frames.
// Values from 0x100 up are local conditions that map to a wire code through to_wire_code().
enum class errc : std::uint32_t {
    no_error = 0x0,
    protocol_error = 0x1,      // the peer broke a rule of the protocol
    internal_error = 0x2,      // a fault of our own
    flow_control_error = 0x3,  // DATA beyond the window, or a window above 2^31-1
    stream_closed = 0x4,       // a frame on a stream that can no longer take it
    frame_size_error = 0x5,    // a length out of range for the frame type
    refused_stream = 0x6,      // stream not processed at all; safe to retry elsewhere
    cancel = 0x7,              // the stream is no longer wanted
    connect_error = 0x8,       // the bridge could not reach the vault
    timeout = 0x9,             // a deadline passed (keepalive, stream open, idle)
    version_mismatch = 0xa,    // HELLO names a version this peer does not speak
    enhance_your_calm = 0xb,   // the peer exceeded a rate or queue limit
    forbidden = 0xc,           // the request is not allowed (for example CONNECT when off)

    // Local conditions.
    session_closed = 0x100,       // the tunnel connection ended under a stream
    stream_reset_by_peer = 0x101  // the peer sent RST_STREAM
};

const boost::system::error_category& error_category() noexcept;

inline boost::system::error_code make_error_code(errc e) noexcept {
    return {static_cast<int>(e), error_category()};
}

// Returns the code to send in RST_STREAM or GOAWAY for a local error.
std::uint32_t to_wire_code(const boost::system::error_code& ec) noexcept;

// Returns the name of a wire error code, or "unknown" (for logs).
std::string_view wire_code_name(std::uint32_t code) noexcept;

}  // namespace taser

namespace boost::system {
template <>
struct is_error_code_enum<taser::errc> : std::true_type {};
}  // namespace boost::system
