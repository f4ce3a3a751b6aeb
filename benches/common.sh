# Shared by benches/compare and benches/profile (sourced, not run): process
# bookkeeping, and the zero-latency region-sim with a dispatcher in front of
# it that both measure. Expects BIN and OUT set and "$OUT/regions" made.

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Starts a command in the background, output in LOG.out and LOG.err (its
# pid in LAST_PID).
start() {
    local log=$1; shift
    "$@" >"$log.out" 2>"$log.err" &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# Waits for a started command's "listening on ADDR" line and prints ADDR.
address() {
    for _ in $(seq 1 100); do
        if grep -q "listening on" "$1.out" 2>/dev/null; then
            grep "listening on" "$1.out" | tail -1 | awk '{print $NF}'
            return
        fi
        sleep 0.1
    done
    echo "did not start: $1" >&2; cat "$1.err" >&2; exit 1
}

# A region-sim with no latency and limits far above any load (its address in
# SIM), and a dispatcher whose one region is that region-sim (its address in
# DISPATCHER, its pid in DISPATCHER_PID).
start_sim_and_dispatcher() {
    start "$OUT/region-sim" "$BIN/region-sim" --listen 127.0.0.1:0 --region bench \
        --model gpt-4o:1000000000000:1000000000 --ms-per-1k-tokens 0 --base-latency-ms 0 --capacity 100000
    SIM=$(address "$OUT/region-sim")
    cat >"$OUT/dispatcher.toml" <<TOML
[server]
default_timeout = "10s"
[auth]
allow_anonymous = true
[[models]]
name = "gpt-4o"
TOML
    cat >"$OUT/regions/bench.toml" <<TOML
name = "bench"
endpoint = "http://$SIM"
max_concurrent = 100000
[[models]]
name = "gpt-4o"
tokens_per_minute = 1000000000000
requests_per_minute = 1000000000
TOML
    start "$OUT/dispatcher" "$BIN/dispatcher" --config "$OUT/dispatcher.toml" --listen 127.0.0.1:0
    DISPATCHER_PID=$LAST_PID
    DISPATCHER=$(address "$OUT/dispatcher")
}
