#!/usr/bin/env bash
# Throughput through the ambassador against a direct authenticated connection, in one run,
# with redis-benchmark: SET and GET, 50 clients, pipelines of 1 and 16. Prints requests per
# second and the ratio ambassador/direct. Where HAProxy is installed, the same through HAProxy
# in TCP mode (a bare proxy hop that cannot inject AUTH: the client authenticates itself),
# which shows what any extra hop costs on this machine. Loopback only; every run is bounded
# by -n.
#
#   bash bench/redis-benchmark.sh [requests] [rounds]   (defaults: 200000 per test, 3 rounds)
# Direct and ambassador runs alternate, round after round, and the median of each is shown,
# so a noisy neighbour on a small machine skews both sides alike.
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-200000}
rounds=${2:-3}
. bench/lib.sh
require_tools redis-server redis-cli redis-benchmark python3
start_scratch
redis_port=$(free_port)
printf 'user default off\nuser bench on >bench-pass ~* &* +@all\n' > "$work/users.acl"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --aclfile "$work/users.acl" --dir "$work" --logfile redis.log &
pids+=($!)
printf 'username = "bench"\npassword = "bench-pass"\n' > "$work/creds.toml"
amb_port=$(free_port)
RUST_LOG=warn ${AMBASSADOR_BIN:-./target/release/redis-ambassador} --listen "127.0.0.1:$amb_port" \
  --upstream "127.0.0.1:$redis_port" --credentials-file "$work/creds.toml" &
pids+=($!)
haproxy_port=
if command -v haproxy >/dev/null; then
  haproxy_port=$(free_port)
  printf 'global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nlisten redis\n  bind 127.0.0.1:%s\n  server redis 127.0.0.1:%s\n' \
    "$haproxy_port" "$redis_port" > "$work/haproxy.cfg"
  haproxy -db -f "$work/haproxy.cfg" 2>"$work/haproxy.log" &
  pids+=($!)
else
  echo "haproxy not installed: its column is skipped (apt-get install -y haproxy)" >&2
fi
for _ in $(seq 100); do
  redis-cli -p "$amb_port" PING 2>/dev/null | grep -q PONG && break
  sleep 0.1
done

rps() { # port, pipeline, test, [auth args...]
  local port=$1 pipeline=$2 test=$3; shift 3
  redis-benchmark -h 127.0.0.1 -p "$port" "$@" -c 50 -n "$requests" -P "$pipeline" -t "$test" --csv -q 2>/dev/null |
    awk -F, 'NR>1 || !/test/ { gsub(/"/, "", $2); print $2; exit }'
}
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
printf '%-6s %-4s %12s %12s %7s %12s %7s\n' test P direct ambassador ratio haproxy ratio
for pipeline in 1 16; do
  for test in set get; do
    d=() a=() h=()
    for _ in $(seq "$rounds"); do
      d+=("$(rps "$redis_port" "$pipeline" "$test" --user bench -a bench-pass)")
      a+=("$(rps "$amb_port" "$pipeline" "$test")")
      [ -n "$haproxy_port" ] && h+=("$(rps "$haproxy_port" "$pipeline" "$test" --user bench -a bench-pass)")
    done
    direct=$(printf '%s\n' "${d[@]}" | median)
    via=$(printf '%s\n' "${a[@]}" | median)
    line=$(printf '%-6s %-4s %12.0f %12.0f %7s' "$test" "$pipeline" "$direct" "$via" "$(ratio "$via" "$direct")")
    if [ -n "$haproxy_port" ]; then
      hap=$(printf '%s\n' "${h[@]}" | median)
      line+=$(printf ' %12.0f %7s' "$hap" "$(ratio "$hap" "$direct")")
    fi
    echo "$line"
  done
done
