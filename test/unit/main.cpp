// SPDX-License-Identifier: Apache-2.0
// Entry point of the unit tests.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
