// SPDX-License-Identifier: Apache-2.0
// Encoder and decoder of tunnel frames (docs/protocol.md §3-§5).
#include "taser/frame/frame.hpp"

#include <algorithm>

namespace taser::frame {
namespace {

constexpr std::size_t hello_fixed_bytes = 2 + 1 + 1 + 16;
constexpr std::size_t setting_bytes = 6;
constexpr std::uint32_t reserved_bit = 0x80000000u;

void put_u16(std::vector<std::uint8_t>& out, std::uint16_t v) {
    out.push_back(static_cast<std::uint8_t>(v >> 8));
    out.push_back(static_cast<std::uint8_t>(v));
}

void put_u32(std::vector<std::uint8_t>& out, std::uint32_t v) {
    auto b = encode_u32(v);
    out.insert(out.end(), b.begin(), b.end());
}

void put_string(std::vector<std::uint8_t>& out, std::string_view s) {
    // Encoders are fed heads that the edges already limited; a longer string is cut rather than
    // wrapped, and the decoder of the peer then rejects the head as malformed.
    auto n = static_cast<std::uint16_t>(std::min<std::size_t>(s.size(), 0xffff));
    put_u16(out, n);
    out.insert(out.end(), s.begin(), s.begin() + n);
}

void put_fields(std::vector<std::uint8_t>& out, const std::vector<field>& fields) {
    put_u16(out, static_cast<std::uint16_t>(std::min<std::size_t>(fields.size(), 0xffff)));
    for (const auto& f : fields) {
        put_string(out, f.name);
        put_string(out, f.value);
    }
}

// Reads length-prefixed items from a payload; every read checks the bytes left first.
class reader {
public:
    explicit reader(bytes b) : b_(b) {}

    bool u8(std::uint8_t& v) {
        if (b_.size() - pos_ < 1) {
            return false;
        }
        v = b_[pos_++];
        return true;
    }

    bool u16(std::uint16_t& v) {
        if (b_.size() - pos_ < 2) {
            return false;
        }
        v = static_cast<std::uint16_t>((b_[pos_] << 8) | b_[pos_ + 1]);
        pos_ += 2;
        return true;
    }

    bool u32(std::uint32_t& v) {
        if (b_.size() - pos_ < 4) {
            return false;
        }
        v = decode_u32(b_.data() + pos_);
        pos_ += 4;
        return true;
    }

    bool string(std::string& s) {
        std::uint16_t n = 0;
        if (!u16(n) || b_.size() - pos_ < n) {
            return false;
        }
        s.assign(reinterpret_cast<const char*>(b_.data() + pos_), n);
        pos_ += n;
        return true;
    }

    bool copy(std::uint8_t* out, std::size_t n) {
        if (b_.size() - pos_ < n) {
            return false;
        }
        std::copy_n(b_.data() + pos_, n, out);
        pos_ += n;
        return true;
    }

    std::size_t left() const { return b_.size() - pos_; }
    bytes rest() const { return b_.subspan(pos_); }

private:
    bytes b_;
    std::size_t pos_ = 0;
};

bool read_fields(reader& r, std::vector<field>& fields) {
    std::uint16_t count = 0;
    if (!r.u16(count) || count > max_fields) {
        return false;
    }
    fields.resize(count);
    for (auto& f : fields) {
        if (!r.string(f.name) || !r.string(f.value)) {
            return false;
        }
        if (!is_token(f.name) || !is_field_value(f.value)) {
            return false;
        }
    }
    return true;
}

bool is_tchar(unsigned char c) noexcept {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) {
        return true;
    }
    // RFC 9110 §5.6.2: the other characters a token may hold.
    return std::string_view("!#$%&'*+-.^_`|~").find(static_cast<char>(c)) != std::string_view::npos;
}

}  // namespace

std::array<std::uint8_t, 4> encode_u32(std::uint32_t v) {
    return {static_cast<std::uint8_t>(v >> 24), static_cast<std::uint8_t>(v >> 16),
            static_cast<std::uint8_t>(v >> 8), static_cast<std::uint8_t>(v)};
}

std::uint32_t decode_u32(const std::uint8_t* p) {
    return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
           std::uint32_t{p[3]};
}

std::uint32_t decode_length(const std::uint8_t* header) {
    return (std::uint32_t{header[0]} << 16) | (std::uint32_t{header[1]} << 8) | header[2];
}

