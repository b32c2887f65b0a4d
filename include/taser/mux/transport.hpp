// SPDX-License-Identifier: Apache-2.0
// The byte stream under a session: TLS in production, plain TCP in unit tests.
#pragma once

#include <cstddef>
#include <tuple>
#include <utility>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/system/error_code.hpp>

#include <netinet/in.h>
#include <netinet/tcp.h>

namespace taser::mux {

namespace asio = boost::asio;
using error_code = boost::system::error_code;

// Unsent bytes that the kernel may hold for a tunnel socket. Beyond it, frames wait in the
// session, where a RST_STREAM, PING or WINDOW_UPDATE can still go out ahead of bulk data
// instead of queueing behind megabytes on a slow path. Bytes in flight are not counted, so
// a fast link with a large bandwidth-delay product still fills; on loopback the kernel has
// no unsent bytes while the peer reads, so the value costs nothing there.
inline constexpr int tunnel_notsent_lowat_bytes = 16 * 1024;

// Applies tunnel_notsent_lowat_bytes (TCP_NOTSENT_LOWAT) to a connected tunnel socket.
template <class Socket>
void limit_unsent(Socket& socket) {
    using option = asio::detail::socket_option::integer<IPPROTO_TCP, TCP_NOTSENT_LOWAT>;
    error_code ignored;
    socket.set_option(option(tunnel_notsent_lowat_bytes), ignored);
}

// While corked, the kernel sends only full segments of a TCP socket; uncorking sends the rest.
template <class Socket>
void set_cork(Socket& socket, bool on) {
    using option = asio::detail::socket_option::integer<IPPROTO_TCP, TCP_CORK>;
    error_code ignored;
    socket.set_option(option(on ? 1 : 0), ignored);
}

// Closes a socket at once; its pending operations complete with an error.
template <class Socket>
void close_now(Socket& socket) {
    error_code ignored;
    socket.shutdown(asio::socket_base::shutdown_both, ignored);
    socket.close(ignored);
}

// One read and one write may be in flight at once, as with an ssl::stream.
class transport {
public:
    virtual ~transport() = default;
    virtual asio::awaitable<std::tuple<error_code, std::size_t>> read_some(
        asio::mutable_buffer b) = 0;
    virtual asio::awaitable<std::tuple<error_code, std::size_t>> write_all(
        asio::const_buffer b) = 0;
    // Closes the socket at once; pending reads and writes complete with an error.
    virtual void close() noexcept = 0;
    // Shuts down the sending direction of the TCP connection; reading goes on.
    virtual void shutdown_send() noexcept = 0;
    // While corked, the kernel sends only full segments; uncorking sends what is left.
    virtual void cork(bool on) noexcept = 0;
};

template <class AsyncStream>
class stream_transport final : public transport {
public:
    explicit stream_transport(AsyncStream s) : stream_(std::move(s)) {}

    asio::awaitable<std::tuple<error_code, std::size_t>> read_some(
        asio::mutable_buffer b) override {
        co_return co_await stream_.async_read_some(b, asio::as_tuple(asio::use_awaitable));
    }

    asio::awaitable<std::tuple<error_code, std::size_t>> write_all(asio::const_buffer b) override {
        co_return co_await asio::async_write(stream_, b, asio::as_tuple(asio::use_awaitable));
    }

    void close() noexcept override { close_now(stream_.lowest_layer()); }

    void shutdown_send() noexcept override {
        error_code ignored;
        stream_.lowest_layer().shutdown(asio::socket_base::shutdown_send, ignored);
    }

    void cork(bool on) noexcept override { set_cork(stream_.lowest_layer(), on); }

    AsyncStream& stream() { return stream_; }

private:
    AsyncStream stream_;
};

}  // namespace taser::mux
