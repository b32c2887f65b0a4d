// SPDX-License-Identifier: Apache-2.0
// Unit tests of the tunnel's TLS stream: a client and a server stream over loopback TCP, with
// certificates made by `taser certs` in a temporary folder.
#include "taser/tls/tunnel_stream.hpp"

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/write.hpp>
#include <catch2/catch.hpp>

#include "taser/tls/certs.hpp"
#include "taser/tls/context.hpp"

namespace asio = boost::asio;
namespace tls = taser::tls;
using asio::ip::tcp;
using tls::error_code;
using namespace std::chrono_literals;

namespace {

using byte_vector = std::vector<std::uint8_t>;
using side = tls::tunnel_stream::side;

constexpr auto task_limit = 5s;
constexpr std::string_view alpn = "taser/1";

// A folder with a CA, a broker (server) and a bridge (client) certificate, removed at the end.
struct cert_folder {
    std::filesystem::path path;

    cert_folder() {
        std::string pattern = (std::filesystem::temp_directory_path() / "taser-unit.XXXXXX");
        if (!mkdtemp(pattern.data())) {
            throw std::runtime_error("mkdtemp failed");
        }
        path = pattern;
        std::string out = path.string();
        std::vector<std::string> args{"certs", "--out", out, "--broker-host", "localhost"};
        std::vector<char*> argv;
        for (auto& a : args) {
            argv.push_back(a.data());
        }
        // certs_main writes a summary to stdout, which Catch shows only for a failed test.
        if (tls::certs_main(static_cast<int>(argv.size()), argv.data()) != 0) {
            throw std::runtime_error("taser certs failed");
        }
    }
    ~cert_folder() {
        std::error_code ignored;
        std::filesystem::remove_all(path, ignored);
    }
    std::string file(const char* name) const { return (path / name).string(); }
};

std::shared_ptr<asio::ssl::context> server_context(const cert_folder& certs) {
    tls::server_options o;
    o.cert_file = certs.file("broker.pem");
    o.key_file = certs.file("broker-key.pem");
    o.client_ca_file = certs.file("ca.pem");
    o.client_must_be_client_auth = true;
    o.alpn = alpn;
    o.alpn_required = true;
    return tls::make_server_context(o);
}

std::shared_ptr<asio::ssl::context> client_context(const cert_folder& certs,
                                                   const cert_folder& trusted) {
    tls::client_options o;
    o.cert_file = certs.file("bridge.pem");
    o.key_file = certs.file("bridge-key.pem");
    o.ca_file = trusted.file("ca.pem");
    o.alpn = alpn;
    return tls::make_client_context(o);
}

std::pair<tcp::socket, tcp::socket> connected_sockets(asio::io_context& io) {
    tcp::acceptor acceptor(io, {asio::ip::make_address_v4("127.0.0.1"), 0});
    tcp::socket client(io);
    client.connect(acceptor.local_endpoint());
    tcp::socket server = acceptor.accept();
    return {std::move(client), std::move(server)};
}

// A server stream and a client stream on two connected sockets. The client presents its
// certificate from `certs` and trusts the CA of `trusted`.
struct stream_pair {
    asio::io_context io;
    std::shared_ptr<asio::ssl::context> server_ctx;
    std::shared_ptr<asio::ssl::context> client_ctx;
    std::unique_ptr<tls::tunnel_stream> server;
    std::unique_ptr<tls::tunnel_stream> client;

    stream_pair(const cert_folder& certs, const cert_folder& trusted)
        : server_ctx(server_context(certs)), client_ctx(client_context(certs, trusted)) {
        auto sockets = connected_sockets(io);
        server = std::make_unique<tls::tunnel_stream>(std::move(sockets.second), *server_ctx);
        client = std::make_unique<tls::tunnel_stream>(std::move(sockets.first), *client_ctx);
        tls::prepare_client_stream(client->native_handle(), "localhost");
    }
};

// Each co_await is a statement of its own: built with g++ 12, a co_await inside a Catch
// assertion macro started the awaited handshake a second time.

// Runs both tasks on io until they finish, and rethrows what either threw. Fails the test when
// they are still running after task_limit.
void run_both(asio::io_context& io, asio::awaitable<void> a, asio::awaitable<void> b) {
    int running = 2;
    std::exception_ptr error;
    auto done = [&](std::exception_ptr e) {
        --running;
        if (e && !error) {
            error = e;
        }
    };
    asio::co_spawn(io, std::move(a), done);
    asio::co_spawn(io, std::move(b), done);
    auto deadline = std::chrono::steady_clock::now() + task_limit;
    while (running > 0 && std::chrono::steady_clock::now() < deadline) {
        io.run_one_until(deadline);
    }
    if (error) {
        std::rethrow_exception(error);
    }
    INFO("the tasks did not finish within the limit");
    REQUIRE(running == 0);
}

byte_vector pattern(std::size_t n) {
    byte_vector out(n);
    for (std::size_t i = 0; i < n; ++i) {
        out[i] = static_cast<std::uint8_t>(i * 7 + i / 251);
    }
    return out;
}

// Reads until n bytes arrived or the stream fails; returns the bytes and the failure.
asio::awaitable<std::tuple<byte_vector, error_code>> read_n(tls::tunnel_stream& s, std::size_t n) {
    byte_vector got;
    byte_vector buffer(100 * 1024);
    while (got.size() < n) {
        auto [ec, k] = co_await s.read_some(asio::buffer(buffer));
        if (ec) {
            co_return std::tuple{got, ec};
        }
        got.insert(got.end(), buffer.begin(), buffer.begin() + static_cast<std::ptrdiff_t>(k));
    }
    co_return std::tuple{got, error_code{}};
}

}  // namespace

