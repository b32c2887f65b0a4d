// SPDX-License-Identifier: Apache-2.0
// Copies bytes between a socket and a tunnel stream in both directions, with half-close
// (docs/protocol.md, byte tunnels). Used by the broker's passthrough edge and CONNECT, and by
// the bridge's side of a tunnel.
#pragma once

#include <array>
#include <memory>
#include <vector>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include "taser/mux/session.hpp"
#include "taser/net/deadlines.hpp"
#include "taser/net/event.hpp"
#include "taser/net/spawn.hpp"
#include "taser/net/wait.hpp"

namespace taser::mux {

struct relay_counts {
    std::uint64_t to_stream = 0;    // bytes read from the socket and sent on the stream
    std::uint64_t from_stream = 0;  // bytes received on the stream and written to the socket
    bool clean = false;             // both directions ended with a half-close, no error
};

namespace detail {

// Passes the far side's end on to the socket. Returns false when the socket cannot carry a
// half-close: a TLS stream's close_notify would need a read of its own, so there the tunnel
// ends as a whole and its owner closes the connection.
inline bool shutdown_send(asio::ip::tcp::socket& s) {
    error_code ignored;
    s.shutdown(asio::ip::tcp::socket::shutdown_send, ignored);
    return true;
}

template <class Stream>
bool shutdown_send(Stream&) {
    return false;
}

}  // namespace detail

// Relays until both directions have ended. `prefix` holds bytes already read from the socket
// (for example after a CONNECT request head) and goes first. The tunnel is idle, and the
// deadlines' owner closes the socket, when no byte moved for `idle` while a read waits, or a
// write to the socket stalls for `idle`.
template <class Socket>
asio::awaitable<relay_counts> relay(Socket& socket, std::shared_ptr<stream> s,
                                    net::deadlines& timers, std::chrono::milliseconds idle,
                                    std::vector<std::uint8_t> prefix = {}) {
    constexpr std::size_t chunk_bytes = 64 * 1024;
    relay_counts counts;
    bool up_clean = false;
    bool up_running = true;
    net::event up_finished(s->session_executor());

    // Socket to stream.
    net::spawn(
        s->session_executor(),
        [&, s]() -> asio::awaitable<void> {
            if (!prefix.empty()) {
                counts.to_stream += prefix.size();
                if (co_await s->write(prefix, false)) {
                    up_running = false;
                    up_finished.notify();
                    co_return;
                }
            }
            // The buffer starts small and grows up to chunk_bytes while reads keep filling it.
            // Where the socket can be waited on without a read, a read that drains the socket
            // frees the buffer, so that thousands of quiet tunnels cost little.
            constexpr bool waits_unbuffered = net::can_wait_readable<Socket>;
            std::size_t size = 4096;
            std::unique_ptr<std::uint8_t[]> chunk;
            for (;;) {
                timers.arm(net::deadlines::read, idle);
                if (!chunk) {
                    if constexpr (waits_unbuffered) {
                        co_await net::wait_readable(socket);
                    }
                    chunk = std::make_unique_for_overwrite<std::uint8_t[]>(size);
                }
                auto [ec, n] = co_await socket.async_read_some(asio::buffer(chunk.get(), size),
                                                               asio::as_tuple(asio::use_awaitable));
                timers.disarm(net::deadlines::read);
                if (ec == asio::error::eof) {
                    up_clean = !(co_await s->write({}, true));
                    break;
                }
                if (ec) {
                    s->reset(errc::cancel);
                    break;
                }
                counts.to_stream += n;
                if (co_await s->write({chunk.get(), n}, false)) {
                    break;
                }
                if (n == size && size < chunk_bytes) {
                    size *= 2;
                    chunk.reset();
                } else if (waits_unbuffered && n < size) {
                    chunk.reset();
                }
            }
            up_running = false;
            up_finished.notify();
        },
        "relay_to_stream");

    // Stream to socket.
    bool down_clean = false;
    for (;;) {
        auto [ec, chunk] = co_await s->read();
        if (ec) {
            break;
        }
        if (chunk.empty()) {
            down_clean = true;
            if (!detail::shutdown_send(socket)) {
                error_code ignored;
                socket.lowest_layer().cancel(ignored);
            }
            break;
        }
        timers.arm(net::deadlines::write, idle);
        auto [wec, n] = co_await asio::async_write(socket, asio::buffer(chunk),
                                                   asio::as_tuple(asio::use_awaitable));
        timers.disarm(net::deadlines::write);
        counts.from_stream += n;
        // Progress in this direction keeps a quiet other direction alive: a client that sends
        // nothing while a long answer streams down is not idle.
        if (up_running) {
            timers.arm(net::deadlines::read, idle);
        }
        if (wec) {
            s->reset(errc::cancel);
            break;
        }
    }
    if (!down_clean) {
        // The far side failed: stop reading this side too.
        error_code ignored;
        socket.lowest_layer().cancel(ignored);
    }
    while (up_running) {
        co_await up_finished.wait();
    }
    counts.clean = up_clean && down_clean;
    co_return counts;
}

}  // namespace taser::mux
