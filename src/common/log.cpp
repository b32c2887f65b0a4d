// SPDX-License-Identifier: Apache-2.0
// Structured logging to stderr.
#include "taser/log/log.hpp"

#include <cstdio>
#include <ctime>
#include <map>
#include <string>

#include <unistd.h>

namespace taser::log {
namespace {

level current_level = level::info;
format current_format = format::json;

constexpr std::string_view level_names[] = {"trace", "debug", "info", "warn", "error"};
constexpr int burst_lines = 10;
constexpr auto burst_window = std::chrono::seconds(10);

struct burst {
    std::chrono::steady_clock::time_point window_start;
    int lines = 0;
    std::uint64_t dropped = 0;
};

std::map<std::string, burst, std::less<>>& bursts() {
    static std::map<std::string, burst, std::less<>> instance;
    return instance;
}

void append_time(std::string& out) {
    auto now = std::chrono::system_clock::now();
    auto seconds = std::chrono::system_clock::to_time_t(now);
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()) % 1000;
    std::tm tm{};
    gmtime_r(&seconds, &tm);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                  tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                  static_cast<int>(ms.count()));
    out += buf;
}

void append_value(std::string& out, const field::value_type& v, bool quote_strings) {
    std::visit(
        [&](const auto& x) {
            using T = std::decay_t<decltype(x)>;
            if constexpr (std::is_same_v<T, bool>) {
                out += x ? "true" : "false";
            } else if constexpr (std::is_same_v<T, std::string_view>) {
                if (quote_strings) {
                    out += '"';
                    append_json_escaped(out, x);
                    out += '"';
                } else {
                    out += x;
                }
            } else if constexpr (std::is_same_v<T, double>) {
                char buf[64];
                std::snprintf(buf, sizeof buf, "%.3f", x);
                out += buf;
            } else {
                out += std::to_string(x);
            }
        },
        v);
}

void emit(level l, std::string_view event, fields f) {
    std::string line;
    line.reserve(160);
    auto name = level_names[static_cast<int>(l)];
    if (current_format == format::json) {
        line += R"({"time":")";
        append_time(line);
        line += R"(","level":")";
        line += name;
        line += R"(","event":")";
        append_json_escaped(line, event);
        line += '"';
        for (const auto& x : f) {
            line += ",\"";
            append_json_escaped(line, x.key);
            line += "\":";
            append_value(line, x.value, true);
        }
        line += "}\n";
    } else {
        append_time(line);
        line += ' ';
        line += name;
        line += ' ';
        line += event;
        for (const auto& x : f) {
            line += ' ';
            line += x.key;
            line += '=';
            std::string value;
            append_value(value, x.value, false);
            bool quote = value.empty() || value.find_first_of(" \"=") != std::string::npos;
            if (quote) {
                line += '"';
                append_json_escaped(line, value);
                line += '"';
            } else {
                line += value;
            }
        }
        line += '\n';
    }
    // One write(2) per line, so that lines from concurrent processes sharing stderr stay whole.
    auto rc = ::write(STDERR_FILENO, line.data(), line.size());
    (void)rc;
}

}  // namespace

void set_level(level l) noexcept {
    current_level = l;
}
void set_format(format f) noexcept {
    current_format = f;
}
bool enabled(level l) noexcept {
    return l >= current_level;
}

bool parse_level(std::string_view name, level& out) noexcept {
    for (int i = 0; i < 5; ++i) {
        if (level_names[i] == name) {
            out = static_cast<level>(i);
            return true;
        }
    }
    return false;
}

void write(level l, std::string_view event, fields f) {
    if (enabled(l)) {
        emit(l, event, f);
    }
}

void write_limited(level l, std::string_view event, fields f) {
    if (!enabled(l)) {
        return;
    }
    auto now = std::chrono::steady_clock::now();
    auto& map = bursts();
    auto it = map.find(event);
    if (it == map.end()) {
        it = map.emplace(std::string(event), burst{now, 0, 0}).first;
    }
    auto& b = it->second;
    if (now - b.window_start >= burst_window) {
        if (b.dropped > 0) {
            emit(level::warn, "log_suppressed",
                 {{"suppressed_event", event}, {"lines", b.dropped}});
        }
        b = burst{now, 0, 0};
    }
    if (++b.lines > burst_lines) {
        ++b.dropped;
        return;
    }
    emit(l, event, f);
}

void append_json_escaped(std::string& out, std::string_view s) {
    for (char c : s) {
        auto u = static_cast<unsigned char>(c);
        switch (c) {
            case '"':
                out += "\\\"";
                break;
            case '\\':
                out += "\\\\";
                break;
            case '\n':
                out += "\\n";
                break;
            case '\r':
                out += "\\r";
                break;
            case '\t':
                out += "\\t";
                break;
            default:
                if (u < 0x20 || u == 0x7f) {
                    char buf[8];
                    std::snprintf(buf, sizeof buf, "\\u%04x", u);
                    out += buf;
                } else {
                    out += c;
                }
        }
    }
}

}  // namespace taser::log
