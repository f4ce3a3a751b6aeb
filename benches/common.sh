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

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

# Installs Debian packages ("command:package" pairs) whose command is missing.
install_missing() {
    local missing=()
    for pair in "$@"; do command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}"); done
    [ ${#missing[@]} -eq 0 ] && return
    echo "installing ${missing[*]} (Debian packages)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
}

# nginx grpc_pass in front of SIM, with upstream keep-alive (its address in
# NGINX, its worker processes' pids, comma-separated, in NGINX_WORKERS).
start_nginx() {
    local port dir; port=$(free_port)
    mkdir -p "$OUT/nginx/logs"
    dir=$(cd "$OUT/nginx" && pwd)
    cat >"$OUT/nginx/nginx.conf" <<CONF
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    # Connections are not recycled every 1,000 requests (the default), which
    # would cancel requests in flight on them.
    keepalive_requests 10000000;
    upstream sim { server $SIM; keepalive 64; keepalive_requests 10000000; }
    server {
        listen 127.0.0.1:$port http2;
        http2_max_concurrent_streams 1024;
        location / { grpc_pass grpc://sim; }
    }
}
CONF
    start "$OUT/nginx/nginx" nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;'
    local master=$LAST_PID
    wait_port "$port"
    NGINX=127.0.0.1:$port
    NGINX_WORKERS=$(pgrep -d, -P "$master")
}

# examples/h2_relay.rs in front of SIM (its address in RELAY, pid RELAY_PID).
start_relay() {
    start "$OUT/h2-relay" ${CARGO_TARGET_DIR:-target}/release/examples/h2_relay 127.0.0.1:0 "$SIM"
    RELAY_PID=$LAST_PID
    RELAY=$(address "$OUT/h2-relay")
}
