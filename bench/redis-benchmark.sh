#!/usr/bin/env bash
# Throughput through the ambassador against a direct authenticated connection, in one run,
# with redis-benchmark: SET and GET, 50 clients, pipelines of 1 and 16. Prints requests per
# second and the ratio ambassador/direct. Everything on loopback; every run is bounded by -n.
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
for _ in $(seq 100); do
  redis-cli -p "$amb_port" PING 2>/dev/null | grep -q PONG && break
  sleep 0.1
done

rps() { # port, pipeline, test, [auth args...]
  local port=$1 pipeline=$2 test=$3; shift 3
  redis-benchmark -h 127.0.0.1 -p "$port" "$@" -c 50 -n "$requests" -P "$pipeline" -t "$test" --csv -q 2>/dev/null |
    awk -F, 'NR>1 || !/test/ { gsub(/"/, "", $2); print $2; exit }'
}
printf '%-6s %-4s %14s %14s %8s\n' test P direct ambassador ratio
for pipeline in 1 16; do
  for test in set get; do
    d=() a=()
    for _ in $(seq "$rounds"); do
      d+=("$(rps "$redis_port" "$pipeline" "$test" --user bench -a bench-pass)")
      a+=("$(rps "$amb_port" "$pipeline" "$test")")
    done
    direct=$(printf '%s\n' "${d[@]}" | median)
    via=$(printf '%s\n' "${a[@]}" | median)
    ratio=$(python3 -c "print(f'{$via/$direct:.2f}')")
    printf '%-6s %-4s %14.0f %14.0f %8s\n' "$test" "$pipeline" "$direct" "$via" "$ratio"
  done
done
