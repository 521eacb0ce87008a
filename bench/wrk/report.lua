-- Shared by the scenario scripts: load the request body from a file, and report as JSON.
--
-- A scenario script sets `content_type` (and for the binary extension `with_header_length`)
-- and then runs this file with dofile. wrk passes what follows `--` on its command line to
-- init(args): args[1] is the body file, args[2] the JSON header length (binary only).

local report = {}

function report.load_body(path)
   local file = assert(io.open(path, "rb"), "cannot open body file " .. tostring(path))
   local body = file:read("*a")
   file:close()
   return body
end

-- Sets wrk.method/body/headers; wrk.init builds the request once, after init() returns.
function report.setup(args, content_type, with_header_length)
   wrk.method = "POST"
   wrk.body = report.load_body(args[1])
   wrk.headers["Content-Type"] = content_type
   if with_header_length then
      assert(args[2], "binary scenario needs the JSON header length as second argument")
      wrk.headers["Inference-Header-Content-Length"] = args[2]
   end
end

-- One line, prefixed so run.py can find it among wrk's own text. Latencies are microseconds.
function report.done(summary, latency, requests)
   local e = summary.errors
   local p = {}
   for _, q in ipairs({50, 75, 90, 99, 99.9}) do
      p[#p + 1] = string.format('"%s":%d', tostring(q), latency:percentile(q))
   end
   io.write(string.format(
      'WRK_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f,"percentiles":{%s}}}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.max, latency.mean, latency.stdev, table.concat(p, ",")))
end

return report
