-- submit-prompt to one of the sessions in SESSIONS (comma-separated), chosen per request
local sessions = {}
for s in string.gmatch(os.getenv("SESSIONS"), "[^,]+") do sessions[#sessions + 1] = s end
local token = os.getenv("TOKEN")
local i = 0
wrk.headers["Authorization"] = "Bearer " .. token
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  local s = sessions[(i % #sessions) + 1]
  return wrk.format("POST", "/sessions/" .. s .. "/prompts", nil, '{"text":"add a test for the login race please"}')
end
response = function(status, headers, body)
  if status >= 300 then errors_seen = (errors_seen or 0) + 1; if errors_seen < 3 then io.stderr:write(status .. " " .. body .. "\n") end end
end
