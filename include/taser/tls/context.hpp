// SPDX-License-Identifier: Apache-2.0
// TLS contexts of the three edges and certificate pins (docs/security.md).
#pragma once

#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/stream.hpp>

namespace taser::tls {

namespace ssl = boost::asio::ssl;

// Thrown when a certificate, key or CA file cannot be loaded; what() is one line for the user.
struct load_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

enum class min_version { tls1_2, tls1_3 };

// Parses "1.2" or "1.3".
min_version parse_min_version(std::string_view option, std::string_view text);

struct server_options {
    std::string cert_file;
    std::string key_file;
    std::string client_ca_file;  // when set, a client certificate chaining to it is required
    bool client_must_be_client_auth = false;  // require the clientAuth extended key usage
    min_version min = min_version::tls1_3;
    std::string alpn;            // the one ALPN protocol id offered
    bool alpn_required = false;  // reject a client that offers no matching protocol
};

struct client_options {
    std::string cert_file;  // optional
    std::string key_file;
    std::string ca_file;  // empty: the system's trust store
    min_version min = min_version::tls1_3;
    std::string alpn;  // optional
};

std::shared_ptr<ssl::context> make_server_context(const server_options& o);
std::shared_ptr<ssl::context> make_client_context(const client_options& o);

// Prepares a client stream for a handshake with host: sets SNI (unless host is an IP literal)
// and the name that the peer's certificate must carry.
void prepare_client_stream(SSL* ssl, const std::string& host);

// Returns the negotiated ALPN protocol, empty when none.
std::string negotiated_alpn(SSL* ssl);

// Returns "sha256//BASE64" of the certificate's SubjectPublicKeyInfo, the pin format of curl's
// --pinnedpubkey.
std::string spki_pin(X509* cert);
// Reads the first certificate of a PEM file and returns its pin.
std::string spki_pin_of_file(const std::string& pem_file);
// Checks the syntax "sha256//" followed by 44 characters of base64.
bool is_valid_pin(std::string_view pin);

// Explains a failed handshake: the certificate check's verdict if there was one (with the local
// time when the verdict is about validity dates, since clock skew is a common cause), else the
// TLS error.
std::string describe_handshake_failure(SSL* ssl, const boost::system::error_code& ec);

// Returns a one-line description of the peer certificate: subject, serial and expiry.
std::string describe_certificate(X509* cert);

// Returns the text of the last OpenSSL error in this thread, then clears the queue.
std::string last_openssl_error();

}  // namespace taser::tls
