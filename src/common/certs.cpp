// SPDX-License-Identifier: Apache-2.0
// `taser certs`: throwaway certificates for trials. Production uses the operator's PKI.
#include "taser/tls/certs.hpp"

#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <boost/program_options.hpp>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#include "taser/config/cli.hpp"
#include "taser/config/parse.hpp"
#include "taser/tls/context.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace taser::tls {
namespace {

namespace po = boost::program_options;

using key_ptr = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;
using cert_ptr = std::unique_ptr<X509, decltype(&X509_free)>;

// Certificates start five minutes in the past, so that a peer whose clock runs a little behind
// does not see them as not yet valid.
constexpr long backdate_seconds = 5 * 60;

[[noreturn]] void fail(const std::string& what) {
    throw load_error(what + ": " + last_openssl_error());
}

key_ptr make_key() {
    key_ptr key(EVP_EC_gen("P-256"), &EVP_PKEY_free);
    if (!key) {
        fail("cannot generate a P-256 key");
    }
    return key;
}

void add_extension(X509* cert, X509* issuer, int nid, const std::string& value) {
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
    std::unique_ptr<X509_EXTENSION, decltype(&X509_EXTENSION_free)> ext(
        X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()), &X509_EXTENSION_free);
    if (!ext || X509_add_ext(cert, ext.get(), -1) != 1) {
        fail("cannot add extension " + value);
    }
}

struct request {
    std::string common_name;
    std::vector<std::pair<int, std::string>> extensions;  // nid, OpenSSL config value
};

cert_ptr make_cert(const request& r, EVP_PKEY* key, X509* issuer, EVP_PKEY* issuer_key, long days) {
    cert_ptr cert(X509_new(), &X509_free);
    X509_set_version(cert.get(), 2);
    unsigned char serial[16];
    RAND_bytes(serial, sizeof serial);
    serial[0] &= 0x7f;  // a positive serial number
    std::unique_ptr<BIGNUM, decltype(&BN_free)> bn(BN_bin2bn(serial, sizeof serial, nullptr),
                                                   &BN_free);
    BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert.get()));
    X509_gmtime_adj(X509_getm_notBefore(cert.get()), -backdate_seconds);
    X509_gmtime_adj(X509_getm_notAfter(cert.get()), days * 24 * 3600);
    X509_set_pubkey(cert.get(), key);
    auto* name = X509_get_subject_name(cert.get());
    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>("taser trial"), -1, -1, 0);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>(r.common_name.c_str()), -1,
                               -1, 0);
    X509* signer = issuer ? issuer : cert.get();
    X509_set_issuer_name(cert.get(), X509_get_subject_name(signer));
    for (const auto& [nid, value] : r.extensions) {
        add_extension(cert.get(), signer, nid, value);
    }
    if (X509_sign(cert.get(), issuer_key ? issuer_key : key, EVP_sha256()) <= 0) {
        fail("cannot sign the certificate for " + r.common_name);
    }
    return cert;
}

// Writes PEM text to a new file with the given mode; an existing file is an error unless
// force is set.
void write_file(const std::filesystem::path& path, mode_t mode, bool force,
                const std::function<int(BIO*)>& write) {
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), &BIO_free);
    if (write(bio.get()) != 1) {
        fail("cannot encode " + path.string());
    }
    char* data = nullptr;
    auto n = BIO_get_mem_data(bio.get(), &data);
    if (force) {
        ::unlink(path.c_str());
    }
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) {
        throw load_error("cannot create " + path.string() + ": " + std::strerror(errno) +
                         (errno == EEXIST ? " (use --force to overwrite)" : ""));
    }
    auto written = ::write(fd, data, static_cast<std::size_t>(n));
    ::fchmod(fd, mode);
    ::close(fd);
    if (written != n) {
        throw load_error("cannot write " + path.string());
    }
}

std::string san_list(const std::vector<std::string>& names) {
    std::string out;
    for (const auto& n : names) {
        if (!out.empty()) {
            out += ",";
        }
        out += (config::is_ip_literal(n) ? "IP:" : "DNS:") + n;
    }
    return out;
}

