// SPDX-License-Identifier: Apache-2.0
// TLS on the tunnel connection, with OpenSSL encrypting into and decrypting from memory buffers
// that this class moves to and from the socket in large pieces.
#pragma once

#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <openssl/ssl.h>

#include "taser/mux/transport.hpp"

namespace taser::tls {

namespace asio = boost::asio;
using error_code = boost::system::error_code;

// asio::ssl::stream moves at most one TLS record (17 KiB) per system call and per completion
// handler. The tunnel carries every request between broker and bridge, so this stream encrypts
// a whole write at once and sends it with one call, and reads up to read_chunk_bytes per call.
// Errors are those of asio::ssl::stream: codes of the SSL category from OpenSSL's error queue,
// eof after the peer's close_notify, and stream_truncated when the connection ends without one.
//
// One read and one write may be in flight at once. A TLS message that reading produces (an
// alert, the response to a KeyUpdate) waits in memory until the next write sends it.
class tunnel_stream final : public mux::transport {
public:
    enum class side { client, server };

    tunnel_stream(asio::ip::tcp::socket socket, asio::ssl::context& ctx);
    tunnel_stream(const asio::any_io_executor& ex, asio::ssl::context& ctx);
    ~tunnel_stream() override;
    tunnel_stream(const tunnel_stream&) = delete;
    tunnel_stream& operator=(const tunnel_stream&) = delete;

    SSL* native_handle() noexcept { return ssl_.get(); }
    asio::ip::tcp::socket& lowest_layer() noexcept { return socket_; }

    // Runs the TLS handshake as the given side. It must come before any read or write.
    asio::awaitable<error_code> handshake(side as);

    asio::awaitable<std::tuple<error_code, std::size_t>> read_some(asio::mutable_buffer b) override;
    asio::awaitable<std::tuple<error_code, std::size_t>> write_all(asio::const_buffer b) override;
    void close() noexcept override;
    void shutdown_send() noexcept override;
    void cork(bool on) noexcept override;

private:
    // Sends what OpenSSL has written to output_.
    asio::awaitable<error_code> send_pending();
    // Reads from the socket into input_.
    asio::awaitable<error_code> receive();
    // The error for an OpenSSL call that failed with SSL_get_error() == ssl_error.
    static error_code failure(int ssl_error);

    asio::ip::tcp::socket socket_;
    std::unique_ptr<SSL, void (*)(SSL*)> ssl_;
    BIO* input_ = nullptr;   // owned by ssl_
    BIO* output_ = nullptr;  // owned by ssl_
    std::vector<std::uint8_t> received_;
    std::vector<std::uint8_t> sending_;
};

}  // namespace taser::tls