result<frame_header> decode_header(bytes header, std::uint32_t max_payload_bytes) {
    if (header.size() < header_size) {
        return make_error_code(errc::frame_size_error);
    }
    frame_header h;
    h.length = decode_length(header.data());
    auto type = header[3];
    h.flags = header[4];
    h.stream_id = decode_u32(header.data() + 5) & ~reserved_bit;

    if (h.length > max_payload_bytes) {
        return make_error_code(errc::frame_size_error);
    }
    if (type > static_cast<std::uint8_t>(frame_type::goaway)) {
        return make_error_code(errc::protocol_error);
    }
    h.type = static_cast<frame_type>(type);

    bool on_connection = h.stream_id == 0;
    switch (h.type) {
        case frame_type::hello:
            if (!on_connection) {
                return make_error_code(errc::protocol_error);
            }
            if (h.length < hello_fixed_bytes || (h.length - hello_fixed_bytes) % setting_bytes) {
                return make_error_code(errc::frame_size_error);
            }
            break;
        case frame_type::headers:
        case frame_type::data:
            if (on_connection) {
                return make_error_code(errc::protocol_error);
            }
            break;
        case frame_type::window_update:
            if (h.length != 4) {
                return make_error_code(errc::frame_size_error);
            }
            break;
        case frame_type::rst_stream:
            if (on_connection) {
                return make_error_code(errc::protocol_error);
            }
            if (h.length != 4) {
                return make_error_code(errc::frame_size_error);
            }
            break;
        case frame_type::ping:
            if (!on_connection) {
                return make_error_code(errc::protocol_error);
            }
            if (h.length != 8) {
                return make_error_code(errc::frame_size_error);
            }
            break;
        case frame_type::goaway:
            if (!on_connection) {
                return make_error_code(errc::protocol_error);
            }
            if (h.length < 8) {
                return make_error_code(errc::frame_size_error);
            }
            break;
    }
    return h;
}

void encode_header(const frame_header& h, std::uint8_t* out) {
    out[0] = static_cast<std::uint8_t>(h.length >> 16);
    out[1] = static_cast<std::uint8_t>(h.length >> 8);
    out[2] = static_cast<std::uint8_t>(h.length);
    out[3] = static_cast<std::uint8_t>(h.type);
    out[4] = h.flags;
    auto id = encode_u32(h.stream_id & ~reserved_bit);
    std::copy(id.begin(), id.end(), out + 5);
}

void append_frame(std::vector<std::uint8_t>& out, frame_type type, std::uint8_t flags,
                  std::uint32_t stream_id, bytes payload) {
    auto at = out.size();
    out.resize(at + header_size);
    encode_header({static_cast<std::uint32_t>(payload.size()), type, flags, stream_id},
                  out.data() + at);
    out.insert(out.end(), payload.begin(), payload.end());
}

std::string_view role_name(role r) noexcept {
    switch (r) {
        case role::broker:
            return "broker";
        case role::bridge:
            return "bridge";
    }
    return "unknown";
}

std::vector<std::uint8_t> encode_hello(const hello& h) {
    std::vector<std::uint8_t> out;
    put_u16(out, h.version);
    out.push_back(static_cast<std::uint8_t>(h.role));
    out.push_back(0);
    out.insert(out.end(), h.instance.begin(), h.instance.end());
    auto put_setting = [&](setting_id id, std::uint32_t value) {
        put_u16(out, static_cast<std::uint16_t>(id));
        put_u32(out, value);
    };
    put_setting(setting_id::max_frame_payload, h.settings.max_frame_payload);
    put_setting(setting_id::initial_stream_window, h.settings.initial_stream_window);
    put_setting(setting_id::max_concurrent_streams, h.settings.max_concurrent_streams);
    put_setting(setting_id::max_header_block, h.settings.max_header_block);
    put_setting(setting_id::initial_connection_window, h.settings.initial_connection_window);
    put_setting(setting_id::replicas, h.settings.replicas);
    return out;
}

