// SPDX-License-Identifier: Apache-2.0
// Parsers for option values: durations, sizes and host:port addresses (docs/configuration.md).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace taser::config {

// Thrown for an invalid option value; what() is one line for the user.
struct invalid_value : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Parses "250ms", "5s", "2m", "1h" or a bare number of seconds.
std::chrono::milliseconds parse_duration(std::string_view option, std::string_view text);

// Parses "512", "64KiB", "16MiB", "1GiB" (powers of 1024; "KB", "MB" and "GB" are accepted with
// the same meaning, since that is what users mean by them in a size limit).
std::uint64_t parse_size(std::string_view option, std::string_view text);

// Parses a whole number from min to max; signs, units and fractions are errors.
std::uint64_t parse_count(std::string_view option, std::string_view text, std::uint64_t min,
                          std::uint64_t max);

struct host_port {
    std::string host;  // without brackets
    std::uint16_t port = 0;
    bool ipv6_literal = false;

    // "host:port", with brackets around an IPv6 literal.
    std::string to_string() const;
};

// Parses "host:port" or "[v6]:port". An unbracketed IPv6 literal is rejected because its last
// colon cannot be told from the port separator.
host_port parse_host_port(std::string_view option, std::string_view text);

struct url {
    std::string scheme;  // "http" or "https"
    host_port authority;
};

// Parses "http://host:port" or "https://host:port" (default ports 80 and 443); no path allowed.
url parse_url(std::string_view option, std::string_view text);

// True when host is an IPv4 or IPv6 literal (then it must not be sent as SNI).
bool is_ip_literal(std::string_view host);

}  // namespace taser::config
