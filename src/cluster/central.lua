-- The central bucket of one (region, model), shared by every replica:
-- src/core/central.rs in Redis, step for step (tests/redis_central.rs
-- checks the two agree). One call refills the level at the provider's
-- rate (by Redis TIME, never a replica's clock) less the shares of
-- replicas presumed in fallback, up to the burst less what the replicas
-- may hold; takes back what the caller held and did not spend; applies
-- the differences of its running totals (refunds, extra use, fallback
-- spending), the provider's word and refusals; and grants it a part.
--
-- KEYS[1] the bucket (hash), KEYS[2] its replicas (hash: id -> record);
-- both carry the same {region/model} hash tag.
-- ARGV: replica, tokens/min, token capacity, requests/min, request
-- capacity, replicas floor, hold_for us, incarnation, seq, ask tokens,
-- ask requests, need tokens, held tokens, held requests, spent tokens,
-- spent requests, settled tokens, settled requests, fallback tokens,
-- fallback requests, the same four as acknowledged, hint tokens, hint
-- requests ("" = none), block us, stale us, forget us, round us, idle
-- expiry s, now us ("" = Redis TIME; tests only), the highest generation
-- the caller has seen, the epoch ("" = this server process's run id;
-- tests only).
-- Returns {tokens, requests, level tokens, level requests, blocked us,
-- replicas, fresh, others' need, disagreeing, stale, generation}.
--
-- The fence: every applied call advances the bucket's generation ('g');
-- the bucket keeps the epoch it was written in ('ep': the run id of the
-- server process, another after a promotion or a restart). A bucket from another
-- epoch, or behind the caller's generation (it lost calls the caller saw
-- answered: a lagging replica promoted, a snapshot reloaded), restarts
-- empty as a missing one does, its records dropped.

local id = ARGV[1]
local a = {}
for i = 2, 29 do a[i] = tonumber(ARGV[i]) end
local lim = {a[2], a[3], a[4], a[5]}
local floor_n, hold_us = a[6], a[7]
local inc, seq = a[8], a[9]
local ask_t, ask_r, need_t = a[10], a[11], a[12]
local held_t, held_r, spent_t, spent_r = a[13], a[14], a[15], a[16]
local tot = {a[17], a[18], a[19], a[20]}
local acked = {a[21], a[22], a[23], a[24]}
local hint_t, hint_r = a[25], a[26]
local block = a[27]
local stale_us, forget_us, round_us = a[28], a[29], tonumber(ARGV[30])
local idle_s = tonumber(ARGV[31])
local now = tonumber(ARGV[32])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local seen_gen = tonumber(ARGV[33])
local epoch = ARGV[34]
if epoch == '' then
  epoch = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end
local b = redis.call('HMGET', KEYS[1], 'lt', 'lr', 'up', 'bu', 'rs', 'rt', 'rr', 'g', 'ep')
local fresh = 0
local gen = tonumber(b[8]) or 0
local lt, lr, up, bu, rs, rt, rr
if b[1] == false or b[9] ~= epoch or gen < seen_gen then
  -- Empty, less one hold_for of refill: nothing is granted until what
  -- replicas held from before (Redis restarted) has lapsed.
  fresh = 1
  lt, lr, up, bu, rs, rt, rr = -(lim[1] / 60e6 * hold_us), -(lim[3] / 60e6 * hold_us), now, 0, now, 0, 0
  if b[1] ~= false then redis.call('DEL', KEYS[2]) end
  if gen > 0 or seen_gen > 0 then gen = math.max(gen, seen_gen) + 4294967296 end
else
  lt, lr, up, bu = tonumber(b[1]), tonumber(b[2]), tonumber(b[3]), tonumber(b[4])
  rs, rt, rr = tonumber(b[5]), tonumber(b[6]), tonumber(b[7])
end
if now < up then now = up end

-- Replicas: id -> 22 numbers, in this order.
local FIELDS = {'seen', 'inc', 'seq', 'ask_t', 'ask_r', 'wh_t', 'wh_r', 'need', 'need_since', 'out_t', 'out_r',
  'sp_t', 'sp_r', 'st_t', 'st_r', 'fb_t', 'fb_r', 'l1', 'l2', 'l3', 'l4', 'hold'}
local reps = {}
local raw = redis.call('HGETALL', KEYS[2])
for i = 1, #raw, 2 do
  local r, k = {}, 1
  for v in string.gmatch(raw[i + 1], '%S+') do
    r[FIELDS[k]] = tonumber(v)
    k = k + 1
  end
  reps[raw[i]] = r
end
-- Forget replicas gone too long (and whose holdings have lapsed).
local hold_max = hold_us
for _, r in pairs(reps) do hold_max = math.max(hold_max, r.hold) end
local forget = math.max(forget_us, hold_max + round_us)
for rid, r in pairs(reps) do
  if rid ~= id and now - r.seen >= forget then
    reps[rid] = nil
    redis.call('HDEL', KEYS[2], rid)
  end
end

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end
local live = function(r) return now - r.seen < stale_us end

local function answer(gt, gr, stale)
  local me, others, disagree = reps[id], 0, 0
  for rid, r in pairs(reps) do
    if rid ~= id then
      if live(r) then others = others + r.need end
      if me == nil or r.l1 ~= me.l1 or r.l2 ~= me.l2 or r.l3 ~= me.l3 or r.l4 ~= me.l4 then
        disagree = disagree + 1
      end
    end
  end
  return {gt, gr, math.floor(lt), math.floor(lr), math.max(bu - now, 0), count(reps), fresh, others, disagree, stale, gen}
end

local record = reps[id]
local same_run = record ~= nil and record.inc == inc
if same_run and seq <= record.seq then
  return answer(0, 0, 1)
end
gen = gen + 1

-- The limits applied: the lowest each of every replica known.
local low = {lim[1], lim[2], lim[3], lim[4]}
for rid, r in pairs(reps) do
  if rid ~= id then
    low[1], low[2] = math.min(low[1], r.l1), math.min(low[2], r.l2)
    low[3], low[4] = math.min(low[3], r.l3), math.min(low[4], r.l4)
  end
end
local tpm, cap_t, rpm, cap_r = low[1], low[2], low[3], low[4]
local known = count(reps)
if record == nil then known = known + 1 end
local n = math.max(known, floor_n, 1)

local function fill(level, add, room)
  return math.max(level, math.min(level + add, room))
end
local function room()
  local ot, orq = 0, 0
  for _, r in pairs(reps) do
    ot, orq = ot + r.out_t, orq + r.out_r
  end
  return cap_t - ot, cap_r - orq
end

local dt = now - up
local per_us_t, per_us_r = tpm / 60e6, rpm / 60e6
local stale = 0
-- The records this call changes besides the caller's: only these are
-- written back (the others would be rewritten digit for digit).
local changed = {}
for rid, r in pairs(reps) do
  if rid ~= id and now - r.seen >= stale_us then
    stale = stale + 1
    r.wh_t = r.wh_t + per_us_t * dt / n
    r.wh_r = r.wh_r + per_us_r * dt / n
    changed[rid] = true
  end
end
local kept = 1 - stale / n
local room_t, room_r = room()
lt = fill(lt, per_us_t * dt * kept, room_t)
lr = fill(lr, per_us_r * dt * kept, room_r)
up = now

-- A new run starts a new record: what the old run held lapsed with it,
-- and its withheld share is released, not credited.
local me = record
local credit_t, credit_r = 0, 0
if same_run then
  credit_t = me.out_t - held_t - (spent_t - me.sp_t)
  credit_r = me.out_r - held_r - (spent_r - me.sp_r)
else
  me = {wh_t = 0, wh_r = 0, need = 0, need_since = 0, out_t = 0, out_r = 0, sp_t = 0, sp_r = 0,
    st_t = acked[1], st_r = acked[2], fb_t = acked[3], fb_r = acked[4]}
  reps[id] = me
end
me.inc, me.seq = inc, seq
me.out_t, me.out_r, me.sp_t, me.sp_r = held_t, held_r, spent_t, spent_r
me.l1, me.l2, me.l3, me.l4, me.hold = lim[1], lim[2], lim[3], lim[4], hold_us
local settled_t, settled_r = tot[1] - me.st_t, tot[2] - me.st_r
local fallback_t, fallback_r = 0, 0
if fresh == 0 then
  fallback_t, fallback_r = tot[3] - me.fb_t, tot[4] - me.fb_r
end
local withheld_t, withheld_r = me.wh_t, me.wh_r
me.wh_t, me.wh_r = 0, 0
me.st_t, me.st_r, me.fb_t, me.fb_r = tot[1], tot[2], tot[3], tot[4]
me.seen, me.ask_t, me.ask_r = now, ask_t, ask_r
if need_t == 0 then
  me.need_since = 0
elseif me.need_since == 0 then
  me.need_since = now
end
me.need = need_t

room_t, room_r = room()
lt = lt + credit_t
lr = lr + credit_r
lt = fill(lt, math.max(settled_t, 0) + withheld_t, room_t)
lr = fill(lr, math.max(settled_r, 0) + withheld_r, room_r)
lt = lt + math.min(settled_t, 0) - fallback_t
lr = lr + math.min(settled_r, 0) - fallback_r
if hint_t ~= nil then
  lt = math.min(lt, hint_t - (cap_t - room_t))
  lr = math.min(lr, hint_r - (cap_r - room_r))
end
if block > 0 then bu = math.max(bu, now + block) end

if now - rs >= round_us then
  rs, rt, rr = now, 0, 0
end
local asked_t, asked_r, askers_t, askers_r = 0, 0, 0, 0
for _, r in pairs(reps) do
  if live(r) then
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
  if rid ~= id and live(r) and r.need > 0 then
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
local gr = share(ask_r, 0, asked_r, askers_r, lr, rr)
if need_t > 0 and gt >= need_t then
  -- Served: its next need queues behind the others'.
  me.need, me.need_since = 0, now
end
me.out_t, me.out_r = me.out_t + gt, me.out_r + gr
lt, lr = lt - gt, lr - gr
rt, rr = rt + gt, rr + gr

-- Written with every digit: Redis turns a bare Lua number into 14.
local function exact(x) return string.format('%.17g', x) end
redis.call('HSET', KEYS[1], 'lt', exact(lt), 'lr', exact(lr), 'up', exact(up), 'bu', exact(bu),
  'rs', exact(rs), 'rt', exact(rt), 'rr', exact(rr), 'g', exact(gen), 'ep', epoch)
changed[id] = true
for rid in pairs(changed) do
  local r, parts = reps[rid], {}
  for k, f in ipairs(FIELDS) do parts[k] = exact(r[f]) end
  redis.call('HSET', KEYS[2], rid, table.concat(parts, ' '))
end
redis.call('EXPIRE', KEYS[1], idle_s)
redis.call('EXPIRE', KEYS[2], idle_s)
return answer(gt, gr, 0)
