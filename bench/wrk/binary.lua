-- V2 REST infer with the binary tensor extension: a JSON header (with binary_data_size) followed by
-- raw tensor bytes, framed by the Inference-Header-Content-Length header.
-- Usage: wrk -s bench/wrk/binary.lua URL -- BODY_FILE JSON_HEADER_LENGTH
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
local report = dofile(here .. "report.lua")

function init(args)
   report.setup(args, "application/octet-stream", true)
end

done = report.done
