#!/usr/bin/env bash
# The benchmark: direct (authenticated), the ambassador and HAProxy in TCP mode, plain and with
# TLS toward the upstream, in one run on loopback.
#
#   bash bench/run.sh [quick|full]      (quick: under 2 minutes; full: under 10)
#   AMBASSADOR_BIN=path/to/redis-ambassador bash bench/run.sh quick   (compare another build)
#
# One redis-server (ACL user bench, plain and TLS ports; certificates made for the run with
# openssl), two ambassadors (plain and TLS upstream: they inject AUTH) and one HAProxy (TCP
# mode, a plain and a TLS backend: redis-benchmark sends AUTH itself through it).
# The connection-per-request workloads also run a fourth contender, "pooled": the ambassador
# with upstream.pool_size = 64 (ready connections, and reuse of those clients leave clean),
# which is off by default.
# Per workload, every round runs direct, ambassador and HAProxy back to back in an order that
# rotates from round to round; the table shows medians of the rounds: requests/s, p50 and p99
# latency (redis-benchmark --csv), ratio to direct and to HAProxy, and the CPU seconds the
# proxy process spent per million requests (utime + stime from /proc/<pid>/stat, summed over
# the rounds).
# Then the RSS per idle session (N clients that each did one PING, held open; VmRSS of the
# proxy before and after) for the ambassador and HAProxy, and (full and smoke) the peak RSS
# (VmHWM) of each while a python client streams a 256 MiB SET through it.
# Every run is bounded by -n and by timeout; only the processes started here are killed.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-quick}
case $mode in
  quick) rounds=3; scale=1; idle=3000 ;;
  full) rounds=5; scale=4; idle=10000 ;;
  smoke) rounds=1; scale=1; idle=200 ;;  # checks the script itself: numbers mean nothing
  *) echo "usage: bash bench/run.sh [quick|full|smoke]" >&2; exit 2 ;;
esac
. bench/lib.sh
require_tools redis-server redis-cli redis-benchmark openssl python3 haproxy timeout
ulimit -n "$(ulimit -Hn)"
# A proxy holds two descriptors per idle session (HAProxy asks for 2 x maxconn + some).
max_idle=$(( ($(ulimit -n) - 400) / 2 ))
[ "$idle" -le "$max_idle" ] || { echo "fd limit $(ulimit -n): $max_idle idle sessions instead of $idle" >&2; idle=$max_idle; }
start_scratch

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=bench CA" -keyout "$work/ca-key.pem" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
  -keyout "$work/server-key.pem" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$work/ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" \
  -CAcreateserial -days 2 -extfile "$work/ext" -out "$work/server.pem" 2>/dev/null

redis_port=$(free_port)
tls_port=$(free_port)
printf 'user default off\nuser bench on >bench-pass ~* &* +@all\n' > "$work/users.acl"
redis-server --port "$redis_port" --tls-port "$tls_port" --bind 127.0.0.1 --save '' --appendonly no \
  --maxclients $((idle + 1000)) \
  --tls-cert-file "$work/server.pem" --tls-key-file "$work/server-key.pem" \
  --tls-ca-cert-file "$work/ca.pem" --tls-auth-clients no \
  --aclfile "$work/users.acl" --dir "$work" --logfile redis.log &
pids+=($!)

printf 'username = "bench"\npassword = "bench-pass"\n' > "$work/creds.toml"
amb_port=$(free_port)
RUST_LOG=warn "$ambassador_bin" --listen "127.0.0.1:$amb_port" --upstream "127.0.0.1:$redis_port" \
  --credentials-file "$work/creds.toml" 2>"$work/ambassador.log" &
pids+=($!)
amb_pid=$!
amb_tls_port=$(free_port)
mkdir "$work/profiles"
cat > "$work/profiles/bench.toml" <<EOT
[listen]
address = "127.0.0.1:$amb_tls_port"
[upstream]
address = "127.0.0.1:$tls_port"
[upstream.tls]
server_name = "localhost"
ca_file = "$work/ca.pem"
[credentials]
file = "$work/creds.toml"
EOT
RUST_LOG=warn "$ambassador_bin" --config-dir "$work/profiles" --profile bench 2>"$work/ambassador-tls.log" &
pids+=($!)
amb_tls_pid=$!
# The same two with ready connections and reuse (upstream.pool_size, off by default), for
# the connection-per-request workloads only: a pool as large as the benchmark's clients.
pool_size=64
pool_port=$(free_port)
AMBASSADOR__UPSTREAM__POOL_SIZE=$pool_size RUST_LOG=warn "$ambassador_bin" --listen "127.0.0.1:$pool_port" \
  --upstream "127.0.0.1:$redis_port" --credentials-file "$work/creds.toml" 2>"$work/ambassador-pool.log" &
