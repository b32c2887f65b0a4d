// SPDX-License-Identifier: Apache-2.0
// Error category of taser::errc (docs/protocol.md §7).
#include "taser/error.hpp"

#include <string>

namespace taser {
namespace {

class category final : public boost::system::error_category {
public:
    const char* name() const noexcept override { return "taser"; }

    std::string message(int value) const override {
        auto code = static_cast<std::uint32_t>(value);
        if (code == static_cast<std::uint32_t>(errc::session_closed)) {
            return "tunnel connection closed";
        }
        if (code == static_cast<std::uint32_t>(errc::stream_reset_by_peer)) {
            return "stream reset by peer";
        }
        return std::string(wire_code_name(code));
    }
};

}  // namespace

const boost::system::error_category& error_category() noexcept {
    static const category instance;
    return instance;
}

std::string_view wire_code_name(std::uint32_t code) noexcept {
    switch (static_cast<errc>(code)) {
        case errc::no_error:
            return "no_error";
        case errc::protocol_error:
            return "protocol_error";
        case errc::internal_error:
            return "internal_error";
        case errc::flow_control_error:
            return "flow_control_error";
        case errc::stream_closed:
            return "stream_closed";
        case errc::frame_size_error:
            return "frame_size_error";
        case errc::refused_stream:
            return "refused_stream";
        case errc::cancel:
            return "cancel";
        case errc::connect_error:
            return "connect_error";
        case errc::timeout:
            return "timeout";
        case errc::version_mismatch:
            return "version_mismatch";
        case errc::enhance_your_calm:
            return "enhance_your_calm";
        case errc::forbidden:
            return "forbidden";
        default:
            return "unknown";
    }
}

std::uint32_t to_wire_code(const boost::system::error_code& ec) noexcept {
    if (!ec) {
        return static_cast<std::uint32_t>(errc::no_error);
    }
    if (ec.category() == error_category() && ec.value() < 0x100) {
        return static_cast<std::uint32_t>(ec.value());
    }
    if (ec == errc::session_closed || ec == errc::stream_reset_by_peer) {
        return static_cast<std::uint32_t>(errc::cancel);
    }
    return static_cast<std::uint32_t>(errc::internal_error);
}

}  // namespace taser
