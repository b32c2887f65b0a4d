// SPDX-License-Identifier: Apache-2.0
// Command line, TASER_* environment variables and config file, in that order of precedence
// (docs/configuration.md).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/program_options.hpp>

namespace taser::config {

namespace po = boost::program_options;

// Exit code for invalid flags, values or files.
inline constexpr int usage_exit_code = 2;

// Adds the options every role has: --config, --log-level, --log-format, --help.
void add_common_options(po::options_description& desc);

// Parses argv (after the role word), then TASER_<OPTION> variables (upper case, '-' as '_'),
// then the file named by --config ("name = value" lines, # comments). The first source that
// sets an option wins. Returns nullopt after printing help for --help. Throws po::error or
// invalid_value for bad input; applies --log-level and --log-format.
std::optional<po::variables_map> parse(int argc, char** argv, const po::options_description& desc,
                                       std::string_view usage);

// Returns the value of a string option without a default, or "" when it is not set.
std::string optional_string(const po::variables_map& vm, const char* name);

// Returns the key pins of a repeatable pin option, each checked to be sha256//BASE64.
std::vector<std::string> parse_pins(const po::variables_map& vm, const char* name);

// Returns a flow-control window size option, checked to lie from 1 to 2^31-1.
std::uint32_t parse_window(const po::variables_map& vm, const char* name);

// Returns --max-frame-payload, checked against the range of the frame format.
std::uint32_t parse_frame_payload(const po::variables_map& vm);

// Runs body, turning the errors of option parsing and file loading into one line on stderr
// and usage_exit_code.
int guarded_main(const char* role, int (*body)(int, char**), int argc, char** argv);

}  // namespace taser::config
