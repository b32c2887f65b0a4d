// SPDX-License-Identifier: Apache-2.0
// HTTP/1.1 pieces that both edges share.
#include <algorithm>
#include <array>

#include <boost/beast/core/string.hpp>
#include <boost/beast/http/status.hpp>

#include "taser/http/message.hpp"
#include "taser/log/log.hpp"

namespace taser::http {
namespace {

bool iequals(std::string_view a, std::string_view b) noexcept {
    return boost::beast::iequals(a, b);
}

std::string_view trim(std::string_view s) noexcept {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) {
        s.remove_prefix(1);
    }
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) {
        s.remove_suffix(1);
    }
    return s;
}

}  // namespace

bool is_hop_by_hop(std::string_view name) noexcept {
    static constexpr std::array<std::string_view, 10> names = {
        "connection",         "keep-alive",    "proxy-connection", "te",
        "transfer-encoding",  "upgrade",       "trailer",          "proxy-authorization",
        "proxy-authenticate", "http2-settings"};
    return std::any_of(names.begin(), names.end(),
                       [&](std::string_view n) { return iequals(n, name); });
}

std::vector<frame::field> end_to_end_fields(const boost::beast::http::fields& fields,
                                            std::initializer_list<std::string_view> extra_drop) {
    // Names listed in any Connection field are hop-by-hop for this message (RFC 9110 §7.6.1).
    std::vector<std::string_view> nominated;
    for (const auto& f : fields) {
        if (!iequals(f.name_string(), "connection")) {
            continue;
        }
        std::string_view value = f.value();
        while (!value.empty()) {
            auto comma = value.find(',');
            auto item = trim(value.substr(0, comma));
            if (!item.empty()) {
                nominated.push_back(item);
            }
            value = comma == std::string_view::npos ? std::string_view() : value.substr(comma + 1);
        }
    }

    std::vector<frame::field> out;
    for (const auto& f : fields) {
        std::string_view name = f.name_string();
        if (is_hop_by_hop(name)) {
            continue;
        }
        auto named = [&](std::string_view n) { return iequals(n, name); };
        if (std::any_of(nominated.begin(), nominated.end(), named) ||
            std::any_of(extra_drop.begin(), extra_drop.end(), named)) {
            continue;
        }
        out.push_back({std::string(name), std::string(f.value())});
    }
    return out;
}

std::optional<std::string_view> find_field(const std::vector<frame::field>& fields,
                                           std::string_view name) noexcept {
    for (const auto& f : fields) {
        if (iequals(f.name, name)) {
            return std::string_view(f.value);
        }
    }
    return std::nullopt;
}

std::size_t count_fields(const std::vector<frame::field>& fields, std::string_view name) noexcept {
    return static_cast<std::size_t>(
        std::count_if(fields.begin(), fields.end(),
                      [&](const frame::field& f) { return iequals(f.name, name); }));
}

void append_fields(std::string& out, const std::vector<frame::field>& fields) {
    for (const auto& f : fields) {
        out += f.name;
        out += ": ";
        out += f.value;
        out += "\r\n";
    }
}

void append_status_line(std::string& out, unsigned status, unsigned version) {
    out += version == 10 ? "HTTP/1.0 " : "HTTP/1.1 ";
    out += std::to_string(status);
    out += ' ';
    auto reason = boost::beast::http::obsolete_reason(boost::beast::http::int_to_status(status));
    out += reason.empty() ? std::string_view("Unknown") : std::string_view(reason);
    out += "\r\n";
}

std::string vault_error_body(std::string_view message) {
    std::string out = R"({"errors":[")";
    log::append_json_escaped(out, message);
    out += "\"]}";
    return out;
}

std::string error_response(unsigned status, std::string_view message, bool close,
                           unsigned retry_after_seconds) {
    auto body = vault_error_body(message);
    std::string out;
    append_status_line(out, status);
    out += "Content-Type: application/json\r\nCache-Control: no-store\r\n";
    if (retry_after_seconds > 0) {
        out += "Retry-After: " + std::to_string(retry_after_seconds) + "\r\n";
    }
    if (close) {
        out += "Connection: close\r\n";
    }
    out += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n";
    out += body;
    return out;
}

std::string loggable_path(std::string_view target) {
    auto path = target.substr(0, target.find_first_of("?#"));
    // Vault's token API takes tokens and accessors in the path on these routes.
    static constexpr std::array<std::string_view, 7> secret_tails = {
        "/v1/auth/token/lookup/",          "/v1/auth/token/revoke/",
        "/v1/auth/token/revoke-orphan/",   "/v1/auth/token/renew/",
        "/v1/auth/token/lookup-accessor/", "/v1/auth/token/revoke-accessor/",
        "/v1/sys/wrapping/"};
    for (auto prefix : secret_tails) {
        if (path.starts_with(prefix) && path.size() > prefix.size()) {
            return std::string(prefix) + "<redacted>";
        }
    }
    std::string out(path.substr(0, 512));
    return out;
}

std::optional<std::string> to_origin_form(std::string_view target) {
    if (target.starts_with("/")) {
        return std::string(target);
    }
    for (std::string_view scheme : {"http://", "https://"}) {
        if (target.size() > scheme.size() && iequals(target.substr(0, scheme.size()), scheme)) {
            auto rest = target.substr(scheme.size());
            auto slash = rest.find_first_of("/?");
            if (slash == std::string_view::npos) {
                return std::string("/");
            }
            auto tail = rest.substr(slash);
            return tail.starts_with("?") ? "/" + std::string(tail) : std::string(tail);
        }
    }
    return std::nullopt;
}

}  // namespace taser::http
