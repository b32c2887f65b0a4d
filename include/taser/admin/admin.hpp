// SPDX-License-Identifier: Apache-2.0
// The admin listener: /healthz, /readyz and /metrics for probes and Prometheus.
#pragma once

#include <functional>
#include <string>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>

namespace taser::admin {

struct handlers {
    std::function<bool()> ready;           // /readyz answers 200 while this returns true
    std::function<std::string()> metrics;  // the body of /metrics
};

// Serves admin requests until the acceptor closes; one request per connection.
boost::asio::awaitable<void> serve(boost::asio::ip::tcp::acceptor& acceptor, handlers h);

}  // namespace taser::admin
