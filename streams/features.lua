-- Apply one micro-batch of feature-state updates atomically and read back the prior states.
-- Mirrors engine/store.py (InMemoryFeatureStore) and engine/features.py (apply_ops, trim).
--
-- KEYS[1]            hash of partition watermarks: field "<source>:<partition>" -> last offset
-- KEYS[2u], KEYS[2u+1]  per user u (1-based): feature-state hash, dedup sorted set
-- ARGV: allowed_lateness_ms, ttl_seconds, n_updates, then per update:
--       user_index, watermark_field ('' = none), offset, event_id, ts, n_ops, (op, field, value)*
-- Returns {statuses, state_before_1, state_before_2, ...}; statuses: 0 applied, 1 redelivered,
-- 2 duplicate, 3 late. Each state_before is a flat HGETALL reply taken before the batch.

local lateness = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local n_updates = tonumber(ARGV[3])
local n_users = (#KEYS - 1) / 2

local before = {}
local latest = {}
for u = 1, n_users do
  local state_key = KEYS[2 * u]
  before[u] = redis.call('HGETALL', state_key)
  local lt = redis.call('HGET', state_key, 'lt')
  latest[u] = lt and tonumber(lt) or nil
end

local watermarks = {}
local statuses = {}
local touched = {}
local i = 4
for n = 1, n_updates do
  local u = tonumber(ARGV[i])
  local wm_field = ARGV[i + 1]
  local offset = tonumber(ARGV[i + 2])
  local event_id = ARGV[i + 3]
  local ts = tonumber(ARGV[i + 4])
  local n_ops = tonumber(ARGV[i + 5])
  local ops_at = i + 6
  i = ops_at + 3 * n_ops

  local state_key = KEYS[2 * u]
  local dedup_key = KEYS[2 * u + 1]
  local status = 0
  if wm_field ~= '' then
    local wm = watermarks[wm_field]
    if wm == nil then
      wm = redis.call('HGET', KEYS[1], wm_field)
      wm = wm and tonumber(wm) or false
    end
    if wm and offset <= wm then
      status = 1
    else
      watermarks[wm_field] = offset
    end
  end
  if status == 0 and latest[u] and ts < latest[u] - lateness then
    status = 3
  end
  if status == 0 and redis.call('ZSCORE', dedup_key, event_id) then
    status = 2
  end
  if status == 0 then
    for k = 0, n_ops - 1 do
      local op = ARGV[ops_at + 3 * k]
      local field = ARGV[ops_at + 3 * k + 1]
      local value = ARGV[ops_at + 3 * k + 2]
      if op == 'i' then
        redis.call('HINCRBY', state_key, field, value)
      else
        local current = redis.call('HGET', state_key, field)
        local v = tonumber(value)
        if (not current) or (op == 'x' and v > tonumber(current)) or (op == 'n' and v < tonumber(current)) then
          redis.call('HSET', state_key, field, value)
        end
      end
    end
    redis.call('ZADD', dedup_key, ts, event_id)
    if (not latest[u]) or ts > latest[u] then
      latest[u] = ts
    end
    touched[u] = true
  end
  statuses[n] = status
end

for field, offset in pairs(watermarks) do
  redis.call('HSET', KEYS[1], field, offset)
end

-- Retention, as in engine.features.RETENTION_BUCKETS: minutes 120, hours 26, days 31
-- (category fields k<day>:<category> follow the day retention).
local grain_ms = { m = 60000, h = 3600000, d = 86400000 }
local keep = { m = 120, h = 26, d = 31 }
for u, _ in pairs(touched) do
  local state_key = KEYS[2 * u]
  local dedup_key = KEYS[2 * u + 1]
  local lt = latest[u]
  local fields = redis.call('HKEYS', state_key)
  local stale = {}
  for _, field in ipairs(fields) do
    local grain, index = string.match(field, '^.([mhd])(%d+)$')
    if not grain then
      -- category activity per day: k<day>:<category>
      index = string.match(field, '^k(%d+):')
      grain = index and 'd'
    end
    if grain then
      local cutoff = math.floor(lt / grain_ms[grain]) - keep[grain]
      if tonumber(index) <= cutoff then
        stale[#stale + 1] = field
      end
    end
  end
  if #stale > 0 then
    redis.call('HDEL', state_key, unpack(stale))
  end
  redis.call('ZREMRANGEBYSCORE', dedup_key, '-inf', '(' .. string.format('%d', lt - lateness))
  redis.call('EXPIRE', state_key, ttl)
  redis.call('EXPIRE', dedup_key, ttl)
end

local reply = { statuses }
for u = 1, n_users do
  reply[u + 1] = before[u]
end
return reply
