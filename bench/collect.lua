-- wrk script for bench/collect.py: POST /v1/batch as Segment's analytics-python sends it.
--
--   wrk -t2 -c16 -d60s --latency -s bench/collect.lua URL -- TEMPLATES CUSTOMERS BATCH ANONYMOUS AUTHORIZATION WRITE_KEY
--
-- TEMPLATES is a Lua file (written by bench/collect.py) returning {templates = {...}, deck = {...}}:
-- each template a list of literal strings and slot numbers (1 messageId, 2 userId, 3 timestamp,
-- 4 product id, 5 email, 6 anonymousId; the ids as JSON values, a quoted string or null); the deck lists template numbers in the proportions of the mix.
-- Each request is BATCH events: messageIds "w<thread>-<request>-<k>" (unique across threads and
-- connections), userIds "c1".."c<CUSTOMERS>" (seeded), except a share ANONYMOUS of new visitors.
-- Responses are counted by status; a 200's "accepted", "duplicates" and per-index errors are summed.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  local loaded = dofile(args[1])
  templates, deck = loaded.templates, loaded.deck
  customers, batch_size, anonymous = tonumber(args[2]), tonumber(args[3]), tonumber(args[4])
  headers = {["Authorization"] = args[5], ["Content-Type"] = "application/json",
             ["User-Agent"] = "analytics-python/2.4.0"}
  tail_key = '", "writeKey": "' .. args[6] .. '"}'
  math.randomseed(tid * 7919 + os.time())
  millis = {}  -- events of a batch happened over the second before sentAt, a few ms apart
  for k = 1, batch_size do millis[k] = string.format(".%03d+00:00", (k * 7) % 1000) end
  counter, ok, unavailable, other, socket_errors = 0, 0, 0, 0, 0
  accepted, duplicates, refused, sample = 0, 0, 0, ""
end

function request()
  counter = counter + 1
  local second = os.date("!%Y-%m-%dT%H:%M:%S")
  local prefix = "w" .. tid .. "-" .. counter .. "-"
  local out, n, slot = {'{"batch": ['}, 1, {}
  local start = (counter - 1) * batch_size
  for k = 1, batch_size do
    local template = templates[deck[(start + k - 1) % #deck + 1]]
    local user, visitor, email
    if math.random() < anonymous then
      local id = "v" .. tid .. "-" .. math.random(1, 1000000)
      user, visitor, email = "null", '"' .. id .. '"', id .. "@example.com"
    else
      local c = math.random(1, customers)
      user, visitor, email = '"c' .. c .. '"', "null", "kunde" .. c .. "@example.de"
    end
    slot[1], slot[2], slot[3] = prefix .. k, user, second .. millis[k]
    slot[4], slot[5], slot[6] = "p" .. math.random(1, 5000), email, visitor
    if k > 1 then
      n = n + 1
      out[n] = ", "
    end
    for i = 1, #template do
      local piece = template[i]
      n = n + 1
      if type(piece) == "number" then out[n] = slot[piece] else out[n] = piece end
    end
  end
  out[n + 1] = '], "sentAt": "' .. second .. '.999+00:00' .. tail_key
  return wrk.format("POST", "/v1/batch", headers, table.concat(out))
end

function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
    accepted = accepted + tonumber(body:match('"accepted": (%d+)') or 0)
    duplicates = duplicates + tonumber(body:match('"duplicates": (%d+)') or 0)
    local _, found = body:gsub('"index"', "")
    refused = refused + found
    if found > 0 and sample == "" then sample = body:sub(1, 300) end
  elseif status == 503 then
    unavailable = unavailable + 1
  else
    other = other + 1
    if sample == "" then sample = status .. " " .. body:sub(1, 300) end
  end
end

function done(summary, latency, requests)
  local totals = {ok = 0, unavailable = 0, other = 0, accepted = 0, duplicates = 0, refused = 0}
  local sample = ""
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do
      totals[name] = totals[name] + thread:get(name)
    end
    if sample == "" then sample = thread:get("sample") end
  end
  local e = summary.errors
  io.write(string.format("RESULT requests=%d ok=%d unavailable=%d other=%d socket_errors=%d accepted=%d "
    .. "duplicates=%d refused=%d seconds=%.3f p50_ms=%.2f p99_ms=%.2f max_ms=%.2f\n",
    summary.requests, totals.ok, totals.unavailable, totals.other, e.connect + e.read + e.write + e.timeout,
    totals.accepted, totals.duplicates, totals.refused, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
  if sample ~= "" then io.write("SAMPLE " .. sample:gsub("\n", " ") .. "\n") end
end
