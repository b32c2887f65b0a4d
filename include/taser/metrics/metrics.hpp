// SPDX-License-Identifier: Apache-2.0
// Prometheus text exposition (version 0.0.4): counters, gauges and one histogram type.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

namespace taser::metrics {

// Request durations in seconds; the last bucket is +Inf.
class histogram {
public:
    static constexpr std::array<double, 11> bounds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                      0.05,   0.1,   0.5,    1.0,   10.0};

    void observe(std::chrono::steady_clock::duration d) noexcept;
    // Appends the _bucket, _sum and _count lines of the histogram called name.
    void write(std::string& out, std::string_view name, std::string_view help) const;

private:
    std::array<std::uint64_t, bounds.size()> buckets_{};
    std::uint64_t count_ = 0;
    double sum_ = 0;
};

// Appends "# HELP" and "# TYPE" lines.
void write_header(std::string& out, std::string_view name, std::string_view type,
                  std::string_view help);
// Appends one sample; labels is the text inside the braces, or empty.
void write_sample(std::string& out, std::string_view name, std::string_view labels, double value);
void write_sample(std::string& out, std::string_view name, std::string_view labels,
                  std::uint64_t value);

}  // namespace taser::metrics
