// SPDX-License-Identifier: Apache-2.0
// Command line, TASER_* environment variables and config file, in that order of precedence
// (docs/configuration.md).
#pragma once

#include <optional>
#include <string>
#include <string_view>

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

// Runs body, turning the errors of option parsing and file loading into one line on stderr
// and usage_exit_code.
int guarded_main(const char* role, int (*body)(int, char**), int argc, char** argv);

}  // namespace taser::config
