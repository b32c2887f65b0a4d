// SPDX-License-Identifier: Apache-2.0
// Deadlines for the operations pending on one connection, enforced by one watchdog coroutine.
#pragma once

#include <array>
#include <chrono>
#include <functional>
#include <memory>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

namespace taser::net {

namespace asio = boost::asio;

// A connection may have a read and a write in flight at once (a request body still arriving
// while the response goes out), and each needs its own deadline: a slot per kind of operation.
// When any armed slot passes its deadline, on_expire runs once (it closes the socket, which
// ends every pending operation). Create with std::make_shared, then start(); the owner calls
// stop() before the objects that on_expire touches go away.
class deadlines : public std::enable_shared_from_this<deadlines> {
public:
    enum slot : std::size_t { read = 0, write = 1, wait = 2 };
    using clock = std::chrono::steady_clock;

    deadlines(const asio::any_io_executor& ex, std::function<void()> on_expire)
        : timer_(ex, clock::time_point::max()), on_expire_(std::move(on_expire)) {
        at_.fill(clock::time_point::max());
    }

    void arm(slot s, clock::duration d) {
        at_[s] = clock::now() + d;
        if (at_[s] < timer_.expiry()) {
            timer_.expires_at(at_[s]);  // cancels the watchdog's wait, which then re-arms
        }
    }

    void disarm(slot s) { at_[s] = clock::time_point::max(); }

    bool expired() const noexcept { return expired_; }

    // Stops the watchdog; call before the owner goes away.
    void stop() {
        stopped_ = true;
        timer_.cancel();
    }

    void start() { asio::co_spawn(timer_.get_executor(), run(shared_from_this()), asio::detached); }

private:
    // Cannot throw: timer waits complete into a tuple.
    static asio::awaitable<void> run(std::shared_ptr<deadlines> self) { co_await self->loop(); }

    asio::awaitable<void> loop() {
        while (!stopped_) {
            auto next = earliest();
            if (timer_.expiry() != next) {
                timer_.expires_at(next);
            }
            co_await timer_.async_wait(asio::as_tuple(asio::use_awaitable));
            if (stopped_) {
                break;
            }
            if (clock::now() >= earliest()) {
                expired_ = true;
                on_expire_();
                break;
            }
        }
    }

    clock::time_point earliest() const {
        auto t = at_[0];
        for (auto x : at_) {
            t = std::min(t, x);
        }
        return t;
    }

    asio::steady_timer timer_;
    std::function<void()> on_expire_;
    std::array<clock::time_point, 3> at_{};
    bool expired_ = false;
    bool stopped_ = false;
};

// Stops a watchdog when the scope that owns what its on_expire touches ends, whichever way it
// ends, exceptions included.
class deadlines_guard {
public:
    explicit deadlines_guard(deadlines& d) noexcept : deadlines_(d) {}
    deadlines_guard(const deadlines_guard&) = delete;
    deadlines_guard& operator=(const deadlines_guard&) = delete;
    ~deadlines_guard() { deadlines_.stop(); }

private:
    deadlines& deadlines_;
};

}  // namespace taser::net