pids+=($!)
pool_pid=$!
pool_tls_port=$(free_port)
sed "s/^address = \"127.0.0.1:$amb_tls_port\"/address = \"127.0.0.1:$pool_tls_port\"/" \
  "$work/profiles/bench.toml" > "$work/profiles/pool.toml"
AMBASSADOR__UPSTREAM__POOL_SIZE=$pool_size RUST_LOG=warn "$ambassador_bin" --config-dir "$work/profiles" \
  --profile pool 2>"$work/ambassador-pool-tls.log" &
pids+=($!)
pool_tls_pid=$!

hap_port=$(free_port)
hap_tls_port=$(free_port)
cat > "$work/haproxy.cfg" <<EOT
global
  maxconn $((idle + 50))
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
listen plain
  bind 127.0.0.1:$hap_port
  server redis 127.0.0.1:$redis_port
listen tls
  bind 127.0.0.1:$hap_tls_port
  server redis 127.0.0.1:$tls_port ssl verify required ca-file $work/ca.pem sni str(localhost) verifyhost localhost
EOT
haproxy -db -f "$work/haproxy.cfg" 2>"$work/haproxy.log" &
pids+=($!)
hap_pid=$!

auth=(--user bench -a bench-pass)
tls_client=(--tls --cacert "$work/ca.pem" --sni localhost)
wait_pong() { # redis-cli args...
  for _ in $(seq 100); do
    redis-cli --no-auth-warning "$@" PING 2>/dev/null | grep -q PONG && return 0
    sleep 0.1
  done
  echo "no PONG from: redis-cli $*" >&2
  tail -n 5 "$work"/*.log >&2; exit 1
}
wait_pong -p "$redis_port" "${auth[@]}"
wait_pong -p "$tls_port" "${tls_client[@]}" "${auth[@]}"
wait_pong -p "$amb_port"
wait_pong -p "$amb_tls_port"
wait_pong -p "$pool_port"
wait_pong -p "$pool_tls_port"
wait_pong -p "$hap_port" "${auth[@]}"
wait_pong -p "$hap_tls_port" "${auth[@]}"

cpu_ticks() { if [ -n "$1" ]; then awk '{ print $14 + $15 }' "/proc/$1/stat"; else echo 0; fi; }
rss_kib() { awk -v k="$2" '$1 == k ":" { print $2 }' "/proc/$1/status"; }

# --- RSS per idle session, on proxies that have not relayed traffic yet ---
cat > "$work/idle.py" <<'EOT'
import asyncio, sys
port, n, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
auth = sys.argv[4:]
def cmd(*args):
    return b"".join([b"*%d\r\n" % len(args)] + [b"$%d\r\n%s\r\n" % (len(a), a) for a in args])
async def one(sem, held):
    async with sem:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        msg = (cmd(b"AUTH", *[a.encode() for a in auth]) if auth else b"") + cmd(b"PING")
        w.write(msg)
        want = b"+OK\r\n+PONG\r\n" if auth else b"+PONG\r\n"
        got = await asyncio.wait_for(r.readexactly(len(want)), 10)
        assert got == want, got
        held.append(w)
async def main():
    sem, held = asyncio.Semaphore(200), []
    await asyncio.gather(*(one(sem, held) for _ in range(n)))
    open(ready, "w").write(str(len(held)))
    await asyncio.sleep(120)  # killed by the caller long before
asyncio.run(main())
EOT
idle_per_session() { # name, port, pid, [auth...]: prints KiB per idle session
  local name=$1 port=$2 pid=$3; shift 3
  local ready="$work/idle-$name.ready" before after holder
  sleep 0.5
  before=$(rss_kib "$pid" VmRSS)
  python3 "$work/idle.py" "$port" "$idle" "$ready" "$@" 2>"$work/idle-$name.log" &
  holder=$!
  pids+=("$holder")
  for _ in $(seq 600); do [ -s "$ready" ] && break; kill -0 "$holder" 2>/dev/null || break; sleep 0.1; done
  [ -s "$ready" ] || { echo "idle clients through $name failed: $(tail -3 "$work/idle-$name.log")" >&2; kill "$holder"; echo "-"; return; }
  sleep 0.5
  after=$(rss_kib "$pid" VmRSS)
  kill "$holder"; wait "$holder" 2>/dev/null || true
  python3 -c "print(f'{($after - $before) / $idle:.1f} KiB  ({$before} -> {$after} KiB VmRSS)')"
}
echo "redis $(redis-server --version | grep -o 'v=[^ ]*'), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(nproc) cores shared by every process; mode $mode: $rounds rounds"
echo "ambassador: $ambassador_bin (defaults: no pool); pooled: the same with upstream.pool_size = $pool_size"
if [ "$mode" = full ] || [ "$mode" = smoke ]; then
  cat > "$work/big.py" <<'EOT'
import socket, sys
port, auth = int(sys.argv[1]), sys.argv[2:]
size, chunk = 256 << 20, b"x" * (1 << 20)
s = socket.create_connection(("127.0.0.1", port), timeout=60)
if auth:
    s.sendall(b"*3\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(auth[0]), auth[0].encode(), len(auth[1]), auth[1].encode()))
s.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n" % size)
for _ in range(size >> 20):
    s.sendall(chunk)
s.sendall(b"\r\n*2\r\n$3\r\nDEL\r\n$3\r\nbig\r\n")
want = (b"+OK\r\n" if auth else b"") + b"+OK\r\n:1\r\n"
got = b""
while len(got) < len(want):
    data = s.recv(64)
    if not data:
        break
    got += data
assert got == want, got
EOT
  echo
  echo "Peak RSS while relaying one 256 MiB SET (VmRSS before -> VmHWM after; the peak is reset first):"
  for p in "ambassador $amb_port $amb_pid" "haproxy $hap_port $hap_pid"; do
    read -r name port pid <<<"$p"
    echo 5 > "/proc/$pid/clear_refs"  # resets VmHWM to the current RSS
    before=$(rss_kib "$pid" VmRSS)
    if [ "$name" = ambassador ]; then timeout 120 python3 "$work/big.py" "$port"; else timeout 120 python3 "$work/big.py" "$port" bench bench-pass; fi
    echo "  $name  $before -> $(rss_kib "$pid" VmHWM) KiB"
  done
fi

echo
echo "RSS per idle session ($idle clients that each did one PING, held open):"
echo "  ambassador  $(idle_per_session ambassador "$amb_port" "$amb_pid")"
# Wait for Redis to see the ambassador's upstream connections close before HAProxy's turn.
for _ in $(seq 100); do
  n=$(redis-cli --no-auth-warning -p "$redis_port" "${auth[@]}" INFO clients | awk -F: '/^connected_clients/ { print $2+0 }')
  [ "$n" -lt $((2 * pool_size + 10)) ] && break; sleep 0.1
done
echo "  haproxy     $(idle_per_session haproxy "$hap_port" "$hap_pid" bench bench-pass)"

# --- throughput and latency ---
rb() { # out, n, redis-benchmark args...: appends "rps p50 p99"
  local n=$1; shift
  timeout 300 redis-benchmark -h 127.0.0.1 -n "$n" --csv "$@" 2>>"$work/redis-benchmark.log" |
    python3 -c '
import csv, sys
rows = [r for r in csv.reader(sys.stdin)]
d = dict(zip(rows[0], rows[1])) if len(rows) > 1 else {}
print(d.get("rps", "nan"), d.get("p50_latency_ms", "nan"), d.get("p99_latency_ms", "nan"))'
}
args_of() { # runner, tls(0/1)
  case $1:$2 in
    direct:0) printf '%s\n' -p "$redis_port" "${auth[@]}" ;;
    direct:1) printf '%s\n' -p "$tls_port" "${tls_client[@]}" "${auth[@]}" ;;
    ambassador:0) printf '%s\n' -p "$amb_port" ;;
    ambassador:1) printf '%s\n' -p "$amb_tls_port" ;;
    pooled:0) printf '%s\n' -p "$pool_port" ;;
    pooled:1) printf '%s\n' -p "$pool_tls_port" ;;
    haproxy:0) printf '%s\n' -p "$hap_port" "${auth[@]}" ;;
    haproxy:1) printf '%s\n' -p "$hap_tls_port" "${auth[@]}" ;;
  esac
}
pid_of() {
  case $1:$2 in
    ambassador:0) echo "$amb_pid" ;; ambassador:1) echo "$amb_tls_pid" ;;
    pooled:0) echo "$pool_pid" ;; pooled:1) echo "$pool_tls_pid" ;;
    haproxy:*) echo "$hap_pid" ;; *) echo ;;
  esac
}

: > "$work/results"
# name | test | pipeline | value size | keepalive | clients | tls | requests (quick; full: x scale)
workloads=(
  "SET 16 B, pipeline 1|set|1|16|1|50|0|20000"
  "GET 16 B, pipeline 1|get|1|16|1|50|0|20000"
  "SET 16 B, pipeline 16|set|16|16|1|50|0|100000"
  "GET 16 B, pipeline 16|get|16|16|1|50|0|100000"
  "SET 64 KiB|set|1|65536|1|50|0|3000"
  "GET 64 KiB|get|1|65536|1|50|0|3000"
  "SET, new connection per request, 50 clients|set|1|16|0|50|0|3000"
  "SET, new connection per request, 1 client|set|1|16|0|1|0|1000"
  "SET, new connection per request over TLS, 50 clients|set|1|16|0|50|1|1000"
)
for w in "${workloads[@]}"; do
  IFS='|' read -r name test pipeline size keepalive clients tls n <<<"$w"
  n=$((n * scale))
  [ "$mode" != smoke ] || n=$((n < 2000 ? n : 2000))
  runners=(direct ambassador haproxy)
  [ "$keepalive" = 1 ] || runners+=(pooled)
  for round in $(seq "$rounds"); do
    for i in "${!runners[@]}"; do
      runner=${runners[$(( (i + round) % ${#runners[@]} ))]}
      mapfile -t args < <(args_of "$runner" "$tls")
      pid=$(pid_of "$runner" "$tls")
      before=$(cpu_ticks "$pid")
      result=$(rb "$n" "${args[@]}" -t "$test" -P "$pipeline" -d "$size" -k "$keepalive" -c "$clients")
      after=$(cpu_ticks "$pid")
      printf '%s|%s|%s|%s|%s|%s\n' "$name" "$round" "$runner" "$n" "$result" "$((after - before))" >> "$work/results"
    done
  done
done

python3 - "$work/results" "$(getconf CLK_TCK)" <<'EOT'
import collections, math, statistics, sys
path, hz = sys.argv[1], int(sys.argv[2])
data = collections.OrderedDict()
for line in open(path):
    name, rnd, runner, n, result, ticks = line.rstrip("\n").split("|")
    rps, p50, p99 = map(float, result.split())
    data.setdefault(name, collections.defaultdict(list))[runner].append((rps, p50, p99, int(ticks), int(n)))
med = lambda xs: statistics.median(xs) if xs else math.nan
print("\nmedians of the rounds (CPU: the sum over the rounds, as clock ticks are coarse)")
for name, by in data.items():
    m = {}
    for r, vs in by.items():
        cpu = sum(v[3] for v in vs) / hz / (sum(v[4] for v in vs) / 1e6) if r != "direct" else math.nan
        m[r] = [med([v[i] for v in vs]) for i in range(3)] + [cpu]
    print(f"\n{name}")
    print(f"  {'':11} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'/direct':>7} {'/haproxy':>8} {'CPU s/M req':>11}")
    for r in ("direct", "ambassador", "haproxy", "pooled"):
        if r not in m:
            continue
        rps, p50, p99, cpu = m[r]
        cpu_s = "-" if math.isnan(cpu) else f"{cpu:.1f}"
        print(f"  {r:11} {rps:9.0f} {p50:7.3f} {p99:7.3f} {rps / m['direct'][0]:7.2f} {rps / m['haproxy'][0]:8.2f} {cpu_s:>11}")
EOT
