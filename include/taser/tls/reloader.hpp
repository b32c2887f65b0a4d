// SPDX-License-Identifier: Apache-2.0
// Rebuilds a TLS context when its certificate, key or CA files change, or on demand (SIGHUP).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/ssl/context.hpp>

namespace taser::tls {

// Holds the current context of one edge. Connections copy the shared_ptr when they start, so a
// reload changes what new connections get and leaves running ones untouched. Files are
// compared by inode, size and modification time, which also catches the symlink swap that
// Kubernetes secret volumes do.
class reloader {
public:
    using factory = std::function<std::shared_ptr<boost::asio::ssl::context>()>;

    // name is for logs ("bridge", "client"); build makes a context from the files and throws
    // load_error when they are invalid.
    reloader(std::string name, std::vector<std::string> files, factory build);

    const std::shared_ptr<boost::asio::ssl::context>& current() const noexcept { return current_; }

    // Rebuilds the context if force is set or a file changed. A failed rebuild is logged and the
    // last good context stays in use; the failure is retried on the next change.
    void check(bool force);

private:
    std::string fingerprint() const;

    std::string name_;
    std::vector<std::string> files_;
    factory build_;
    std::shared_ptr<boost::asio::ssl::context> current_;
    std::string seen_;
};

// Calls check(false) on every reloader each interval until the process ends.
boost::asio::awaitable<void> watch(std::vector<reloader*> reloaders,
                                   std::chrono::milliseconds interval);

}  // namespace taser::tls
