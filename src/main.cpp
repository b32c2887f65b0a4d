// SPDX-License-Identifier: Apache-2.0
// Entry point: picks the role from the first argument and hands over.
#include <iostream>
#include <string_view>

#include "taser/bridge/bridge.hpp"
#include "taser/broker/broker.hpp"
#include "taser/config/cli.hpp"
#include "taser/tls/certs.hpp"
#include "taser/tls/context.hpp"
#include "taser/version.hpp"

namespace {

constexpr std::string_view usage =
    "Usage: taser COMMAND [options]\n\n"
    "Commands:\n"
    "  broker     run in the cluster: accept bridges and Vault API clients\n"
    "  bridge     run next to the vault: dial brokers and replay their requests\n"
    "  certs      write a CA, broker and bridge certificates for a first try\n"
    "  pin CERT   print the key pin (sha256//BASE64) of a PEM certificate\n"
    "  version    print the version\n\n"
    "'taser COMMAND --help' describes the options of a command.\n";

int pin(int argc, char** argv) {
    if (argc != 2) {
        std::cerr << "taser pin: expected one argument, the PEM certificate file\n";
        return taser::config::usage_exit_code;
    }
    try {
        std::cout << taser::tls::spki_pin_of_file(argv[1]) << "\n";
    } catch (const taser::tls::load_error& e) {
        std::cerr << "taser pin: " << e.what() << "\n";
        return taser::config::usage_exit_code;
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::cerr << usage;
        return taser::config::usage_exit_code;
    }
    std::string_view command = argv[1];
    if (command == "broker") {
        return taser::broker::main(argc - 1, argv + 1);
    }
    if (command == "bridge") {
        return taser::bridge::main(argc - 1, argv + 1);
    }
    if (command == "certs") {
        return taser::tls::certs_main(argc - 1, argv + 1);
    }
    if (command == "pin") {
        return pin(argc - 1, argv + 1);
    }
    if (command == "version" || command == "--version") {
        std::cout << "taser " << taser::version << "\n";
        return 0;
    }
    if (command == "--help" || command == "-h" || command == "help") {
        std::cout << usage;
        return 0;
    }
    std::cerr << "taser: unknown command '" << command << "'\n\n" << usage;
    return taser::config::usage_exit_code;
}
