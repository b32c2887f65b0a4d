// SPDX-License-Identifier: Apache-2.0
// TLS contexts and certificate pins.
#include <cstdio>
#include <ctime>
#include <fstream>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "taser/config/parse.hpp"
#include "taser/tls/context.hpp"

namespace taser::tls {
namespace {

// TLS 1.2 suites with forward secrecy and AEAD only; TLS 1.3 suites are OpenSSL's defaults,
// which are all AEAD.
constexpr const char* tls12_ciphers =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

[[noreturn]] void fail(const std::string& what) {
    throw load_error(what + ": " + last_openssl_error());
}

void require_readable(const std::string& file, std::string_view what) {
    std::ifstream in(file);
    if (!in) {
        throw load_error("cannot read " + std::string(what) + " file '" + file + "'");
    }
}

void apply_common(SSL_CTX* ctx, min_version min) {
    SSL_CTX_set_min_proto_version(ctx,
                                  min == min_version::tls1_3 ? TLS1_3_VERSION : TLS1_2_VERSION);
    SSL_CTX_set_options(
        ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    if (SSL_CTX_set_cipher_list(ctx, tls12_ciphers) != 1) {
        fail("cannot set the TLS 1.2 cipher list");
    }
}

void load_cert_and_key(SSL_CTX* ctx, const std::string& cert, const std::string& key) {
    require_readable(cert, "certificate");
    require_readable(key, "key");
    if (SSL_CTX_use_certificate_chain_file(ctx, cert.c_str()) != 1) {
        fail("cannot load certificate '" + cert + "'");
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key.c_str(), SSL_FILETYPE_PEM) != 1) {
        fail("cannot load key '" + key + "'");
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        fail("key '" + key + "' does not match certificate '" + cert + "'");
    }
}

void load_ca(SSL_CTX* ctx, const std::string& ca) {
    require_readable(ca, "CA");
    if (SSL_CTX_load_verify_locations(ctx, ca.c_str(), nullptr) != 1) {
        fail("cannot load CA file '" + ca + "'");
    }
}

// Wire format of an ALPN list: each protocol id prefixed by its length.
std::vector<unsigned char> alpn_wire(const std::string& id) {
    std::vector<unsigned char> out;
    out.push_back(static_cast<unsigned char>(id.size()));
    out.insert(out.end(), id.begin(), id.end());
    return out;
}

struct alpn_choice {
    std::string id;
    bool required = false;
};

int select_alpn(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in,
                unsigned int inlen, void* arg) {
    auto* choice = static_cast<alpn_choice*>(arg);
    for (unsigned int i = 0; i < inlen;) {
        unsigned int n = in[i];
        if (i + 1 + n > inlen) {
            break;
        }
        if (std::string_view(reinterpret_cast<const char*>(in + i + 1), n) == choice->id) {
            *out = in + i + 1;
            *outlen = static_cast<unsigned char>(n);
            return SSL_TLSEXT_ERR_OK;
        }
        i += 1 + n;
    }
    return choice->required ? SSL_TLSEXT_ERR_ALERT_FATAL : SSL_TLSEXT_ERR_NOACK;
}

}  // namespace

std::string last_openssl_error() {
    std::string out;
    while (auto code = ERR_get_error()) {
        char buf[256];
        ERR_error_string_n(code, buf, sizeof buf);
        if (!out.empty()) {
            out += "; ";
        }
        out += buf;
    }
    return out.empty() ? "no detail from OpenSSL" : out;
}

min_version parse_min_version(std::string_view option, std::string_view text) {
    if (text == "1.3") {
        return min_version::tls1_3;
    }
    if (text == "1.2") {
        return min_version::tls1_2;
    }
    throw config::invalid_value("invalid value '" + std::string(text) + "' for --" +
                                std::string(option) + ": expected 1.2 or 1.3");
}

std::shared_ptr<ssl::context> make_server_context(const server_options& o) {
    auto ctx = std::make_shared<ssl::context>(ssl::context::tls_server);
    auto* native = ctx->native_handle();
    apply_common(native, o.min);
    load_cert_and_key(native, o.cert_file, o.key_file);
    // Session tickets would let a client resume with keys that outlive a restart of this
    // process only if the ticket keys were shared; they are not, so tickets are simply off.
    SSL_CTX_set_options(native, SSL_OP_NO_TICKET);
    SSL_CTX_set_num_tickets(native, 0);
    SSL_CTX_set_session_cache_mode(native, SSL_SESS_CACHE_OFF);
    if (!o.client_ca_file.empty()) {
        load_ca(native, o.client_ca_file);
        SSL_CTX_set_verify(native, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
        if (o.client_must_be_client_auth) {
            SSL_CTX_set_purpose(native, X509_PURPOSE_SSL_CLIENT);
        }
        // Name the accepted CAs in the CertificateRequest, so clients pick the right cert.
        if (auto* names = SSL_load_client_CA_file(o.client_ca_file.c_str())) {
            SSL_CTX_set_client_CA_list(native, names);
        }
    }
    if (!o.alpn.empty()) {
        // The choice is stored in the context's ex data, whose free callback deletes it when
        // the context goes away.
        auto* choice = new alpn_choice{o.alpn, o.alpn_required};
        static int index = SSL_CTX_get_ex_new_index(
            0, nullptr, nullptr, nullptr, [](void*, void* ptr, CRYPTO_EX_DATA*, int, long, void*) {
                delete static_cast<alpn_choice*>(ptr);
            });
        SSL_CTX_set_ex_data(native, index, choice);
        SSL_CTX_set_alpn_select_cb(native, select_alpn, choice);
    }
    return ctx;
}

std::shared_ptr<ssl::context> make_client_context(const client_options& o) {
    auto ctx = std::make_shared<ssl::context>(ssl::context::tls_client);
    auto* native = ctx->native_handle();
    apply_common(native, o.min);
    if (!o.cert_file.empty()) {
        load_cert_and_key(native, o.cert_file, o.key_file);
    }
    if (o.ca_file.empty()) {
        SSL_CTX_set_default_verify_paths(native);
    } else {
        load_ca(native, o.ca_file);
    }
    SSL_CTX_set_verify(native, SSL_VERIFY_PEER, nullptr);
    SSL_CTX_set_purpose(native, X509_PURPOSE_SSL_SERVER);
    if (!o.alpn.empty()) {
        auto wire = alpn_wire(o.alpn);
        SSL_CTX_set_alpn_protos(native, wire.data(), static_cast<unsigned>(wire.size()));
    }
    return ctx;
}

void prepare_client_stream(SSL* ssl, const std::string& host) {
    if (!config::is_ip_literal(host)) {
        SSL_set_tlsext_host_name(ssl, host.c_str());
        SSL_set1_host(ssl, host.c_str());
    } else {
        auto* param = SSL_get0_param(ssl);
        X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str());
    }
}

std::string negotiated_alpn(SSL* ssl) {
    const unsigned char* data = nullptr;
    unsigned int len = 0;
    SSL_get0_alpn_selected(ssl, &data, &len);
    return data ? std::string(reinterpret_cast<const char*>(data), len) : std::string();
}

std::string spki_pin(X509* cert) {
    unsigned char* der = nullptr;
    int len = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(cert), &der);
    if (len <= 0) {
        return {};
    }
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int digest_len = 0;
    EVP_Digest(der, static_cast<std::size_t>(len), digest, &digest_len, EVP_sha256(), nullptr);
    OPENSSL_free(der);
    unsigned char b64[64];
    int n = EVP_EncodeBlock(b64, digest, static_cast<int>(digest_len));
    return "sha256//" + std::string(reinterpret_cast<char*>(b64), static_cast<std::size_t>(n));
}

