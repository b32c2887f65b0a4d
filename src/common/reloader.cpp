// SPDX-License-Identifier: Apache-2.0
// Reloading TLS contexts when their files change.
#include "taser/tls/reloader.hpp"

#include "taser/log/log.hpp"
#include "taser/net/event.hpp"
#include "taser/tls/context.hpp"

#include <sys/stat.h>

namespace taser::tls {

reloader::reloader(std::string name, std::vector<std::string> files, factory build)
    : name_(std::move(name)), files_(std::move(files)), build_(std::move(build)) {
    std::erase_if(files_, [](const std::string& f) { return f.empty(); });
    seen_ = fingerprint();
    current_ = build_();  // at startup a bad file is fatal: the caller reports it and exits
}

std::string reloader::fingerprint() const {
    std::string out;
    for (const auto& f : files_) {
        struct stat st {};
        if (::stat(f.c_str(), &st) != 0) {
            out += f + ":missing;";
            continue;
        }
        out += f + ":" + std::to_string(st.st_ino) + ":" + std::to_string(st.st_size) + ":" +
               std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec) + ";";
    }
    return out;
}

void reloader::check(bool force) {
    auto now = fingerprint();
    if (!force && now == seen_) {
        return;
    }
    seen_ = now;
    try {
        current_ = build_();
        log::info("certificates_reloaded", {{"edge", name_}, {"forced", force}});
    } catch (const load_error& e) {
        log::error("certificate_reload_failed",
                   {{"edge", name_}, {"error", e.what()}, {"action", "kept the previous files"}});
    }
}

boost::asio::awaitable<void> watch(std::vector<reloader*> reloaders,
                                   std::chrono::milliseconds interval) {
    for (;;) {
        co_await net::sleep(interval);
        for (auto* r : reloaders) {
            r->check(false);
        }
    }
}

}  // namespace taser::tls
