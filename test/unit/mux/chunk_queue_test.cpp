// SPDX-License-Identifier: Apache-2.0
// Unit tests of the queue of a stream's received DATA.
#include <cstdint>
#include <vector>

#include <catch2/catch.hpp>

#include "taser/mux/session.hpp"

using taser::mux::chunk_queue;

TEST_CASE("chunk queue keeps arrival order") {
    chunk_queue q;
    CHECK(q.empty());
    q.emplace_back() = {1, 2};
    q.emplace_back() = {3};
    q.back().push_back(4);
    CHECK_FALSE(q.empty());
    CHECK(q.pop_front() == std::vector<std::uint8_t>{1, 2});
    CHECK(q.pop_front() == std::vector<std::uint8_t>{3, 4});
    CHECK(q.empty());
    q.emplace_back() = {5};
    q.clear();
    CHECK(q.empty());
}

TEST_CASE("chunk queue compacts under steady reads") {
    // One chunk always stays queued, so the queue never runs empty and must compact itself.
    chunk_queue q;
    std::uint8_t next_in = 0;
    std::uint8_t next_out = 0;
    q.emplace_back() = {next_in++};
    for (int i = 0; i < 10000; ++i) {
        q.emplace_back() = {next_in++};
        auto front = q.pop_front();
        REQUIRE(front.size() == 1);
        REQUIRE(front[0] == next_out++);
    }
    CHECK(q.pop_front() == std::vector<std::uint8_t>{next_out});
    CHECK(q.empty());
}