int run(int argc, char** argv) {
    po::options_description desc("taser certs options");
    desc.add_options()("out", po::value<std::string>(),
                       "directory to write the files to (created if missing)")(
        "broker-host", po::value<std::vector<std::string>>(),
        "a name or IP address that bridges use to reach the broker (repeatable)")(
        "bridge-name", po::value<std::string>()->default_value("bridge"),
        "common name of the bridge certificate")("days", po::value<long>()->default_value(365),
                                                 "validity of every certificate, in days")(
        "force", po::bool_switch(), "overwrite existing files")("help,h",
                                                                "print this help and exit");
    po::variables_map vm;
    po::store(po::command_line_parser(argc, argv).options(desc).run(), vm);
    po::notify(vm);
    if (vm.count("help")) {
        std::cout << "Usage: taser certs --out DIR --broker-host NAME [options]\n\n"
                     "Writes a CA, a broker certificate (server auth) and a bridge certificate\n"
                     "(client auth) with their keys and pins. For trials: production certificates\n"
                     "come from your own PKI or cert-manager.\n\n"
                  << desc << "\n";
        return 0;
    }
    if (!vm.count("out") || !vm.count("broker-host")) {
        throw config::invalid_value("--out and at least one --broker-host are required");
    }
    auto days = vm["days"].as<long>();
    if (days < 1 || days > 3650) {
        throw config::invalid_value("--days must be from 1 to 3650");
    }
    std::filesystem::path out = vm["out"].as<std::string>();
    std::filesystem::create_directories(out);
    bool force = vm["force"].as<bool>();
    auto hosts = vm["broker-host"].as<std::vector<std::string>>();

    auto ca_key = make_key();
    auto ca = make_cert({"taser trial CA",
                         {{NID_basic_constraints, "critical,CA:TRUE,pathlen:0"},
                          {NID_key_usage, "critical,keyCertSign,cRLSign"},
                          {NID_subject_key_identifier, "hash"}}},
                        ca_key.get(), nullptr, nullptr, days);
    auto broker_key = make_key();
    auto broker = make_cert({hosts.front(),
                             {{NID_basic_constraints, "critical,CA:FALSE"},
                              {NID_key_usage, "critical,digitalSignature"},
                              {NID_ext_key_usage, "serverAuth"},
                              {NID_subject_alt_name, san_list(hosts)},
                              {NID_authority_key_identifier, "keyid"}}},
                            broker_key.get(), ca.get(), ca_key.get(), days);
    auto bridge_key = make_key();
    auto bridge = make_cert({vm["bridge-name"].as<std::string>(),
                             {{NID_basic_constraints, "critical,CA:FALSE"},
                              {NID_key_usage, "critical,digitalSignature"},
                              {NID_ext_key_usage, "clientAuth"},
                              {NID_authority_key_identifier, "keyid"}}},
                            bridge_key.get(), ca.get(), ca_key.get(), days);

    auto write_cert = [&](const char* file, X509* cert) {
        write_file(out / file, 0644, force, [cert](BIO* b) { return PEM_write_bio_X509(b, cert); });
    };
    auto write_key = [&](const char* file, EVP_PKEY* key) {
        write_file(out / file, 0600, force, [key](BIO* b) {
            return PEM_write_bio_PrivateKey(b, key, nullptr, nullptr, 0, nullptr, nullptr);
        });
    };
    write_cert("ca.pem", ca.get());
    write_key("ca-key.pem", ca_key.get());
    write_cert("broker.pem", broker.get());
    write_key("broker-key.pem", broker_key.get());
    write_cert("bridge.pem", bridge.get());
    write_key("bridge-key.pem", bridge_key.get());
    auto pins = "broker " + spki_pin(broker.get()) + "\nbridge " + spki_pin(bridge.get()) + "\n";
    write_file(out / "pins.txt", 0644, force, [&pins](BIO* b) {
        return BIO_write(b, pins.data(), static_cast<int>(pins.size())) > 0 ? 1 : 0;
    });

    std::cout << "wrote ca.pem, broker.pem, bridge.pem, their keys (mode 0600) and pins.txt to "
              << out.string() << "\n"
              << "broker: --bridge-cert broker.pem --bridge-key broker-key.pem --bridge-ca ca.pem "
                 "--bridge-pin "
              << spki_pin(bridge.get()) << "\n"
              << "bridge: --client-cert bridge.pem --client-key bridge-key.pem --ca-cert ca.pem "
                 "--broker-pin "
              << spki_pin(broker.get()) << "\n";
    return 0;
}

}  // namespace

int certs_main(int argc, char** argv) {
    return config::guarded_main("certs", run, argc, argv);
}

}  // namespace taser::tls
