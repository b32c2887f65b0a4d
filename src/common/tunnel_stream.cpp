// SPDX-License-Identifier: Apache-2.0
// TLS on the tunnel connection through memory buffers.
#include "taser/tls/tunnel_stream.hpp"

#include <algorithm>
#include <new>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <openssl/err.h>

namespace taser::tls {
namespace {

using asio::as_tuple;
using asio::use_awaitable;

// Bytes read from the socket per call: a few TLS records, or many small frames.
constexpr std::size_t read_chunk_bytes = 256 * 1024;

SSL* new_ssl(asio::ssl::context& ctx) {
    SSL* ssl = SSL_new(ctx.native_handle());
    if (!ssl) {
        throw std::bad_alloc();
    }
    return ssl;
}

}  // namespace

tunnel_stream::tunnel_stream(asio::ip::tcp::socket socket, asio::ssl::context& ctx)
    : socket_(std::move(socket)), ssl_(new_ssl(ctx), &SSL_free) {
    input_ = BIO_new(BIO_s_mem());
    output_ = BIO_new(BIO_s_mem());
    if (!input_ || !output_) {
        BIO_free(input_);
        BIO_free(output_);
        throw std::bad_alloc();
    }
    // An empty input makes OpenSSL retry later (SSL_ERROR_WANT_READ) instead of ending the stream.
    BIO_set_mem_eof_return(input_, -1);
    SSL_set_bio(ssl_.get(), input_, output_);
    received_.resize(read_chunk_bytes);
}

tunnel_stream::tunnel_stream(const asio::any_io_executor& ex, asio::ssl::context& ctx)
    : tunnel_stream(asio::ip::tcp::socket(ex), ctx) {}

tunnel_stream::~tunnel_stream() = default;

error_code tunnel_stream::failure(int ssl_error) {
    auto code = ERR_get_error();
    if (ssl_error == SSL_ERROR_ZERO_RETURN) {
        return asio::error::eof;
    }
    if (code == 0) {
        return asio::ssl::error::unspecified_system_error;
    }
    return {static_cast<int>(code), asio::error::get_ssl_category()};
}

asio::awaitable<error_code> tunnel_stream::send_pending() {
    auto pending = BIO_ctrl_pending(output_);
    if (pending == 0) {
        co_return error_code{};
    }
    if (sending_.size() < pending) {
        sending_.resize(pending);
    }
    auto got = BIO_read(output_, sending_.data(), static_cast<int>(pending));
    if (got <= 0) {
        co_return asio::ssl::error::unspecified_system_error;
    }
    auto data = asio::buffer(sending_.data(), static_cast<std::size_t>(got));
    // The socket usually takes it all at once; waiting costs a trip through the event loop.
    error_code ec;
    auto sent = socket_.write_some(data, ec);
    if (ec && ec != asio::error::would_block) {
        co_return ec;
    }
    if (sent < data.size()) {
        auto [wec, n] = co_await asio::async_write(socket_, data + sent, as_tuple(use_awaitable));
        co_return wec;
    }
    co_return error_code{};
}

asio::awaitable<error_code> tunnel_stream::receive() {
    error_code ec;
    std::size_t n = 0;
    while (!ec) {
        n = socket_.read_some(asio::buffer(received_), ec);
        if (ec != asio::error::would_block) {
            break;
        }
        std::tie(ec) =
            co_await socket_.async_wait(asio::ip::tcp::socket::wait_read, as_tuple(use_awaitable));
    }
    if (ec == asio::error::eof) {
        // The peer closed the connection without a close_notify.
        co_return asio::ssl::error::stream_truncated;
    }
    if (ec) {
        co_return ec;
    }
    if (BIO_write(input_, received_.data(), static_cast<int>(n)) != static_cast<int>(n)) {
        co_return asio::ssl::error::unspecified_system_error;
    }
    co_return error_code{};
}

asio::awaitable<error_code> tunnel_stream::handshake(side as) {
    // The direct reads and writes of send_pending() and receive() must not block the thread.
    // Setting this costs a system call, so it happens once, here.
    error_code ec;
    socket_.non_blocking(true, ec);
    if (ec) {
        co_return ec;
    }
    if (as == side::client) {
        SSL_set_connect_state(ssl_.get());
    } else {
        SSL_set_accept_state(ssl_.get());
    }
    for (;;) {
        ERR_clear_error();
        int result = SSL_do_handshake(ssl_.get());
        int ssl_error = result == 1 ? SSL_ERROR_NONE : SSL_get_error(ssl_.get(), result);
        error_code failed;
        if (ssl_error != SSL_ERROR_NONE && ssl_error != SSL_ERROR_WANT_READ) {
            failed = failure(ssl_error);
        }
        // What OpenSSL wrote goes out first, including an alert with the reason for a failure.
        auto sent = co_await send_pending();
        if (failed) {
            co_return failed;
        }
        if (sent) {
            co_return sent;
        }
        if (result == 1) {
            co_return error_code{};
        }
        if (auto received = co_await receive()) {
            co_return received;
        }
    }
}

asio::awaitable<std::tuple<error_code, std::size_t>> tunnel_stream::read_some(
    asio::mutable_buffer b) {
    auto* out = static_cast<std::uint8_t*>(b.data());
    for (;;) {
        // Decrypt every record that fits and has arrived, without waiting for more.
        std::size_t total = 0;
        while (total < b.size()) {
            ERR_clear_error();
            std::size_t n = 0;
            int result = SSL_read_ex(ssl_.get(), out + total, b.size() - total, &n);
            if (result == 1) {
                total += n;
                continue;
            }
            int ssl_error = SSL_get_error(ssl_.get(), result);
            if (ssl_error == SSL_ERROR_WANT_READ) {
                break;
            }
            if (total > 0) {
                break;  // OpenSSL keeps the failure: the next call reports it
            }
            co_return std::tuple{failure(ssl_error), std::size_t{0}};
        }
        if (total > 0 || b.size() == 0) {
            co_return std::tuple{error_code{}, total};
        }
        if (auto ec = co_await receive()) {
            co_return std::tuple{ec, std::size_t{0}};
        }
    }
}

asio::awaitable<std::tuple<error_code, std::size_t>> tunnel_stream::write_all(
    asio::const_buffer b) {
    if (b.size() > 0) {
        ERR_clear_error();
        std::size_t written = 0;
        int result = SSL_write_ex(ssl_.get(), b.data(), b.size(), &written);
        if (result != 1) {
            co_return std::tuple{failure(SSL_get_error(ssl_.get(), result)), std::size_t{0}};
        }
    }
    auto ec = co_await send_pending();
    co_return std::tuple{ec, ec ? std::size_t{0} : b.size()};
}

void tunnel_stream::close() noexcept {
    mux::close_now(socket_);
}

void tunnel_stream::shutdown_send() noexcept {
    error_code ignored;
    socket_.shutdown(asio::socket_base::shutdown_send, ignored);
}

void tunnel_stream::cork(bool on) noexcept {
    mux::set_cork(socket_, on);
}

}  // namespace taser::tls
