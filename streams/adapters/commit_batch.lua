-- One micro-batch's whole Redis effect, atomically: the feature records and partition
-- watermarks (the records are computed in Python: engine/features/store.py), the decision
-- ledger (mirrors engine/ledger.py's InMemoryLedger, engine/labels.py's PendingLabels and
-- engine/stop_loss.py), and the outbox entry that keeps the batch's outputs until Kafka has
-- them (streams/adapters/outbox.py). Each of the three sections may be left out ('' where it
-- starts): the feature store alone (`RedisFeatureStore` without a ledger), the ledger alone
-- (`RedisLedger` without a store), or all three (the worker).
--
-- KEYS[1]   hash of partition owners: field "<source>:<partition>" -> owner token
-- KEYS[2]   hash of partition watermarks: field "<source>:<partition>" -> offset
-- KEYS[3]   the state epoch (a counter `dealstream forget` increments)
-- KEYS[4..] the user keys (<p>u:{user}) of the users whose feature records the batch writes
-- ARGV[1]   prefix of the ledger's and the outbox's keys
-- features: token ('' = no features section), epoch, ttl_ms, the record's field in a user's
--           hash, refresh (one byte per user key: '1' = set the key's time to live, '0' = it
--           was set recently enough), n_partitions, n_partitions x (field, offset), then one
--           record per user key (KEYS[4..] order)
-- ledger:   now_ms ('' = no ledger section; the stop-loss's clock), attribution_window_ms,
--           elapsed_ms (0 = none), purchase_memory_ms, n_lanes, then per lane whose labels may
--           expire: lane, its event-time clock (engine/labels.py: a lane is a partition number);
--           n_campaigns, then per stop-loss campaign: name, margin, window_ms, min_decisions,
--           min_users; then the batch's ops packed in two arguments (two bulk strings instead
--           of one per field: packing and unpacking many small arguments cost more client
--           and server CPU than the ledger's own work):
--   ops      one flat JSON array, per op either
--            'D', user, campaign, ts, decision_interval_ms, has_offer (0/1), cost_cents,
--                 cooldown_ms, max_per_day (-1 = none), budget_cents (-1 = none), decision_id,
--                 arm ('' T H), day of the budget and offers-per-day cap (-1 = the event-time
--                 day of ts), length of its record in bytes ('G' included), lane
--            'P', user, ts, amount_cents, gross_cents
--   records  each decision's record as stored when it is recorded as proposed ('G' and
--            PendingDecision.to_compact as JSON), concatenated in op order: raw bytes rather
--            than escaped JSON, cut out only for decisions that are recorded
-- outbox:   entry id ('' = no outbox section), coverage (JSON, stored as is), drafts (bytes,
--           stored as is), n_acked, then n_acked ids of entries to delete (their batches are
--           committed in Kafka)
--
-- Everything is checked before anything is written: the state epoch and the partitions'
-- owners (refusals, below), then every ledger op (a malformed batch is refused with an error
-- reply, 'ledger: ' and what is wrong, and changes nothing).
-- Returns {'stale', epoch} (the epoch moved: the store drops every record it holds and the
-- batch runs again), {'fenced', field, owner} (another writer claimed the partition: stop
-- writing), or {'ok', outcomes, events, stop_loss, epoch} where outcomes[i] is, for a
-- decision: 0 rate-limited, 1 offer granted, 2 decided without an offer, 3 denied by cooldown,
-- 4 by max offers per day, 5 by budget; for a purchase: -1. events is a flat list of (kind,
-- decision_id, user, record, converted_at or '', at) with kind 'C' converted, 'E' elapsed,
-- 'X' closed.
-- stop_loss is a flat list of (name, stopped 0/1, since or '', decisions, incremental margin,
-- upper, lower ('' when unknown)). epoch is the state epoch <p>se ('' when unset):
-- `dealstream forget` bumps it, and a ledger that sees it change forgets the decision times it
-- remembers (redis_ledger.py).
--
-- Keys built from the prefix (this script touches many users' keys per call: on a Redis
-- Cluster the prefix carries the one hash tag of them all, docs/cluster.md):
-- (`user` is what the caller passes: the user's pseudonym, streams/adapters/pseudonyms.py)
--   <p>u:{user}   hash  everything of one user, so that a decision reads and writes one key of its user:
--                       the feature record (field as given, '|s1'); the guards:
--                       <campaign>|d last decision ts, <campaign>|o last offer ts,
--                       <campaign>|n<day> offers that day,
--                       <campaign>|s<epoch><arm> the user's stop-loss sums "decisions cents";
--                       the pending decisions: decision_id -> its stage ('e' waits for its
--                       elapsed event, 'x' for its window's end: a decision waits for one
--                       label event at a time, the elapsed one first when elapsed_ms is not 0),
--                       its lane (decimal digits), then the record as the label events return
--                       it: 'G' or 'N' (offer denied) + pending decision JSON array
--                       (PendingDecision.compact_json: ts, campaign and arm first, neither the
--                       decision id nor the user), so the label event a record waits for and
--                       when it is due follow from the record itself; decision_id|c -> first
--                       conversion ts (a decision id never holds '|', so these are the only
--                       fields without one, and the only ones ending in '|c' with one);
--                       '|p' -> the user's purchases within purchase_memory_ms of the latest,
--                       by time: 'ts amount_cents gross_cents' joined by ';'.
--                       Its time to live is a wall-clock safety net (labels and windows follow
--                       event time): set when the caller asks ('refresh') to
--                       max(ttl_ms, max(window, purchase memory) + 7 days), and by a decision
--                       whose guards need longer or whose user has no record in the call
--   <p>lq:<lane>  zset  the users with decisions of the lane waiting for a label event, scored
--                       by the earliest time one of theirs is due (at most: a score may be
--                       early, never late): one member per user, not per decision; a user
--                       popped from it is read whole (HGETALL) and indexed again by the
--                       earliest due time of its records of the lane
--   <p>pn         hash  lane -> its decisions waiting for a label event (pending_count)
--   <p>b:<campaign>:<day>  discount spent that day, in cents
--   <p>se         string  the state epoch (read only; written by `dealstream forget`)
--   <p>sl:<campaign>      hash  <epoch>|<arm>|<sum> stop-loss sums (n y yy yn nn u), and
--                       state, since, decisions, diff, upper, lower (the last evaluation)
--   <p>ob         hash  entry id -> the call's outcomes and label events (JSON) and, after a
--                       newline, the drafts as given
--   <p>obc        hash  entry id -> its coverage as given

local prefix = ARGV[1]
local at = 2
local function arg()
  local value = ARGV[at]
  at = at + 1
  return value
end

-- features section
local token = arg()
local features = token ~= nil and token ~= ''
local state_epoch, ttl, record_field, refresh, partitions, first_record
if features then
  state_epoch, ttl, record_field, refresh = arg(), tonumber(arg()), arg(), arg()
  partitions = {}
  for k = 1, tonumber(arg()) do
    partitions[k] = { field = arg(), offset = arg() }
  end
  first_record = at
  at = at + #KEYS - 3
end

-- ledger section
local now_arg = arg()
local settling = now_arg ~= nil and now_arg ~= ''
local now, window, elapsed, memory = 0, 0, 0, 0
local lane_clocks = {}
local stop_loss = {}
local stop_loss_order = {}
local packed_ops, records = '[]', ''
if settling then
  now, window, elapsed = tonumber(now_arg), tonumber(arg()), tonumber(arg())
  memory = tonumber(arg())
  for k = 1, tonumber(arg()) do
    lane_clocks[k] = { lane = tonumber(arg()), now = tonumber(arg()) }
  end
  for n = 1, tonumber(arg()) do
    local name = arg()
    stop_loss[name] = {
      margin = tonumber(arg()),
      epoch_ms = math.max(math.floor(tonumber(arg()) / 2), 1),
      min_decisions = tonumber(arg()),
      min_users = tonumber(arg()),
    }
    stop_loss_order[n] = name
  end
  packed_ops, records = arg(), arg()
end

-- outbox section
local entry_id = arg()
local boxing = entry_id ~= nil and entry_id ~= ''
local coverage, drafts, acked = '', '', {}
if boxing then
  coverage, drafts = arg(), arg()
  for k = 1, tonumber(arg()) do
    acked[k] = arg()
  end
end

local DAY_MS = 86400000
local Z95 = 1.959964
local PURCHASES = '|p'

-- Refusals first: nothing is written unless this writer still owns every partition of the
-- batch and nobody rewrote feature state behind its back.
local current_epoch = redis.call('GET', KEYS[3])
if features then
  if (current_epoch or '0') ~= state_epoch then
    return {'stale', current_epoch or '0'}
  end
  for _, partition in ipairs(partitions) do
    local owner = redis.call('HGET', KEYS[1], partition.field)
    if owner ~= token then
      return {'fenced', partition.field, owner or ''}
    end
  end
  if type(refresh) ~= 'string' or #refresh ~= #KEYS - 3 then
    return redis.error_reply('features: expected one refresh byte per user key; nothing was '
      .. 'written')
  end
end


-- Order must match Python's str comparison whatever the server's collation locale is.
local function bytewise_less(a, b)
  local n = math.min(#a, #b)
  for k = 1, n do
    local x, y = string.byte(a, k), string.byte(b, k)
    if x ~= y then return x < y end
  end
  return #a < #b
end

local function user_key(user) return prefix .. 'u:{' .. user .. '}' end
local function sl_key(campaign) return prefix .. 'sl:' .. campaign end
local function int(x) return string.format('%d', x) end

-- Unpack and check every op before anything is written: a script that fails halfway keeps
-- its writes (budget spent, nothing returned), so a malformed batch must fail here, whole.
local D_FIELDS, P_FIELDS = 15, 5
local ARMS = { [''] = true, T = true, H = true }
if type(packed_ops) ~= 'string' or type(records) ~= 'string' then
  return redis.error_reply('ledger: expected the packed ops and records after the stop-loss '
    .. 'settings; nothing was written')
end
local decoded, ops = pcall(cjson.decode, packed_ops)
if not decoded or type(ops) ~= 'table' then
  return redis.error_reply('ledger: the packed ops are not a JSON array; nothing was written')
end
local n_fields = #ops

-- What is wrong with the batch, or nil; the op at fault is `checking`. Kept to the Lua VM's
-- own operations (this runs for every op): `x - x % 1 == x` holds for an integer only (not
-- for a numeric string, a fraction, NaN or infinity) and raises for nil, a table or a
-- boolean, which pcall turns into 'a field of the wrong type'.
local checking = 0
local function check_ops()
  local j, offset, size = 1, 1, #records
  if size > 0 and string.sub(records, 1, 2) ~= 'G[' then
    return "the records must start with 'G['"
  end
  while j <= n_fields do
    checking = checking + 1
    local kind = ops[j]
    if kind == 'D' then
      if j + D_FIELDS - 1 > n_fields then return 'a decision needs ' .. D_FIELDS .. ' fields' end
      if type(ops[j + 1]) ~= 'string' or type(ops[j + 2]) ~= 'string'
          or type(ops[j + 10]) ~= 'string' then
        return 'user, campaign and decision_id must be strings'
      end
      if ops[j + 10] == '' or string.find(ops[j + 10], '|', 1, true) then
        return 'decision_id must not be empty or hold a "|"'
      end
      local ts, interval, has_offer, cost = ops[j + 3], ops[j + 4], ops[j + 5], ops[j + 6]
      local cooldown, max_per_day, budget = ops[j + 7], ops[j + 8], ops[j + 9]
      local day, length, lane = ops[j + 12], ops[j + 13], ops[j + 14]
      if ts - ts % 1 ~= ts or interval - interval % 1 ~= interval or cost - cost % 1 ~= cost
          or cooldown - cooldown % 1 ~= cooldown or max_per_day - max_per_day % 1 ~= max_per_day
          or budget - budget % 1 ~= budget or day - day % 1 ~= day
          or length - length % 1 ~= length or lane - lane % 1 ~= lane then
        return 'ts, decision_interval_ms, cost_cents, cooldown_ms, max_per_day, budget_cents, '
          .. 'day, the record length and the lane must be integers'
      end
      if lane < 0 then return 'lane must be >= 0' end
      if has_offer ~= 0 and has_offer ~= 1 then return 'has_offer must be 0 or 1' end
      if not ARMS[ops[j + 11]] then return 'arm must be "", "T" or "H"' end
      -- each record is 'G' and a JSON array: the lengths must line up with the brackets, so
      -- a record ends with ']' right before the next one's 'G' (or the end)
      local last = offset + length - 1
      local close, next_g = string.byte(records, last, last + 1)
      if length < 3 or last > size or close ~= 93 or (last < size and next_g ~= 71) then
        return "its record is not 'G' and a JSON array of the given length"
      end
      offset = last + 1
      j = j + D_FIELDS
    elseif kind == 'P' then
      if j + P_FIELDS - 1 > n_fields then return 'a purchase needs ' .. P_FIELDS .. ' fields' end
      if type(ops[j + 1]) ~= 'string' then return 'user must be a string' end
      local ts, amount, gross = ops[j + 2], ops[j + 3], ops[j + 4]
      if ts - ts % 1 ~= ts or amount - amount % 1 ~= amount or gross - gross % 1 ~= gross then
        return 'ts, amount_cents and gross_cents must be integers'
      end
      j = j + P_FIELDS
    else
      return 'kind must be "D" or "P"'
    end
  end
  checking = 0
  if offset ~= size + 1 then
    return 'the records are ' .. size .. ' bytes, the ops account for ' .. (offset - 1)
  end
  return nil
end
local checked, problem = pcall(check_ops)
if not checked then problem = 'a field of the wrong type' end
if problem then
  local where = checking > 0 and ('op ' .. checking .. ': ') or ''
  return redis.error_reply('ledger: ' .. where .. problem .. '; nothing was written')
end

-- The time to live a user key is given (the layout above), and the user keys whose feature
-- record this call writes (so their time to live is looked after).
local key_ttl = math.max(ttl or 0, settling and (math.max(window, memory) + 7 * DAY_MS) or 0)
local in_call = {}  -- user key -> its record until written, then true
local guard_ttls = {}  -- user key in the features section -> a longer time to live its guards need

-- A user key's time to live made at least `want` (never shortened).
local function extend_ttl(key, want)
  local left = redis.call('PTTL', key)
  if left == -1 or left < want then redis.call('PEXPIRE', key, want) end
end

-- Every check passed: the writes. First the outbox entries whose batches Kafka committed,
-- then the watermarks, then the ledger (a decision writes its user's feature record with its
-- own fields), then the other feature records and the keys' times to live, then the labels
-- and stop-loss, then this batch's entry.
for _, id in ipairs(acked) do
  redis.call('HDEL', prefix .. 'ob', id)
  redis.call('HDEL', prefix .. 'obc', id)
end
if features then
  for _, partition in ipairs(partitions) do
    redis.call('HSET', KEYS[2], partition.field, partition.offset)
  end
  -- The records are written after the ledger's ops: a user's decision writes its record in
  -- its own HSET (no op reads the record field).
  for k = 4, #KEYS do
    in_call[KEYS[k]] = ARGV[first_record + k - 4]
  end
end

local outcomes = {}
local events = {}
-- The budgets this call reads or spends: each is read at most once and incremented once,
-- after the ops (the script runs alone, so what it read stays true while it runs).
local budgets = {}
local function budget_of(key)
  local budget = budgets[key]
  if not budget then
    budget = { added = 0, spent = false }
    budgets[key] = budget
  end
  return budget
end
local function budget_spent(key)
  local budget = budget_of(key)
  if not budget.read then
    budget.read = tonumber(redis.call('GET', key) or '0')
  end
  return budget.read + budget.added
end
local function spend(key, cost)
  local budget = budget_of(key)
  budget.added = budget.added + cost
  budget.spent = true
end
local queued = {}  -- per lane: due time and user of each recorded decision, indexed after the ops
local queued_lanes = {}  -- the lanes of `queued`, in first-seen order
local pending_added = {}  -- per lane: decisions recorded under a new id (the count `pn`)

local function emit(kind, decision_id, user, record, converted_at, at)
  events[#events + 1] = kind
  events[#events + 1] = decision_id
  events[#events + 1] = user
  events[#events + 1] = record
  events[#events + 1] = converted_at or ''
  events[#events + 1] = at
end

-- Stop-loss sums: the user's (decisions, cents) in the epoch and arm, then the campaign's sums.
local function user_sums(user, campaign, epoch, arm)
  local raw = redis.call('HGET', user_key(user), campaign .. '|s' .. epoch .. arm)
  if not raw then return 0, 0 end
  local n, y = string.match(raw, '^(%-?%d+) (%-?%d+)$')
  return tonumber(n), tonumber(y)
end

local function set_user_sums(user, campaign, epoch, arm, n, y)
  local gkey = user_key(user)
  redis.call('HSET', gkey, campaign .. '|s' .. epoch .. arm, int(n) .. ' ' .. int(y))
  redis.call('HDEL', gkey, campaign .. '|s' .. (epoch - 3) .. 'T', campaign .. '|s' .. (epoch - 3) .. 'H')
end

local function add_sums(campaign, epoch, arm, deltas)
  local key = sl_key(campaign)
  local field = epoch .. '|' .. arm .. '|'
  for name, delta in pairs(deltas) do
    if delta ~= 0 then
      redis.call('HINCRBY', key, field .. name, int(delta))
    end
  end
end

local function record_decision(user, campaign, ts, arm)
  local config = stop_loss[campaign]
  if not config or arm == '' then return end
  local epoch = math.floor(ts / config.epoch_ms)
  local n, y = user_sums(user, campaign, epoch, arm)
  add_sums(campaign, epoch, arm, { n = 1, nn = 2 * n + 1, yn = y, u = (n == 0) and 1 or 0 })
  set_user_sums(user, campaign, epoch, arm, n + 1, y)
end

local function record_outcome(user, campaign, decision_ts, arm, amount, gross)
  local config = stop_loss[campaign]
  local epoch = math.floor(decision_ts / config.epoch_ms)
  local cents = math.floor(amount - (1.0 - config.margin) * gross + 0.5)
  local n, y = user_sums(user, campaign, epoch, arm)
  add_sums(campaign, epoch, arm, { y = cents, yy = 2 * y * cents + cents * cents, yn = cents * n })
  set_user_sums(user, campaign, epoch, arm, n, y + cents)
end

-- A user's remembered purchases ('|p' of the pending hash) as a list sorted by ts.
local function parse_purchases(raw)
  local list = {}
  if raw then
    for ts, amount, gross in string.gmatch(raw, '(%-?%d+) (%-?%d+) (%-?%d+)') do
      list[#list + 1] = { ts = tonumber(ts), amount = tonumber(amount), gross = tonumber(gross) }
    end
  end
  return list
end

-- The first remembered purchase at or after ts (nil when none).
local function first_purchase_from(raw, ts)
  for _, bought in ipairs(parse_purchases(raw)) do
    if bought.ts >= ts then return bought end
  end
  return nil
end

-- Remember a purchase (after those of the same time), forgetting those older than the
-- newest minus purchase_memory_ms, like PendingLabels._remember.
local function remember_purchase(ukey, raw, ts, amount, gross)
  local list = parse_purchases(raw)
  local at = #list + 1
  while at > 1 and list[at - 1].ts > ts do at = at - 1 end
  table.insert(list, at, { ts = ts, amount = amount, gross = gross })
  local horizon = list[#list].ts - memory
  local kept = {}
  for _, bought in ipairs(list) do
    if bought.ts >= horizon then
      kept[#kept + 1] = int(bought.ts) .. ' ' .. int(bought.amount) .. ' ' .. int(bought.gross)
    end
  end
  redis.call('HSET', ukey, PURCHASES, table.concat(kept, ';'))
  -- a wall-clock safety net of memory + a day (a user key in the features section has one
  -- longer than that)
  if not in_call[ukey] then extend_ttl(ukey, memory + DAY_MS) end
end

-- ops[j] is the decision's 'D'; its record starts at records[offset]. One HMGET reads what
-- the decision needs of the user's key and one HSET writes what it changes (every
-- redis.call costs more than its command's own work).
local function decide(j, offset)
  local user, campaign, ts, interval = ops[j + 1], ops[j + 2], ops[j + 3], ops[j + 4]
  local has_offer, cost, cooldown = ops[j + 5] == 1, ops[j + 6], ops[j + 7]
  local max_per_day, budget, decision_id, arm = ops[j + 8], ops[j + 9], ops[j + 10], ops[j + 11]
  local lane = ops[j + 14]
  local ukey = user_key(user)
  local decided_field = campaign .. '|d'
  local day, count_field, stored, remembered
  if has_offer then
    day = ops[j + 12]
    if day < 0 then day = math.floor(ts / DAY_MS) end
    count_field = campaign .. '|n' .. day
    stored = redis.call('HMGET', ukey, decided_field, PURCHASES, decision_id, campaign .. '|o',
      count_field)
  else
    stored = redis.call('HMGET', ukey, decided_field, PURCHASES, decision_id)
  end
  remembered = stored[2]

  local last = tonumber(stored[1])
  -- anything earlier than the last decision (a late event) counts as inside the interval
  if interval > 0 and last and ts - last < interval then
    return 0
  end
  local writes = {}
  if (not last) or ts > last then
    writes[1], writes[2] = decided_field, ts
  end

  local outcome = 2
  if has_offer then
    local last_offer, offers_today = tonumber(stored[4]), tonumber(stored[5] or '0')
    local budget_key = prefix .. 'b:' .. campaign .. ':' .. day
    if cooldown > 0 and last_offer and ts - last_offer < cooldown then
      outcome = 3
    elseif max_per_day >= 0 and offers_today >= max_per_day then
      outcome = 4
    elseif budget >= 0 and budget_spent(budget_key) + cost > budget then
      outcome = 5
    else
      outcome = 1
      if (not last_offer) or ts > last_offer then
        writes[#writes + 1], writes[#writes + 2] = campaign .. '|o', ts
      end
      writes[#writes + 1], writes[#writes + 2] = count_field, int(offers_today + 1)
      spend(budget_key, cost)
    end
  end
  record_decision(user, campaign, ts, arm)
  -- 'G': recorded as proposed (as it came); 'N': the proposed offer was denied, so the
  -- decision is recorded as no discount and no offer (the reader applies that; no JSON
  -- re-encoding here). Cut from the records only now: a rate-limited decision needs none.
  local last_byte = offset + ops[j + 13] - 1
  local record
  if outcome == 1 or not has_offer then
    record = string.sub(records, offset, last_byte)
  else
    record = 'N' .. string.sub(records, offset + 1, last_byte)
  end
  -- its label events: the elapsed one first when there is a wait, else the closing one
  local stage, at = 'x', ts + window
  if elapsed > 0 then stage, at = 'e', ts + elapsed end
  writes[#writes + 1], writes[#writes + 2] = decision_id, stage .. int(lane) .. record
  -- a purchase remembered from before, in the window: the first converts the decision now
  local bought = first_purchase_from(remembered, ts)
  if bought and bought.ts - ts <= window then
    writes[#writes + 1], writes[#writes + 2] = decision_id .. '|c', bought.ts
    if stop_loss[campaign] and arm ~= '' then
      record_outcome(user, campaign, ts, arm, bought.amount, bought.gross)
    end
    emit('C', decision_id, user, record, bought.ts, bought.ts)
  end
  local unwritten = in_call[ukey]
  if unwritten and unwritten ~= true then
    writes[#writes + 1], writes[#writes + 2] = record_field, unwritten
    in_call[ukey] = true
  end
  redis.call('HSET', ukey, unpack(writes))
  -- The key's time to live: the guards need max(interval, cooldown, window) + 3 days, the
  -- pending decision key_ttl; a key in the features section already has key_ttl.
  local guard_ttl = math.max(interval, cooldown, window) + 3 * DAY_MS
  if not in_call[ukey] then
    extend_ttl(ukey, math.max(guard_ttl, key_ttl))
  elseif guard_ttl > key_ttl and guard_ttl > (guard_ttls[ukey] or 0) then
    guard_ttls[ukey] = guard_ttl  -- set with the record's, after the ops
  end
  local lane_queue = queued[lane]
  if not lane_queue then
    lane_queue = {}
    queued[lane] = lane_queue
    queued_lanes[#queued_lanes + 1] = lane
  end
  lane_queue[#lane_queue + 1] = at
  lane_queue[#lane_queue + 1] = user
  if not stored[3] then  -- recorded again under the same id: still one pending decision
    pending_added[lane] = (pending_added[lane] or 0) + 1
  end
  return outcome
end

-- A pending decision as stored (the layout above): its stage byte ('e' or 'x'), its lane, and
-- where its record ('G' or 'N' and the JSON array) starts.
local function stored_parts(value)
  local start = string.find(value, '[GN]', 2)
  return string.byte(value), tonumber(string.sub(value, 2, start - 1)), start
end

-- ts, campaign and arm of a pending decision's record (from `start`, its 'G' or 'N').
local function decision_fields(value, start)
  local d = cjson.decode(string.sub(value, start + 1))
  return tonumber(d[1]), d[2], d[3]
end

local function purchase(user, ts, amount, gross)
  local ukey = user_key(user)
  local flat = redis.call('HGETALL', ukey)
  local stored, converted, remembered = {}, {}, nil
  for k = 1, #flat, 2 do
    local field = flat[k]
    local bar = string.find(field, '|', 1, true)
    if not bar then
      stored[#stored + 1] = { id = field, value = flat[k + 1] }
    elseif field == PURCHASES then
      remembered = flat[k + 1]
    elseif bar > 1 and bar == #field - 1 and string.byte(field, -1) == 99 then  -- '<id>|c'
      converted[string.sub(field, 1, -3)] = true
    end
  end
  remember_purchase(ukey, remembered, ts, amount, gross)
  -- every open decision whose window holds the purchase converts (first purchase only), in
  -- (ts, decision_id) order, like PendingLabels.on_purchase
  local hits = {}
  for _, entry in ipairs(stored) do
    local _, _, start = stored_parts(entry.value)
    local d_ts, campaign, arm = decision_fields(entry.value, start)
    local age = ts - d_ts
    if age >= 0 and age <= window then
      entry.ts = d_ts
      entry.record = string.sub(entry.value, start)
      hits[#hits + 1] = entry
      if stop_loss[campaign] and arm ~= '' and not converted[entry.id] then
        record_outcome(user, campaign, d_ts, arm, amount, gross)
      end
    end
  end
  table.sort(hits, function(a, b)
    if a.ts ~= b.ts then return a.ts < b.ts end
    return bytewise_less(a.id, b.id)
  end)
  local conversions = {}
  for _, entry in ipairs(hits) do
    if not converted[entry.id] then
      conversions[#conversions + 1] = entry.id .. '|c'
      conversions[#conversions + 1] = ts
      emit('C', entry.id, user, entry.record, ts, ts)
    end
  end
  if #conversions > 0 then redis.call('HSET', ukey, unpack(conversions)) end
end

local offset = 1
local n = 1
local j = 1
while j <= n_fields do
  if ops[j] == 'D' then
    outcomes[n] = decide(j, offset)
    offset = offset + ops[j + 13]
    j = j + D_FIELDS
  else
    purchase(ops[j + 1], ops[j + 2], ops[j + 3], ops[j + 4])
    outcomes[n] = -1
    j = j + P_FIELDS
  end
  n = n + 1
end
if features then
  for k = 4, #KEYS do
    local key = KEYS[k]
    local unwritten = in_call[key]
    if unwritten ~= true then
      redis.call('HSET', key, record_field, unwritten)
      in_call[key] = true
    end
    local guard_ttl = guard_ttls[key]
    if string.byte(refresh, k - 3) == 49 then  -- '1'
      redis.call('PEXPIRE', key, math.max(key_ttl, guard_ttl or 0))
    elseif guard_ttl then
      extend_ttl(key, guard_ttl)
    end
  end
end
for key, budget in pairs(budgets) do
  if budget.spent then
    redis.call('INCRBY', key, budget.added)
    redis.call('EXPIRE', key, 3 * 86400)
  end
end

local statuses = {}
if settling then
  -- One ZADD per lane for up to 500 decisions; LT keeps each user's earliest due time.
  for _, lane in ipairs(queued_lanes) do
    local suffix = int(lane)
    local lane_queue = queued[lane]
    if pending_added[lane] then
      redis.call('HINCRBY', prefix .. 'pn', suffix, int(pending_added[lane]))
    end
    for first = 1, #lane_queue, 1000 do
      local args = { 'LT' }
      for k = first, math.min(first + 999, #lane_queue), 2 do
        args[#args + 1] = lane_queue[k]
        args[#args + 1] = lane_queue[k + 1]
      end
      redis.call('ZADD', prefix .. 'lq:' .. suffix, unpack(args))
    end
  end

  -- Label events due before their lane's clock, in event-time order across the lanes (elapsed
  -- before closed on a tie, like PendingLabels: (time, 0 elapsed / 1 closed, decision_id, user)).
  -- Each user whose earliest due time has passed leaves the lane's index and is read whole: of
  -- its pending decisions of the lane, those due are collected (an elapsed one moves on to
  -- its closing stage, or closes too when its window has ended), the others stay, and the user
  -- is indexed again by the earliest time one of them is due.
  local due = {}
  for _, clock in ipairs(lane_clocks) do
    local suffix = int(clock.lane)
    local index = prefix .. 'lq:' .. suffix
    local before = '(' .. int(clock.now)
    local users = redis.call('ZRANGEBYSCORE', index, '-inf', before)
    if #users > 0 then
      redis.call('ZREMRANGEBYSCORE', index, '-inf', before)
      local again, dropped = {}, 0
      for _, user in ipairs(users) do
        local ukey = user_key(user)
        local flat = redis.call('HGETALL', ukey)
        local converted, mine = {}, {}
        for k = 1, #flat, 2 do
          local field = flat[k]
          local bar = string.find(field, '|', 1, true)
          if not bar then
            local stage, lane, start = stored_parts(flat[k + 1])
            if lane == clock.lane then
              mine[#mine + 1] = { id = field, value = flat[k + 1], stage = stage, start = start }
            end
          elseif bar > 1 and bar == #field - 1 and string.byte(field, -1) == 99 then  -- '<id>|c'
            converted[string.sub(field, 1, -3)] = flat[k + 1]
          end
        end
        local earliest, rewrites = nil, {}
        for _, entry in ipairs(mine) do
          local value, id = entry.value, entry.id
          local ts = tonumber(string.match(value, '^%[(%-?%d+)', entry.start + 1))
          local closes_at = ts + window
          local at = entry.stage == 101 and ts + elapsed or closes_at  -- 'e'
          if at >= clock.now then
            if not earliest or at < earliest then earliest = at end
          else
            local record = string.sub(value, entry.start)
            if entry.stage == 101 then
              due[#due + 1] = {
                at = at, closing = 0, id = id, user = user,
                record = record, converted_at = converted[id],
              }
            end
            if entry.stage ~= 101 or closes_at < clock.now then
              due[#due + 1] = {
                at = closes_at, closing = 1, id = id, user = user,
                record = record, converted_at = converted[id],
              }
              dropped = dropped + 1
            else
              -- elapsed: now it waits for its window's end
              rewrites[#rewrites + 1] = id
              rewrites[#rewrites + 1] = 'x' .. string.sub(value, 2)
              if not earliest or closes_at < earliest then earliest = closes_at end
            end
          end
        end
        if #rewrites > 0 then redis.call('HSET', ukey, unpack(rewrites)) end
        if earliest then
          again[#again + 1] = earliest
          again[#again + 1] = user
        end
      end
      for first = 1, #again, 1000 do
        redis.call('ZADD', index, unpack(again, first, math.min(first + 999, #again)))
      end
      if dropped > 0 then redis.call('HINCRBY', prefix .. 'pn', suffix, -dropped) end
    end
  end
  table.sort(due, function(a, b)
    if a.at ~= b.at then return a.at < b.at end
    if a.closing ~= b.closing then return a.closing < b.closing end
    if a.id ~= b.id then return bytewise_less(a.id, b.id) end
    return bytewise_less(a.user, b.user)
  end)
  for _, entry in ipairs(due) do
    if entry.closing == 1 then
      redis.call('HDEL', user_key(entry.user), entry.id, entry.id .. '|c')
      emit('X', entry.id, entry.user, entry.record, entry.converted_at, int(entry.at))
    else
      -- read when it was collected: after this call's conversions, before any closing
      emit('E', entry.id, entry.user, entry.record, entry.converted_at, int(entry.at))
    end
  end

  -- Stop-loss: evaluate each campaign over the current and the previous epoch.
  local function arm_stats(campaign, epochs, arm)
    local s = { n = 0, y = 0, yy = 0, yn = 0, nn = 0, u = 0 }
    local key = sl_key(campaign)
    for _, epoch in ipairs(epochs) do
      local field = epoch .. '|' .. arm .. '|'
      local values = redis.call('HMGET', key, field .. 'n', field .. 'y', field .. 'yy',
        field .. 'yn', field .. 'nn', field .. 'u')
      s.n = s.n + (tonumber(values[1]) or 0)
      s.y = s.y + (tonumber(values[2]) or 0)
      s.yy = s.yy + (tonumber(values[3]) or 0)
      s.yn = s.yn + (tonumber(values[4]) or 0)
      s.nn = s.nn + (tonumber(values[5]) or 0)
      s.u = s.u + (tonumber(values[6]) or 0)
    end
    return s
  end

  local function mean_and_variance(s)
    if s.u < 2 or s.n == 0 then return nil end
    local mean = s.y / s.n
    local spread = s.yy - 2.0 * mean * s.yn + mean * mean * s.nn
    if spread < 0 then spread = 0 end
    return mean, s.u / (s.u - 1) * spread / (s.n * s.n)
  end

  for _, campaign in ipairs(stop_loss_order) do
    local config = stop_loss[campaign]
    local key = sl_key(campaign)
    local current = math.floor(now / config.epoch_ms)
    local epochs = { current, current - 1 }
    local t, h = arm_stats(campaign, epochs, 'T'), arm_stats(campaign, epochs, 'H')
    local state = redis.call('HMGET', key, 'state', 'since')
    local stopped = state[1] == '1'
    local since = state[2] or ''
    local settled = since == '' or now - tonumber(since) >= config.epoch_ms
    local decisions = t.n + h.n
    local diff, upper, lower = '', '', ''
    local t_mean, t_var = mean_and_variance(t)
    local h_mean, h_var = mean_and_variance(h)
    if t_mean and h_mean then
      local d = (t_mean - h_mean) / 100.0
      local half = Z95 * math.sqrt(t_var + h_var) / 100.0
      diff, upper, lower = d, d + half, d - half
      if settled and decisions >= config.min_decisions and t.u >= config.min_users
          and h.u >= config.min_users then
        -- stop on the bound, resume on the estimate (engine/stop_loss.py says why)
        local now_stopped
        if stopped then now_stopped = d < 0.0 else now_stopped = upper < 0.0 end
        if now_stopped ~= stopped then
          stopped = now_stopped
          since = int(now)
        end
      end
    end
    local function figure(x) return x == '' and '' or string.format('%.17g', x) end
    redis.call('HSET', key, 'state', stopped and '1' or '0', 'since', since,
      'decisions', int(decisions), 'diff', figure(diff), 'upper', figure(upper),
      'lower', figure(lower))
    -- sums of decisions older than the window no longer change the statistic
    local stale = current - 3
    local fields = {}
    for _, arm in ipairs({ 'T', 'H' }) do
      for _, sum in ipairs({ 'n', 'y', 'yy', 'yn', 'nn', 'u' }) do
        fields[#fields + 1] = stale .. '|' .. arm .. '|' .. sum
      end
    end
    redis.call('HDEL', key, unpack(fields))
    statuses[#statuses + 1] = campaign
    statuses[#statuses + 1] = stopped and 1 or 0
    statuses[#statuses + 1] = since
    statuses[#statuses + 1] = decisions
    statuses[#statuses + 1] = figure(diff)
    statuses[#statuses + 1] = figure(upper)
    statuses[#statuses + 1] = figure(lower)
  end
end  -- settling

-- The outbox entry: everything needed to publish this batch's outputs again (the drafts as
-- given, with the outcomes and label events decided here), numbers written as integers.
if boxing then
  local stored_events = {}
  for k = 1, #events do
    local value = events[k]
    stored_events[k] = type(value) == 'number' and int(value) or value
  end
  local reply = cjson.encode({ outcomes = outcomes, events = stored_events })
  redis.call('HSET', prefix .. 'ob', entry_id, reply .. '\n' .. drafts)
  redis.call('HSET', prefix .. 'obc', entry_id, coverage)
end

return { 'ok', outcomes, events, statuses, current_epoch or '' }