TEST_CASE("tunnel stream carries large writes both ways") {
    cert_folder certs;
    stream_pair streams(certs, certs);
    auto& io = streams.io;
    auto& server = *streams.server;
    auto& client = *streams.client;

    // Larger than one TLS record, one socket read and the socket buffers together.
    auto up = pattern(3 * 1024 * 1024 + 17);
    auto down = pattern(100);
    byte_vector received_up;
    byte_vector received_down;

    run_both(
        io,
        [&]() -> asio::awaitable<void> {
            auto handshake_ec = co_await server.handshake(side::server);
            REQUIRE_FALSE(handshake_ec);
            auto [got, ec] = co_await read_n(server, up.size());
            REQUIRE_FALSE(ec);
            received_up = std::move(got);
            auto [wec, n] = co_await server.write_all(asio::buffer(down));
            REQUIRE_FALSE(wec);
            REQUIRE(n == down.size());
        }(),
        [&]() -> asio::awaitable<void> {
            auto handshake_ec = co_await client.handshake(side::client);
            REQUIRE_FALSE(handshake_ec);
            // Two writes, so that the reader sees records of both in one socket read.
            auto half = up.size() / 2;
            auto [e1, n1] = co_await client.write_all(asio::buffer(up.data(), half));
            auto [e2, n2] =
                co_await client.write_all(asio::buffer(up.data() + half, up.size() - half));
            REQUIRE_FALSE(e1);
            REQUIRE_FALSE(e2);
            REQUIRE(n1 + n2 == up.size());
            auto [got, ec] = co_await read_n(client, down.size());
            REQUIRE_FALSE(ec);
            received_down = std::move(got);
        }());

    CHECK(received_up == up);
    CHECK(received_down == down);
    CHECK(tls::negotiated_alpn(server.native_handle()) == alpn);
    CHECK(SSL_get0_peer_certificate(server.native_handle()) != nullptr);
}

TEST_CASE("tunnel stream reports a truncated close") {
    cert_folder certs;
    stream_pair streams(certs, certs);
    auto& io = streams.io;
    auto& server = *streams.server;
    auto& client = *streams.client;
    auto sent = pattern(5000);

    run_both(
        io,
        [&]() -> asio::awaitable<void> {
            auto handshake_ec = co_await server.handshake(side::server);
            REQUIRE_FALSE(handshake_ec);
            // The data sent before the close arrives first, then the truncation.
            auto [got, ec] = co_await read_n(server, sent.size() + 1);
            CHECK(got == sent);
            CHECK(ec == asio::ssl::error::stream_truncated);
        }(),
        [&]() -> asio::awaitable<void> {
            auto handshake_ec = co_await client.handshake(side::client);
            REQUIRE_FALSE(handshake_ec);
            auto [ec, n] = co_await client.write_all(asio::buffer(sent));
            REQUIRE_FALSE(ec);
            client.close();
        }());
}

TEST_CASE("tunnel stream rejects an unknown CA") {
    cert_folder certs;
    cert_folder other;
    // The client trusts another CA, so it rejects the server's certificate.
    stream_pair streams(certs, other);
    auto& io = streams.io;
    auto& server = *streams.server;
    auto& client = *streams.client;

    run_both(
        io,
        [&]() -> asio::awaitable<void> {
            auto ec = co_await server.handshake(side::server);
            // The server learns of the failure from the client's alert.
            CHECK(ec.category() == asio::error::get_ssl_category());
        }(),
        [&]() -> asio::awaitable<void> {
            auto ec = co_await client.handshake(side::client);
            CHECK(ec.category() == asio::error::get_ssl_category());
            CHECK(SSL_get_verify_result(client.native_handle()) != X509_V_OK);
        }());
}

TEST_CASE("tunnel stream rejects bytes that are not TLS") {
    cert_folder certs;
    asio::io_context io;
    auto sockets = connected_sockets(io);
    auto& client_socket = sockets.first;
    auto server_ctx = server_context(certs);
    tls::tunnel_stream server(std::move(sockets.second), *server_ctx);

    run_both(
        io,
        [&]() -> asio::awaitable<void> {
            auto ec = co_await server.handshake(side::server);
            CHECK(ec.category() == asio::error::get_ssl_category());
        }(),
        [&]() -> asio::awaitable<void> {
            std::string_view text = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
            co_await asio::async_write(client_socket, asio::buffer(text), asio::use_awaitable);
        }());
}
