-- The central bucket of one (region, model), shared by every replica:
-- src/core/central.rs in Redis, step for step (tests/redis_central.rs
-- checks the two agree). One call refills the level at the provider's
-- rate (by Redis TIME, never a replica's clock) less the shares of
-- replicas presumed in fallback, applies a replica's settlements, the
-- provider's word and refusals, and grants it a chunk.
--
-- KEYS[1] the bucket (hash), KEYS[2] its replicas (hash: id -> record);
-- both carry the same {region/model} hash tag.
-- ARGV: replica, tokens/min, token capacity, requests/min, request
-- capacity, replicas floor, ask tokens, ask requests, need tokens,
-- settle tokens, settle requests, hint tokens, hint requests ("" = none),
-- block us, fallback tokens, fallback requests ("" = none), stale us,
-- forget us, round us, idle expiry s, now us ("" = Redis TIME; tests only).
-- Returns {tokens, requests, level tokens, level requests, blocked us,
-- replicas, fresh}.

local id = ARGV[1]
local tpm, cap_t = tonumber(ARGV[2]), tonumber(ARGV[3])
local rpm, cap_r = tonumber(ARGV[4]), tonumber(ARGV[5])
local floor_n = tonumber(ARGV[6])
local ask_t, ask_r, need_t = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local settle_t, settle_r = tonumber(ARGV[10]), tonumber(ARGV[11])
local hint_t, hint_r = tonumber(ARGV[12]), tonumber(ARGV[13])
local block = tonumber(ARGV[14])
local fb_t, fb_r = tonumber(ARGV[15]), tonumber(ARGV[16])
local stale_us, forget_us, round_us = tonumber(ARGV[17]), tonumber(ARGV[18]), tonumber(ARGV[19])
local idle_s = tonumber(ARGV[20])
local now = tonumber(ARGV[21])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local b = redis.call('HMGET', KEYS[1], 'lt', 'lr', 'up', 'bu', 'rs', 'rt', 'rr')
local fresh = 0
local lt, lr, up, bu, rs, rt, rr
if b[1] == false then
  fresh = 1
  lt, lr, up, bu, rs, rt, rr = 0, 0, now, 0, now, 0, 0
  fb_t, fb_r = nil, nil
else
  lt, lr, up, bu = tonumber(b[1]), tonumber(b[2]), tonumber(b[3]), tonumber(b[4])
  rs, rt, rr = tonumber(b[5]), tonumber(b[6]), tonumber(b[7])
end
if now < up then now = up end

-- Replicas: id -> "seen ask_t ask_r withheld_t withheld_r need need_since".
local reps = {}
local raw = redis.call('HGETALL', KEYS[2])
for i = 1, #raw, 2 do
  local s, a, q, wt, wr, nd, ns = string.match(raw[i + 1], '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$')
  local r = {seen = tonumber(s), ask_t = tonumber(a), ask_r = tonumber(q), wh_t = tonumber(wt), wh_r = tonumber(wr),
    need = tonumber(nd), need_since = tonumber(ns)}
  if raw[i] == id or now - r.seen < forget_us then
    reps[raw[i]] = r
  else
    redis.call('HDEL', KEYS[2], raw[i])
  end
end
local known = 0
for _ in pairs(reps) do known = known + 1 end
if reps[id] == nil then known = known + 1 end
local n = math.max(known, floor_n, 1)

local dt = now - up
local per_us_t, per_us_r = tpm / 60e6, rpm / 60e6
local stale = 0
for rid, r in pairs(reps) do
  if rid ~= id and now - r.seen >= stale_us then
    stale = stale + 1
    r.wh_t = r.wh_t + per_us_t * dt / n
    r.wh_r = r.wh_r + per_us_r * dt / n
  end
end
local kept = 1 - stale / n
lt = math.min(lt + per_us_t * dt * kept, cap_t)
lr = math.min(lr + per_us_r * dt * kept, cap_r)
up = now

local me = reps[id]
if me == nil then
  me = {seen = now, ask_t = 0, ask_r = 0, wh_t = 0, wh_r = 0, need = 0, need_since = 0}
  reps[id] = me
end
if fb_t ~= nil then
  lt = lt + me.wh_t - fb_t
  lr = lr + me.wh_r - fb_r
end
me.wh_t, me.wh_r = 0, 0
me.seen, me.ask_t, me.ask_r = now, ask_t, ask_r
if need_t == 0 then
  me.need_since = 0
elseif me.need_since == 0 then
  me.need_since = now
end
me.need = need_t

lt = math.min(lt + settle_t, cap_t)
lr = math.min(lr + settle_r, cap_r)
if hint_t ~= nil then
  lt = math.min(lt, hint_t)
  lr = math.min(lr, hint_r)
end
if block > 0 then bu = math.max(bu, now + block) end

if now - rs >= round_us then
  rs, rt, rr = now, 0, 0
end
local asked_t, asked_r, askers_t, askers_r = 0, 0, 0, 0
for _, r in pairs(reps) do
  if now - r.seen < stale_us then
    asked_t = asked_t + r.ask_t
    asked_r = asked_r + r.ask_r
    if r.ask_t > 0 then askers_t = askers_t + 1 end
    if r.ask_r > 0 then askers_r = askers_r + 1 end
  end
end
askers_t, askers_r = math.max(askers_t, 1), math.max(askers_r, 1)
local blocked = now < bu
-- Requests waiting are served in the order they began to wait: the level
-- is not spent below what the requests waiting longer lack.
local function before(s1, id1, s2, id2)
  return s1 < s2 or (s1 == s2 and id1 < id2)
end
local ahead = 0
for rid, r in pairs(reps) do
  if rid ~= id and now - r.seen < stale_us and r.need > 0 then
    if need_t == 0 or before(r.need_since, rid, me.need_since, id) then
      ahead = ahead + r.need
    end
  end
end
local level_t = lt - ahead
-- When scarce, an equal part of the round's pool for each replica asking.
local function share(ask, need, asked, askers, level, round)
  need = math.min(need, ask)
  if blocked or ask == 0 or level < 1 or level < need then
    return 0
  elseif asked <= level then
    return ask
  else
    local part = math.floor((level + round) / askers)
    return math.max(math.min(ask, math.max(part, need), math.floor(level)), 0)
  end
end
local gt = share(ask_t, need_t, asked_t, askers_t, level_t, rt)
if need_t > 0 and gt >= need_t then
  -- Served: its next need queues behind the others'.
  me.need, me.need_since = 0, now
end
local gr = share(ask_r, 0, asked_r, askers_r, lr, rr)
lt, lr = lt - gt, lr - gr
rt, rr = rt + gt, rr + gr

-- Written with every digit: Redis turns a bare Lua number into 14.
local function exact(x) return string.format('%.17g', x) end
redis.call('HSET', KEYS[1], 'lt', exact(lt), 'lr', exact(lr), 'up', exact(up), 'bu', exact(bu),
  'rs', exact(rs), 'rt', exact(rt), 'rr', exact(rr))
for rid, r in pairs(reps) do
  redis.call('HSET', KEYS[2], rid, string.format('%.17g %.17g %.17g %.17g %.17g %.17g %.17g', r.seen, r.ask_t, r.ask_r, r.wh_t, r.wh_r, r.need, r.need_since))
end
redis.call('EXPIRE', KEYS[1], idle_s)
redis.call('EXPIRE', KEYS[2], idle_s)
local count = 0
for _ in pairs(reps) do count = count + 1 end
return {gt, gr, math.floor(lt), math.floor(lr), math.max(bu - now, 0), count, fresh}
