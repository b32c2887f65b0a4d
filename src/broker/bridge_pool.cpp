// SPDX-License-Identifier: Apache-2.0
// The bridges connected to this broker.
#include "bridge_pool.hpp"

#include <algorithm>

#include <boost/asio/experimental/awaitable_operators.hpp>

namespace taser::broker {
namespace {

// How often a waiting request looks again: a session can also become usable when a stream
// ends on one that was at its stream limit, which no event announces.
constexpr auto recheck_interval = std::chrono::milliseconds(100);

}  // namespace

bridge_pool::bridge_pool(const asio::any_io_executor& ex) : executor_(ex), changed_(ex) {}

void bridge_pool::add(const std::shared_ptr<mux::session>& s) {
    sessions_.push_back(s);
    changed_.notify();
}

void bridge_pool::remove(const std::shared_ptr<mux::session>& s) {
    std::erase(sessions_, s);
    changed_.notify();
}

std::shared_ptr<mux::session> bridge_pool::pick() const {
    std::shared_ptr<mux::session> best;
    for (const auto& s : sessions_) {
        // On a tie the later session wins: a bridge that just connected is the likeliest to
        // work, and an older one may be a dead connection that nobody noticed yet.
        if (s->can_open() && (!best || s->open_streams() <= best->open_streams())) {
            best = s;
        }
    }
    return best;
}

std::size_t bridge_pool::ready_count() const noexcept {
    return static_cast<std::size_t>(std::count_if(sessions_.begin(), sessions_.end(),
                                                  [](const auto& s) { return s->can_open(); }));
}

asio::awaitable<std::shared_ptr<mux::session>> bridge_pool::acquire(
    std::chrono::milliseconds wait) {
    using namespace asio::experimental::awaitable_operators;
    auto deadline = std::chrono::steady_clock::now() + wait;
    for (;;) {
        if (auto s = pick()) {
            co_return s;
        }
        auto now = std::chrono::steady_clock::now();
        if (now >= deadline) {
            co_return nullptr;
        }
        asio::steady_timer timer(executor_, std::min<std::chrono::steady_clock::duration>(
                                                deadline - now, recheck_interval));
        co_await (changed_.wait() || timer.async_wait(asio::as_tuple(asio::use_awaitable)));
    }
}

void bridge_pool::goaway_all() {
    for (const auto& s : sessions_) {
        s->goaway(errc::no_error, "broker is shutting down");
    }
}

}  // namespace taser::broker
