-- V2 REST infer with a JSON body. Usage: wrk -s bench/wrk/json.lua URL -- BODY_FILE
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
local report = dofile(here .. "report.lua")

function init(args)
   report.setup(args, "application/json", false)
end

done = report.done
