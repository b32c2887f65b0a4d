// SPDX-License-Identifier: Apache-2.0
// Prometheus text exposition.
#include "taser/metrics/metrics.hpp"

#include <cstdio>

namespace taser::metrics {

void histogram::observe(std::chrono::steady_clock::duration d) noexcept {
    auto seconds = std::chrono::duration<double>(d).count();
    for (std::size_t i = 0; i < bounds.size(); ++i) {
        if (seconds <= bounds[i]) {
            ++buckets_[i];
        }
    }
    ++count_;
    sum_ += seconds;
}

void histogram::write(std::string& out, std::string_view name, std::string_view help) const {
    write_header(out, name, "histogram", help);
    std::string bucket = std::string(name) + "_bucket";
    for (std::size_t i = 0; i < bounds.size(); ++i) {
        char label[32];
        std::snprintf(label, sizeof label, "le=\"%g\"", bounds[i]);
        write_sample(out, bucket, label, buckets_[i]);
    }
    write_sample(out, bucket, "le=\"+Inf\"", count_);
    write_sample(out, std::string(name) + "_sum", "", sum_);
    write_sample(out, std::string(name) + "_count", "", count_);
}

void write_header(std::string& out, std::string_view name, std::string_view type,
                  std::string_view help) {
    out += "# HELP ";
    out += name;
    out += ' ';
    out += help;
    out += "\n# TYPE ";
    out += name;
    out += ' ';
    out += type;
    out += '\n';
}

void write_sample(std::string& out, std::string_view name, std::string_view labels, double value) {
    out += name;
    if (!labels.empty()) {
        out += '{';
        out += labels;
        out += '}';
    }
    char buf[40];
    std::snprintf(buf, sizeof buf, " %.9g\n", value);
    out += buf;
}

void write_sample(std::string& out, std::string_view name, std::string_view labels,
                  std::uint64_t value) {
    out += name;
    if (!labels.empty()) {
        out += '{';
        out += labels;
        out += '}';
    }
    out += ' ';
    out += std::to_string(value);
    out += '\n';
}

}  // namespace taser::metrics
