-- wrk script for the benchmark mixes (bench/workloads.py generates the table).
--   BENCH_REQUESTS  Lua file returning raw HTTP requests; sent in rotation
--   BENCH_STOP_AFTER stop after this many responses (one wrk thread only)
--   BENCH_OUT       where done() writes a JSON summary
local requests = dofile(os.getenv("BENCH_REQUESTS"))
local stop_after = tonumber(os.getenv("BENCH_STOP_AFTER") or "0")
local counter = 0
local responses = 0
statuses = {}  -- global: done() reads it through thread:get
local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

function init(args)
   -- Each connection starts at a different point of the mix.
   counter = (id or 0) * 7
end

function request()
   counter = counter + 1
   return requests[(counter % #requests) + 1]
end

function response(status, headers, body)
   responses = responses + 1
   statuses[status] = (statuses[status] or 0) + 1
   if stop_after > 0 and responses >= stop_after then
      wrk.thread:stop()
   end
end

function done(summary, latency, requests_)
   local counts = {}
   for _, thread in ipairs(threads) do
      local s = thread:get("statuses")
      for code, n in pairs(s) do counts[code] = (counts[code] or 0) + n end
   end
   local parts = {}
   for code, n in pairs(counts) do table.insert(parts, string.format('"%d": %d', code, n)) end
   local out = io.open(os.getenv("BENCH_OUT"), "w")
   out:write(string.format(
      '{"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "p999": %d, "max": %d, "mean": %.1f}, "statuses": {%s}}\n',
      summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
      summary.errors.status, summary.errors.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
      latency.max, latency.mean, table.concat(parts, ", ")))
   out:close()
end
