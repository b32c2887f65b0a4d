// SPDX-License-Identifier: Apache-2.0
// HTTP/1.1 pieces that both edges share: hop-by-hop fields, heads as text, Vault-shaped errors.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/beast/http/fields.hpp>

#include "taser/frame/frame.hpp"

namespace taser::http {

// True for the fields that RFC 9110 §7.6.1 and RFC 9112 name as connection-specific, plus
// Proxy-Authorization and Proxy-Authenticate, which belong to the hop to the proxy.
bool is_hop_by_hop(std::string_view name) noexcept;

// Returns the fields that travel end to end, in their order and with their repeats: every
// field except hop-by-hop ones, those named in Connection, and the names in extra_drop.
std::vector<frame::field> end_to_end_fields(
    const boost::beast::http::fields& fields,
    std::initializer_list<std::string_view> extra_drop = {});

// Returns the value of the first field called name (case-insensitive), if any.
std::optional<std::string_view> find_field(const std::vector<frame::field>& fields,
                                           std::string_view name) noexcept;
std::size_t count_fields(const std::vector<frame::field>& fields, std::string_view name) noexcept;

// Appends "name: value\r\n" for each field.
void append_fields(std::string& out, const std::vector<frame::field>& fields);

// Appends "HTTP/1.1 status reason\r\n".
void append_status_line(std::string& out, unsigned status, unsigned version = 11);

// Returns {"errors":["message"]}, the error shape of Vault's API.
std::string vault_error_body(std::string_view message);

// Returns a whole response with a Vault-shaped JSON error body. retry_after_seconds > 0 adds
// Retry-After; close adds Connection: close.
std::string error_response(unsigned status, std::string_view message, bool close,
                           unsigned retry_after_seconds = 0);

// Returns the path of a request target without its query, for logs: a query string may carry
// secrets. Token-bearing paths of Vault's token API are cut after their fixed prefix.
std::string loggable_path(std::string_view target);

// Converts an absolute-form target (http://host/path?q) to origin form (/path?q). Returns
// nullopt when the target is neither origin form nor absolute form.
std::optional<std::string> to_origin_form(std::string_view target);

}  // namespace taser::http
