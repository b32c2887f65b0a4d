// SPDX-License-Identifier: Apache-2.0
// Parsers for option values.
#include "taser/config/parse.hpp"

#include <charconv>
#include <stdexcept>

#include <boost/asio/ip/address.hpp>

namespace taser::config {
namespace {

[[noreturn]] void fail(std::string_view option, std::string_view text, std::string_view expected) {
    throw invalid_value("invalid value '" + std::string(text) + "' for --" + std::string(option) +
                        ": expected " + std::string(expected));
}

bool parse_number(std::string_view digits, std::uint64_t& out) {
    if (digits.empty()) {
        return false;
    }
    auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), out);
    return ec == std::errc{} && end == digits.data() + digits.size();
}

}  // namespace

std::chrono::milliseconds parse_duration(std::string_view option, std::string_view text) {
    constexpr std::string_view expected = "a duration such as 250ms, 5s, 2m or 1h";
    auto split = text.find_first_not_of("0123456789");
    std::uint64_t n = 0;
    if (!parse_number(text.substr(0, split), n)) {
        fail(option, text, expected);
    }
    auto unit = split == std::string_view::npos ? std::string_view("s") : text.substr(split);
    std::uint64_t ms_per_unit = 0;
    if (unit == "ms") {
        ms_per_unit = 1;
    } else if (unit == "s") {
        ms_per_unit = 1000;
    } else if (unit == "m") {
        ms_per_unit = 60 * 1000;
    } else if (unit == "h") {
        ms_per_unit = 3600 * 1000;
    } else {
        fail(option, text, expected);
    }
    // Ten years is far beyond any sensible timeout and keeps the product inside 64 bits.
    if (n > 10ull * 365 * 24 * 3600 * 1000 / ms_per_unit) {
        fail(option, text, "a duration of at most ten years");
    }
    return std::chrono::milliseconds(n * ms_per_unit);
}

std::uint64_t parse_size(std::string_view option, std::string_view text) {
    constexpr std::string_view expected = "a size such as 512, 64KiB, 16MiB or 1GiB";
    auto split = text.find_first_not_of("0123456789");
    std::uint64_t n = 0;
    if (!parse_number(text.substr(0, split), n)) {
        fail(option, text, expected);
    }
    auto unit = split == std::string_view::npos ? std::string_view() : text.substr(split);
    std::uint64_t scale = 0;
    if (unit.empty() || unit == "B") {
        scale = 1;
    } else if (unit == "KiB" || unit == "KB" || unit == "k" || unit == "K") {
        scale = 1ull << 10;
    } else if (unit == "MiB" || unit == "MB" || unit == "M") {
        scale = 1ull << 20;
    } else if (unit == "GiB" || unit == "GB" || unit == "G") {
        scale = 1ull << 30;
    } else {
        fail(option, text, expected);
    }
    if (n > (1ull << 50) / scale) {
        fail(option, text, "a size of at most 1PiB");
    }
    return n * scale;
}

std::uint64_t parse_count(std::string_view option, std::string_view text, std::uint64_t min,
                          std::uint64_t max) {
    std::uint64_t n = 0;
    if (!parse_number(text, n) || n < min || n > max) {
        fail(option, text,
             "a whole number from " + std::to_string(min) + " to " + std::to_string(max));
    }
    return n;
}

std::string host_port::to_string() const {
    auto p = std::to_string(port);
    return ipv6_literal ? "[" + host + "]:" + p : host + ":" + p;
}

host_port parse_host_port(std::string_view option, std::string_view text) {
    constexpr std::string_view expected =
        "HOST:PORT, with an IPv6 address in brackets ([::1]:8200)";
    host_port out;
    std::string_view port;
    if (!text.empty() && text.front() == '[') {
        auto close = text.find(']');
        if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
            fail(option, text, expected);
        }
        out.host = std::string(text.substr(1, close - 1));
        port = text.substr(close + 2);
        boost::system::error_code ec;
        auto a = boost::asio::ip::make_address_v6(out.host, ec);
        if (ec) {
            fail(option, text, "a valid IPv6 address inside the brackets");
        }
        (void)a;
        out.ipv6_literal = true;
    } else {
        auto colon = text.rfind(':');
        if (colon == std::string_view::npos || text.find(':') != colon) {
            fail(option, text, expected);
        }
        out.host = std::string(text.substr(0, colon));
        port = text.substr(colon + 1);
    }
    std::uint64_t n = 0;
    if (out.host.empty() || !parse_number(port, n) || n > 65535) {
        fail(option, text, expected);
    }
    out.port = static_cast<std::uint16_t>(n);
    return out;
}

url parse_url(std::string_view option, std::string_view text) {
    constexpr std::string_view expected = "http://HOST:PORT or https://HOST:PORT";
    url out;
    std::string_view rest;
    if (text.starts_with("http://")) {
        out.scheme = "http";
        rest = text.substr(7);
    } else if (text.starts_with("https://")) {
        out.scheme = "https";
        rest = text.substr(8);
    } else {
        fail(option, text, expected);
    }
    if (rest.ends_with("/")) {
        rest.remove_suffix(1);
    }
    if (rest.find('/') != std::string_view::npos || rest.find('@') != std::string_view::npos) {
        fail(option, text, "an address without path or user information");
    }
    bool has_port = rest.starts_with("[") ? rest.find("]:") != std::string_view::npos
                                          : rest.find(':') != std::string_view::npos;
    if (has_port) {
        out.authority = parse_host_port(option, rest);
    } else {
        auto port = out.scheme == "https" ? ":443" : ":80";
        out.authority = parse_host_port(option, std::string(rest) + port);
    }
    return out;
}

bool is_ip_literal(std::string_view host) {
    boost::system::error_code ec;
    boost::asio::ip::make_address(std::string(host), ec);
    return !ec;
}

}  // namespace taser::config
