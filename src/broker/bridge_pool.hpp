// SPDX-License-Identifier: Apache-2.0
// The bridges connected to this broker, and the choice of one for each new stream.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include <boost/asio/awaitable.hpp>

#include "taser/mux/session.hpp"
#include "taser/net/event.hpp"

namespace taser::broker {

namespace asio = boost::asio;

class bridge_pool {
public:
    explicit bridge_pool(const asio::any_io_executor& ex);

    void add(const std::shared_ptr<mux::session>& s);
    void remove(const std::shared_ptr<mux::session>& s);

    // Returns the session that can open a stream and has the fewest open streams, or null.
    std::shared_ptr<mux::session> pick() const;

    // Waits up to wait for a session that can open a stream; null when none came.
    asio::awaitable<std::shared_ptr<mux::session>> acquire(std::chrono::milliseconds wait);

    // Sends GOAWAY on every session.
    void goaway_all();

    std::size_t size() const noexcept { return sessions_.size(); }
    // Sessions that take new streams (connected and not draining).
    std::size_t ready_count() const noexcept;
    const std::vector<std::shared_ptr<mux::session>>& sessions() const noexcept {
        return sessions_;
    }

private:
    asio::any_io_executor executor_;
    std::vector<std::shared_ptr<mux::session>> sessions_;
    net::event changed_;
};

}  // namespace taser::broker
