// SPDX-License-Identifier: Apache-2.0
// Command line, environment and config file.
#include "taser/config/cli.hpp"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "taser/config/parse.hpp"
#include "taser/frame/frame.hpp"
#include "taser/log/log.hpp"
#include "taser/tls/context.hpp"

namespace taser::config {

void add_common_options(po::options_description& desc) {
    desc.add_options()(
        "config", po::value<std::string>(),
        "read options from this file: one 'name = value' a line, names as the long flags "
        "without dashes; flags and TASER_* variables take precedence")(
        "log-level", po::value<std::string>()->default_value("info"),
        "error, warn, info, debug or trace")(
        "log-format", po::value<std::string>()->default_value("json"),
        "json (one object a line) or text")("help,h", "print this help and exit");
}

std::optional<po::variables_map> parse(int argc, char** argv, const po::options_description& desc,
                                       std::string_view usage) {
    po::variables_map vm;
    po::store(po::command_line_parser(argc, argv).options(desc).run(), vm);
    if (vm.count("help")) {
        std::cout << usage << "\n\n" << desc << "\n";
        return std::nullopt;
    }
    po::store(po::parse_environment(desc,
                                    [&desc](const std::string& variable) -> std::string {
                                        if (!variable.starts_with("TASER_")) {
                                            return {};
                                        }
                                        std::string name = variable.substr(6);
                                        std::transform(name.begin(), name.end(), name.begin(),
                                                       [](unsigned char c) {
                                                           return c == '_' ? '-' : std::tolower(c);
                                                       });
                                        // Variables that name no option are someone else's.
                                        if (name == "help" || !desc.find_nothrow(name, false)) {
                                            return {};
                                        }
                                        return name;
                                    }),
              vm);
    if (vm.count("config")) {
        auto file = vm["config"].as<std::string>();
        std::ifstream in(file);
        if (!in) {
            throw invalid_value("cannot read config file '" + file + "'");
        }
        po::store(po::parse_config_file(in, desc, false), vm);
    }
    po::notify(vm);

    log::level level{};
    auto level_name = vm["log-level"].as<std::string>();
    if (!log::parse_level(level_name, level)) {
        throw invalid_value("invalid value '" + level_name +
                            "' for --log-level: expected error, warn, info, debug or trace");
    }
    log::set_level(level);
    auto format = vm["log-format"].as<std::string>();
    if (format == "json") {
        log::set_format(log::format::json);
    } else if (format == "text") {
        log::set_format(log::format::text);
    } else {
        throw invalid_value("invalid value '" + format +
                            "' for --log-format: expected json or text");
    }
    return vm;
}

std::string optional_string(const po::variables_map& vm, const char* name) {
    return vm.count(name) ? vm[name].as<std::string>() : std::string();
}

std::vector<std::string> parse_pins(const po::variables_map& vm, const char* name) {
    if (!vm.count(name)) {
        return {};
    }
    auto pins = vm[name].as<std::vector<std::string>>();
    for (const auto& pin : pins) {
        if (!tls::is_valid_pin(pin)) {
            throw invalid_value("invalid value '" + pin + "' for --" + name +
                                ": expected sha256//BASE64 (44 characters of base64)");
        }
    }
    return pins;
}

std::uint32_t parse_window(const po::variables_map& vm, const char* name) {
    auto v = parse_size(name, vm[name].as<std::string>());
    if (v == 0 || v > frame::max_window) {
        throw invalid_value("invalid value for --" + std::string(name) +
                            ": expected a size from 1 to 2GiB-1");
    }
    return static_cast<std::uint32_t>(v);
}

std::uint32_t parse_frame_payload(const po::variables_map& vm) {
    auto v = parse_size("max-frame-payload", vm["max-frame-payload"].as<std::string>());
    if (v < frame::min_max_frame_payload || v > frame::max_length_field) {
        throw invalid_value(
            "invalid value for --max-frame-payload: expected a size from 16KiB to 16MiB-1");
    }
    return static_cast<std::uint32_t>(v);
}

int guarded_main(const char* role, int (*body)(int, char**), int argc, char** argv) {
    try {
        return body(argc, argv);
    } catch (const po::error& e) {
        std::cerr << "taser " << role << ": " << e.what() << " (see 'taser " << role
                  << " --help')\n";
    } catch (const invalid_value& e) {
        std::cerr << "taser " << role << ": " << e.what() << "\n";
    } catch (const tls::load_error& e) {
        std::cerr << "taser " << role << ": " << e.what() << "\n";
    } catch (const std::filesystem::filesystem_error& e) {
        std::cerr << "taser " << role << ": " << e.what() << "\n";
    }
    return usage_exit_code;
}

}  // namespace taser::config
