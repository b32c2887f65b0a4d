// SPDX-License-Identifier: Apache-2.0
// co_spawn with a completion handler that logs an escaped exception instead of dropping it.
#pragma once

#include <exception>
#include <string_view>

#include <boost/asio/co_spawn.hpp>

#include "taser/log/log.hpp"

namespace taser::net {

template <class Executor, class Awaitable>
void spawn(const Executor& ex, Awaitable&& task, std::string_view name) {
    boost::asio::co_spawn(ex, std::forward<Awaitable>(task), [name](std::exception_ptr e) {
        if (!e) {
            return;
        }
        try {
            std::rethrow_exception(e);
        } catch (const std::exception& x) {
            log::error("task_failed", {{"task", name}, {"error", x.what()}});
        } catch (...) {
            log::error("task_failed", {{"task", name}, {"error", "unknown exception"}});
        }
    });
}

}  // namespace taser::net
