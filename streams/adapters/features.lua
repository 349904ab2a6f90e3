-- Apply one micro-batch of feature-state updates atomically and read back the prior states.
-- Mirrors engine/features/store.py (InMemoryFeatureStore) and engine/features/state.py (apply_ops, trim).
--
-- KEYS[1]               hash of partition watermarks: field "<source>:<partition>" -> offset
-- KEYS[2u], KEYS[2u+1]  per user u (1-based): feature-state hash, dedup sorted set
-- ARGV: allowed_lateness_ms, ttl_seconds, updates as one JSON array (a single argument is
--       far cheaper to send than thousands): [[user_index, watermark_field ('' = none),
--       offset, event_id, ts, [op, field, value, op, field, value, ...], on_time], ...]
--       (on_time 1: never counted as late, the engine's own records such as offers), then
--       the buckets kept per grain (engine.features.state.RETENTION_BUCKETS: minutes, hours, days)
-- Returns {statuses, state_before_1, state_before_2, ...}; statuses: 0 applied, 1 redelivered,
-- 2 duplicate, 3 late. Each state_before is a flat HGETALL reply taken before the batch.
--
-- Two passes: the first classifies every update and computes the new values in Lua tables
-- without writing anything (so an error can never leave a batch half applied); the second
-- writes each touched user once (one HSET, one ZADD) instead of once per operation.

local lateness = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local updates = cjson.decode(ARGV[3])
local keep = { m = tonumber(ARGV[4]), h = tonumber(ARGV[5]), d = tonumber(ARGV[6]) }
local n_updates = #updates
local n_users = (#KEYS - 1) / 2

-- Pass 0: read. Prior states go back to the caller; their values seed the new state.
local before, state, latest = {}, {}, {}
for u = 1, n_users do
  local flat = redis.call('HGETALL', KEYS[2 * u])
  before[u] = flat
  local s = {}
  for k = 1, #flat, 2 do
    s[flat[k]] = tonumber(flat[k + 1])
  end
  state[u] = s
  latest[u] = s['lt']
end

-- Known event ids of the batch's users, with one ZMSCORE per user.
local ids_by_user = {}
for n = 1, n_updates do
  local u = updates[n][1]
  local ids = ids_by_user[u]
  if not ids then
    ids = {}
    ids_by_user[u] = ids
  end
  ids[#ids + 1] = updates[n][4]
end
local seen = {}
for u, ids in pairs(ids_by_user) do
  local scores = redis.call('ZMSCORE', KEYS[2 * u + 1], unpack(ids))
  local known = {}
  for k = 1, #ids do
    if scores[k] then
      known[ids[k]] = true
    end
  end
  seen[u] = known
end

-- Pass 1: classify and compute, no writes.
local watermarks, new_marks = {}, {}
local statuses, changed, added = {}, {}, {}
for n = 1, n_updates do
  local update = updates[n]
  local u = update[1]
  local wm_field = update[2]
  local offset = update[3]
  local event_id = update[4]
  local ts = update[5]
  local ops = update[6]

  local status = 0
  if wm_field ~= '' then
    local wm = watermarks[wm_field]
    if wm == nil then
      wm = redis.call('HGET', KEYS[1], wm_field)
      wm = wm and tonumber(wm) or false
      watermarks[wm_field] = wm
    end
    if wm and offset <= wm then
      status = 1
    else
      watermarks[wm_field] = offset
      new_marks[wm_field] = offset
    end
  end
  if status == 0 and update[7] ~= 1 and latest[u] and ts < latest[u] - lateness then
    status = 3
  end
  if status == 0 and seen[u][event_id] then
    status = 2
  end
  if status == 0 then
    local s = state[u]
    local c = changed[u]
    if not c then
      c = {}
      changed[u] = c
      added[u] = {}
    end
    for k = 1, #ops, 3 do
      local op = ops[k]
      local field = ops[k + 1]
      local v = ops[k + 2]
      local current = s[field]
      if op == 'i' then
        s[field] = (current or 0) + v
        c[field] = true
      elseif (not current) or (op == 'x' and v > current) or (op == 'n' and v < current) then
        s[field] = v
        c[field] = true
      end
    end
    seen[u][event_id] = true
    local a = added[u]
    a[#a + 1] = ts
    a[#a + 1] = event_id
    if (not latest[u]) or ts > latest[u] then
      latest[u] = ts
    end
  end
  statuses[n] = status
end

-- Pass 2: write each touched user once; trim to the buckets kept (category fields
-- k<day>:<category> follow days).
local grain_ms = { m = 60000, h = 3600000, d = 86400000 }
for u, c in pairs(changed) do
  local state_key = KEYS[2 * u]
  local dedup_key = KEYS[2 * u + 1]
  local lt = latest[u]
  local s = state[u]
  local cutoff = {}
  for grain, ms in pairs(grain_ms) do
    cutoff[grain] = math.floor(lt / ms) - keep[grain]
  end
  local writes, stale = {}, {}
  for field, value in pairs(s) do
    local grain, index = string.match(field, '^.([mhd])(%d+)$')
    if not grain then
      index = string.match(field, '^k(%d+):')
      grain = index and 'd'
    end
    if grain and tonumber(index) <= cutoff[grain] then
      stale[#stale + 1] = field
    elseif c[field] then
      writes[#writes + 1] = field
      writes[#writes + 1] = string.format('%.0f', value)
    end
  end
  if #writes > 0 then
    redis.call('HSET', state_key, unpack(writes))
  end
  if #stale > 0 then
    redis.call('HDEL', state_key, unpack(stale))
  end
  redis.call('ZADD', dedup_key, unpack(added[u]))
  redis.call('ZREMRANGEBYSCORE', dedup_key, '-inf', '(' .. string.format('%.0f', lt - lateness))
  redis.call('EXPIRE', state_key, ttl)
  redis.call('EXPIRE', dedup_key, ttl)
end

for field, offset in pairs(new_marks) do
  redis.call('HSET', KEYS[1], field, offset)
end

local reply = { statuses }
for u = 1, n_users do
  reply[u + 1] = before[u]
end
return reply
