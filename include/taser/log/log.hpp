// SPDX-License-Identifier: Apache-2.0
// Structured logging: one JSON object a line on stderr, or key=value text (docs/operations.md).
#pragma once

#include <chrono>
#include <concepts>
#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <variant>

namespace taser::log {

enum class level : int { trace = 0, debug = 1, info = 2, warn = 3, error = 4 };
enum class format { json, text };

struct field {
    using value_type = std::variant<std::int64_t, std::uint64_t, double, bool, std::string_view>;

    template <std::signed_integral T>
    field(std::string_view k, T v) : key(k), value(static_cast<std::int64_t>(v)) {}
    template <std::unsigned_integral T>
    field(std::string_view k, T v) : key(k), value(static_cast<std::uint64_t>(v)) {}
    field(std::string_view k, bool v) : key(k), value(v) {}
    field(std::string_view k, double v) : key(k), value(v) {}
    field(std::string_view k, std::string_view v) : key(k), value(v) {}
    field(std::string_view k, const char* v) : key(k), value(std::string_view(v)) {}

    std::string_view key;
    value_type value;
};

using fields = std::initializer_list<field>;

void set_level(level l) noexcept;
void set_format(format f) noexcept;
bool enabled(level l) noexcept;
// Parses "error", "warn", "info", "debug" or "trace"; returns false for anything else.
bool parse_level(std::string_view name, level& out) noexcept;

void write(level l, std::string_view event, fields f = {});

// Writes like write(), but at most a burst of lines per event name in each ten-second window;
// the lines dropped are counted and reported in one "log_suppressed" line when the window ends.
void write_limited(level l, std::string_view event, fields f = {});

inline void trace(std::string_view event, fields f = {}) {
    if (enabled(level::trace)) {
        write(level::trace, event, f);
    }
}
inline void debug(std::string_view event, fields f = {}) {
    if (enabled(level::debug)) {
        write(level::debug, event, f);
    }
}
inline void info(std::string_view event, fields f = {}) {
    write(level::info, event, f);
}
inline void warn(std::string_view event, fields f = {}) {
    write(level::warn, event, f);
}
inline void error(std::string_view event, fields f = {}) {
    write(level::error, event, f);
}

// Appends s to out as the body of a JSON string, escaped.
void append_json_escaped(std::string& out, std::string_view s);

}  // namespace taser::log