std::string spki_pin_of_file(const std::string& pem_file) {
    require_readable(pem_file, "certificate");
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(pem_file.c_str(), "r"), &std::fclose);
    if (!f) {
        throw load_error("cannot open certificate file '" + pem_file + "'");
    }
    std::unique_ptr<X509, void (*)(X509*)> cert(PEM_read_X509(f.get(), nullptr, nullptr, nullptr),
                                                &X509_free);
    if (!cert) {
        fail("no PEM certificate in '" + pem_file + "'");
    }
    return spki_pin(cert.get());
}

bool is_valid_pin(std::string_view pin) {
    constexpr std::string_view prefix = "sha256//";
    if (!pin.starts_with(prefix) || pin.size() != prefix.size() + 44 || !pin.ends_with("=")) {
        return false;
    }
    auto body = pin.substr(prefix.size(), 43);
    return std::all_of(body.begin(), body.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '/';
    });
}

std::string describe_handshake_failure(SSL* ssl, const boost::system::error_code& ec) {
    auto verify = SSL_get_verify_result(ssl);
    if (verify == X509_V_OK) {
        return ec.message();
    }
    std::string out = std::string("certificate rejected: ") + X509_verify_cert_error_string(verify);
    if (verify == X509_V_ERR_CERT_NOT_YET_VALID || verify == X509_V_ERR_CERT_HAS_EXPIRED) {
        char now[32];
        auto t = std::time(nullptr);
        std::tm tm{};
        gmtime_r(&t, &tm);
        std::strftime(now, sizeof now, "%Y-%m-%dT%H:%M:%SZ", &tm);
        out += std::string(" (local time ") + now +
               "; compare with the certificate's validity and the clocks of both hosts)";
    }
    return out;
}

std::string describe_certificate(X509* cert) {
    if (!cert) {
        return "none";
    }
    char subject[256];
    X509_NAME_oneline(X509_get_subject_name(cert), subject, sizeof subject);
    std::string out = subject;
    if (auto* serial = X509_get_serialNumber(cert)) {
        if (auto* bn = ASN1_INTEGER_to_BN(serial, nullptr)) {
            if (char* hex = BN_bn2hex(bn)) {
                out += " serial=";
                out += hex;
                OPENSSL_free(hex);
            }
            BN_free(bn);
        }
    }
    if (auto* not_after = X509_get0_notAfter(cert)) {
        std::unique_ptr<BIO, int (*)(BIO*)> bio(BIO_new(BIO_s_mem()), &BIO_free);
        if (bio && ASN1_TIME_print(bio.get(), not_after)) {
            char* data = nullptr;
            auto n = BIO_get_mem_data(bio.get(), &data);
            out += " not_after=\"" + std::string(data, static_cast<std::size_t>(n)) + "\"";
        }
    }
    return out;
}

}  // namespace taser::tls
