-- Print wrk's totals and latency percentiles as one JSON line, which bench/taser_bench.py
-- parses. Latencies are in microseconds and the duration of the run is in seconds.

done = function(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      '{"requests": %d, "bytes": %d, "duration_s": %.6f, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"min": %d, "mean": %.2f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
      summary.requests, summary.bytes, summary.duration / 1e6,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max))
end
