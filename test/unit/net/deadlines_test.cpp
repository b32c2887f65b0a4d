// SPDX-License-Identifier: Apache-2.0
// Unit tests of the per-connection watchdog.
#include "taser/net/deadlines.hpp"

#include <chrono>
#include <memory>
#include <stdexcept>

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>

using taser::net::deadlines;
using namespace std::chrono_literals;

TEST_CASE("deadlines expire an armed slot") {
    boost::asio::io_context io;
    bool expired = false;
    auto timers = std::make_shared<deadlines>(io.get_executor(), [&] { expired = true; });
    timers->start();
    timers->arm(deadlines::read, 1ms);
    io.run_for(200ms);
    CHECK(expired);
    CHECK(timers->expired());
}

TEST_CASE("deadlines guard stops the watchdog when its scope throws") {
    boost::asio::io_context io;
    bool expired = false;
    auto timers = std::make_shared<deadlines>(io.get_executor(), [&] { expired = true; });
    timers->start();
    try {
        taser::net::deadlines_guard guard(*timers);
        timers->arm(deadlines::read, 1ms);
        throw std::runtime_error("connection failed");
    } catch (const std::runtime_error&) {
    }
    io.run_for(200ms);
    CHECK_FALSE(expired);
    CHECK_FALSE(timers->expired());
}