result<hello> decode_hello(bytes payload) {
    reader r(payload);
    hello h;
    std::uint8_t role_byte = 0;
    std::uint8_t reserved = 0;
    if (!r.u16(h.version) || !r.u8(role_byte) || !r.u8(reserved) ||
        !r.copy(h.instance.data(), h.instance.size()) || r.left() % setting_bytes) {
        return make_error_code(errc::frame_size_error);
    }
    if (role_byte != static_cast<std::uint8_t>(role::broker) &&
        role_byte != static_cast<std::uint8_t>(role::bridge)) {
        return make_error_code(errc::protocol_error);
    }
    h.role = static_cast<role>(role_byte);

    while (r.left() > 0) {
        std::uint16_t id = 0;
        std::uint32_t value = 0;
        r.u16(id);
        r.u32(value);
        switch (static_cast<setting_id>(id)) {
            case setting_id::max_frame_payload:
                if (value < min_max_frame_payload || value > max_length_field) {
                    return make_error_code(errc::protocol_error);
                }
                h.settings.max_frame_payload = value;
                break;
            case setting_id::initial_stream_window:
                // A window of 0 would stall every body: no WINDOW_UPDATE can start one.
                if (value == 0) {
                    return make_error_code(errc::protocol_error);
                }
                if (value > max_window) {
                    return make_error_code(errc::flow_control_error);
                }
                h.settings.initial_stream_window = value;
                break;
            case setting_id::initial_connection_window:
                if (value == 0) {
                    return make_error_code(errc::protocol_error);
                }
                if (value > max_window) {
                    return make_error_code(errc::flow_control_error);
                }
                h.settings.initial_connection_window = value;
                break;
            case setting_id::max_concurrent_streams:
                h.settings.max_concurrent_streams = value;
                break;
            case setting_id::max_header_block:
                if (value < 1024) {
                    return make_error_code(errc::protocol_error);
                }
                h.settings.max_header_block = value;
                break;
            case setting_id::replicas:
                h.settings.replicas = value;
                break;
            default:
                // §4.2: unknown settings are ignored, so that later versions may add some.
                break;
        }
    }
    return h;
}

std::vector<std::uint8_t> encode_request_head(const request_head& h) {
    std::vector<std::uint8_t> out;
    put_string(out, h.method);
    put_string(out, h.target);
    put_fields(out, h.fields);
    return out;
}

std::vector<std::uint8_t> encode_response_head(const response_head& h) {
    std::vector<std::uint8_t> out;
    put_u16(out, h.status);
    put_fields(out, h.fields);
    return out;
}

result<request_head> decode_request_head(bytes payload) {
    reader r(payload);
    request_head h;
    if (!r.string(h.method) || !r.string(h.target) || !read_fields(r, h.fields) || r.left()) {
        return make_error_code(errc::protocol_error);
    }
    if (!is_token(h.method) || !is_request_target(h.target)) {
        return make_error_code(errc::protocol_error);
    }
    return h;
}

result<response_head> decode_response_head(bytes payload) {
    reader r(payload);
    response_head h;
    if (!r.u16(h.status) || !read_fields(r, h.fields) || r.left()) {
        return make_error_code(errc::protocol_error);
    }
    if (h.status < 100 || h.status > 599) {
        return make_error_code(errc::protocol_error);
    }
    return h;
}

std::vector<std::uint8_t> encode_goaway(const goaway& g) {
    std::vector<std::uint8_t> out;
    put_u32(out, g.last_stream_id & max_stream_id);
    put_u32(out, g.error_code);
    out.insert(out.end(), g.debug.begin(), g.debug.end());
    return out;
}

result<goaway> decode_goaway(bytes payload) {
    reader r(payload);
    goaway g;
    if (!r.u32(g.last_stream_id) || !r.u32(g.error_code)) {
        return make_error_code(errc::frame_size_error);
    }
    g.last_stream_id &= max_stream_id;
    auto rest = r.rest();
    g.debug.assign(reinterpret_cast<const char*>(rest.data()), rest.size());
    return g;
}

result<std::uint32_t> decode_window_update(bytes payload) {
    if (payload.size() != 4) {
        return make_error_code(errc::frame_size_error);
    }
    auto increment = decode_u32(payload.data());
    if (increment == 0 || increment > max_window) {
        return make_error_code(errc::protocol_error);
    }
    return increment;
}

bool is_token(std::string_view s) noexcept {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
        return is_tchar(static_cast<unsigned char>(c));
    });
}

bool is_field_value(std::string_view s) noexcept {
    return std::none_of(s.begin(), s.end(), [](char c) {
        auto u = static_cast<unsigned char>(c);
        return u == '\r' || u == '\n' || u == 0 || (u < 0x20 && u != '\t') || u == 0x7f;
    });
}

bool is_request_target(std::string_view s) noexcept {
    return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
        auto u = static_cast<unsigned char>(c);
        return u > 0x20 && u < 0x7f;
    });
}

}  // namespace taser::frame
