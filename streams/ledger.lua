-- Settle one micro-batch of decisions and purchases atomically; mirrors engine/ledger.py
-- (InMemoryLedger) and engine/labels.py (PendingLabels).
--
-- ARGV: prefix, now_ms, attribution_window_ms, n_ops, then per op either
--   'D', user, campaign, ts, decision_interval_ms, has_offer, cost_cents, cooldown_ms,
--        max_per_day (-1 = none), budget_cents (-1 = none), decision_id, record_json
--   'P', user, ts, offer_id ('' = none)
-- Returns { outcomes, labelled } where outcomes[i] is, for a decision: 0 rate-limited,
-- 1 offer granted, 2 decided without an offer, 3 denied by cooldown, 4 by max offers per day,
-- 5 by budget; for a purchase: -1. labelled is a flat list of (record_json, label, labeled_at).
--
-- Keys are built from the prefix (this script is for a single Redis node, like features.lua):
--   <p>g:{user}   hash  <campaign>|d last decision ts, <campaign>|o last offer ts,
--                       <campaign>|n<day> offers that day
--   <p>p:{user}   hash  decision_id -> 'G' or 'N' (offer denied) + pending decision JSON array
--                       [ts, campaign, offer_id, decision_id, user_id, discount, propensity,
--                        model_version, features in catalogue order] (PendingDecision.to_compact)
--   <p>pq         zset  decision_id \x1f user, scored by the attribution deadline
--   <p>b:<campaign>:<day>  discount spent that day, in cents

local prefix = ARGV[1]
local now = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local n_ops = tonumber(ARGV[4])
local DAY_MS = 86400000
local SEP = '\31'
local queue_key = prefix .. 'pq'

-- Campaign order must match Python's sorted() whatever the server's collation locale is.
local function bytewise_less(a, b)
  local n = math.min(#a, #b)
  for k = 1, n do
    local x, y = string.byte(a, k), string.byte(b, k)
    if x ~= y then return x < y end
  end
  return #a < #b
end

local function guard_key(user) return prefix .. 'g:{' .. user .. '}' end
local function pending_key(user) return prefix .. 'p:{' .. user .. '}' end

local outcomes = {}
local labelled = {}

local function label(user, decision_id, record, value, labeled_at)
  redis.call('HDEL', pending_key(user), decision_id)
  redis.call('ZREM', queue_key, decision_id .. SEP .. user)
  labelled[#labelled + 1] = record
  labelled[#labelled + 1] = value
  labelled[#labelled + 1] = labeled_at
end

local function decide(i)
  local user, campaign = ARGV[i], ARGV[i + 1]
  local ts, interval = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local has_offer, cost = ARGV[i + 4] == '1', tonumber(ARGV[i + 5])
  local cooldown, max_per_day = tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7])
  local budget, decision_id, record = tonumber(ARGV[i + 8]), ARGV[i + 9], ARGV[i + 10]
  local gkey = guard_key(user)

  local last = tonumber(redis.call('HGET', gkey, campaign .. '|d'))
  -- anything earlier than the last decision (a late event) counts as inside the interval
  if interval > 0 and last and ts - last < interval then
    return 0
  end
  if (not last) or ts > last then
    redis.call('HSET', gkey, campaign .. '|d', ts)
  end

  local outcome = 2
  if has_offer then
    local day = math.floor(ts / DAY_MS)
    local last_offer = tonumber(redis.call('HGET', gkey, campaign .. '|o'))
    local count_field = campaign .. '|n' .. day
    local budget_key = prefix .. 'b:' .. campaign .. ':' .. day
    local spent = tonumber(redis.call('GET', budget_key) or '0')
    if cooldown > 0 and last_offer and ts - last_offer < cooldown then
      outcome = 3
    elseif max_per_day >= 0 and tonumber(redis.call('HGET', gkey, count_field) or '0') >= max_per_day then
      outcome = 4
    elseif budget >= 0 and spent + cost > budget then
      outcome = 5
    else
      outcome = 1
      if (not last_offer) or ts > last_offer then
        redis.call('HSET', gkey, campaign .. '|o', ts)
      end
      redis.call('HINCRBY', gkey, count_field, 1)
      redis.call('INCRBY', budget_key, cost)
      redis.call('EXPIRE', budget_key, 3 * 86400)
    end
  end
  -- 'G': recorded as proposed; 'N': the proposed offer was denied, so the decision is
  -- recorded as no discount and no offer (the reader applies that; no JSON re-encoding here).
  record = ((outcome == 1 or not has_offer) and 'G' or 'N') .. record
  redis.call('EXPIRE', gkey, math.floor((math.max(interval, cooldown) + 3 * DAY_MS) / 1000))

  local pkey = pending_key(user)
  redis.call('HSET', pkey, decision_id, record)
  -- a wall-clock safety net only: labels follow event time, which may run slower (replays)
  redis.call('EXPIRE', pkey, math.floor((window + 7 * DAY_MS) / 1000))
  redis.call('ZADD', queue_key, ts + window, decision_id .. SEP .. user)
  return outcome
end

-- ts, campaign and offer_id of a stored record: a compact array (PendingDecision.to_compact)
-- or, written by an earlier version, an object.
local function decision_fields(record)
  local d = cjson.decode(string.sub(record, 2))
  if d[1] ~= nil then
    return tonumber(d[1]), d[2], d[3]
  end
  return tonumber(d['ts']), d['campaign'], d['offer_id']
end

local function purchase(user, ts, offer_id)
  local flat = redis.call('HGETALL', pending_key(user))
  -- per campaign: the decision that issued offer_id, else the latest in the window
  local by_offer, latest = {}, {}
  for k = 1, #flat, 2 do
    local decision_id, record = flat[k], flat[k + 1]
    local granted = string.sub(record, 1, 1) == 'G'
    local d_ts, c, d_offer = decision_fields(record)
    local age = ts - d_ts
    if age >= 0 and age <= window then
      local candidate = { id = decision_id, ts = d_ts, record = record }
      if granted and offer_id ~= '' and d_offer == offer_id then
        by_offer[c] = candidate
      end
      local best = latest[c]
      if (not best) or candidate.ts > best.ts or (candidate.ts == best.ts and candidate.id > best.id) then
        latest[c] = candidate
      end
    end
  end
  local campaigns = {}
  for c, _ in pairs(latest) do campaigns[#campaigns + 1] = c end
  table.sort(campaigns, bytewise_less)
  for _, c in ipairs(campaigns) do
    local chosen = by_offer[c] or latest[c]
    label(user, chosen.id, chosen.record, 1, ts)
  end
end

local i = 5
for n = 1, n_ops do
  local kind = ARGV[i]
  if kind == 'D' then
    outcomes[n] = decide(i + 1)
    i = i + 12
  else
    purchase(ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3])
    outcomes[n] = -1
    i = i + 4
  end
end

-- Windows that ended before now are labelled 0, in deadline order.
local due = redis.call('ZRANGEBYSCORE', queue_key, '-inf', '(' .. string.format('%d', now), 'WITHSCORES')
for k = 1, #due, 2 do
  local member, deadline = due[k], due[k + 1]
  local sep_at = string.find(member, SEP, 1, true)
  local decision_id, user = string.sub(member, 1, sep_at - 1), string.sub(member, sep_at + 1)
  local record = redis.call('HGET', pending_key(user), decision_id)
  if record then
    label(user, decision_id, record, 0, deadline)
  else
    redis.call('ZREM', queue_key, member)
  end
end

return { outcomes, labelled }
