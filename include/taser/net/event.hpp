// SPDX-License-Identifier: Apache-2.0
// A wake-up signal for coroutines on one io_context, built on a timer that never expires.
#pragma once

#include <chrono>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace taser::net {

namespace asio = boost::asio;

// Waiters re-check their condition in a loop around wait(); notify() wakes all of them. There is
// no lost wake-up on one thread, because a notifier only runs while every waiter is suspended.
class event {
public:
    explicit event(const asio::any_io_executor& ex)
        : timer_(ex, asio::steady_timer::time_point::max()) {}

    asio::awaitable<void> wait() {
        auto [ec] = co_await timer_.async_wait(asio::as_tuple(asio::use_awaitable));
        (void)ec;
    }

    // Waits like wait(), but at most until deadline; returns true when the deadline passed.
    // Other waiters of the same event may wake early, which their condition loop absorbs.
    asio::awaitable<bool> wait_until(std::chrono::steady_clock::time_point deadline) {
        timer_.expires_at(deadline);
        auto [ec] = co_await timer_.async_wait(asio::as_tuple(asio::use_awaitable));
        bool expired = !ec;
        if (expired) {
            timer_.expires_at(asio::steady_timer::time_point::max());
        }
        co_return expired;
    }

    void notify() { timer_.cancel(); }

private:
    asio::steady_timer timer_;
};

// Waits for d; cancellable, never throws.
inline asio::awaitable<void> sleep(std::chrono::steady_clock::duration d) {
    asio::steady_timer timer(co_await asio::this_coro::executor, d);
    auto [ec] = co_await timer.async_wait(asio::as_tuple(asio::use_awaitable));
    (void)ec;
}

}  // namespace taser::net
