#!/usr/bin/env bash
# Throughput toward a TLS-only Redis, in one run, with redis-benchmark (50 clients):
#   direct      redis-benchmark --tls straight to Redis (the client does TLS and AUTH itself)
#   ambassador  plain TCP to the ambassador, which does TLS and injects AUTH
#   stunnel     plain TCP to stunnel (client mode), which does TLS; AUTH from the client
#   haproxy     plain TCP to HAProxy (`server ... ssl verify required`); AUTH from the client
# Workloads: SET and GET with pipelines of 1 on 50 kept-alive connections (throughput), GET
# from a single client (the latency the hop adds), then SET with one new connection per
# request (-k 0), which is dominated by connection set-up: TCP, the TLS handshake (resumed by
# the proxies that cache sessions) and AUTH. stunnel and HAProxy are measured when installed
# (apt-get install -y stunnel4 haproxy). Loopback only; every run is bounded by -n.
#
# Every workload runs `rounds` times; within a round direct and each proxy run back to back,
# in an order that rotates from round to round. Prints the median requests per second of
# each and its ratio to direct; the ambassador against HAProxy round by round (each pair ran
# seconds apart, so the ratio cancels most of a shared machine's drift); and the CPU time the
# proxy process spent per 10000 requests, which noise hardly moves.
#
#   bash bench/tls-benchmark.sh [requests] [requests with -k 0] [rounds]
#   (defaults: 100000, 10000, 5; the single client runs a fifth of the requests)
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-100000}
reconnect_requests=${2:-10000}
rounds=${3:-5}
. bench/lib.sh
require_tools redis-server redis-cli redis-benchmark openssl python3
start_scratch

# A CA and a server certificate for localhost and 127.0.0.1, fresh for this run.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=bench CA" -keyout "$work/ca-key.pem" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
  -keyout "$work/server-key.pem" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$work/ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca-key.pem" \
  -CAcreateserial -days 2 -extfile "$work/ext" -out "$work/server.pem" 2>/dev/null

tls_port=$(free_port)
printf 'user default off\nuser bench on >bench-pass ~* &* +@all\n' > "$work/users.acl"
redis-server --port 0 --tls-port "$tls_port" --bind 127.0.0.1 --save '' --appendonly no \
  --tls-cert-file "$work/server.pem" --tls-key-file "$work/server-key.pem" \
  --tls-ca-cert-file "$work/ca.pem" --tls-auth-clients no \
  --aclfile "$work/users.acl" --dir "$work" --logfile redis.log &
pids+=($!)

printf 'username = "bench"\npassword = "bench-pass"\n' > "$work/creds.toml"
amb_port=$(free_port)
cat > "$work/bench.toml" <<EOF
[listen]
address = "127.0.0.1:$amb_port"
[upstream]
address = "127.0.0.1:$tls_port"
[upstream.tls]
server_name = "localhost"
ca_file = "$work/ca.pem"
[credentials]
file = "$work/creds.toml"
EOF
RUST_LOG=warn ./target/release/redis-ambassador --config-dir "$work" --profile bench &
pids+=($!)
declare -A pid_of=([ambassador]=$!)

proxies=(ambassador)
if command -v stunnel4 >/dev/null || command -v stunnel >/dev/null; then
  stunnel_port=$(free_port)
  cat > "$work/stunnel.conf" <<EOF
foreground = yes
pid =
debug = 3
output = $work/stunnel.log
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
[redis]
client = yes
accept = 127.0.0.1:$stunnel_port
connect = 127.0.0.1:$tls_port
sni = localhost
verifyChain = yes
checkHost = localhost
CAfile = $work/ca.pem
EOF
  "$(command -v stunnel4 || command -v stunnel)" "$work/stunnel.conf" &
  pids+=($!)
  pid_of[stunnel]=$!
  proxies+=(stunnel)
else
  echo "stunnel not installed: skipped (apt-get install -y stunnel4)" >&2
fi
if command -v haproxy >/dev/null; then
  haproxy_port=$(free_port)
  cat > "$work/haproxy.cfg" <<EOF
global
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend redis
  bind 127.0.0.1:$haproxy_port
  default_backend tls
backend tls
  server redis 127.0.0.1:$tls_port ssl verify required ca-file $work/ca.pem sni str(localhost) verifyhost localhost
EOF
  haproxy -db -f "$work/haproxy.cfg" 2>"$work/haproxy.log" &
  pids+=($!)
  pid_of[haproxy]=$!
  proxies+=(haproxy)
else
  echo "haproxy not installed: skipped (apt-get install -y haproxy)" >&2
fi

auth=(--user bench -a bench-pass)
tls_client=(--tls --cacert "$work/ca.pem" --sni localhost)
port_of() { case $1 in ambassador) echo "$amb_port";; stunnel) echo "$stunnel_port";; haproxy) echo "$haproxy_port";; esac; }
auth_of() { [ "$1" = ambassador ] || printf '%s\n' "${auth[@]}"; }

wait_pong() { # redis-cli args...
  for _ in $(seq 100); do
    redis-cli --no-auth-warning "$@" PING 2>/dev/null | grep -q PONG && return 0
    sleep 0.1
  done
  echo "no PONG from: redis-cli $*" >&2; exit 1
}
wait_pong -p "$tls_port" "${tls_client[@]}" "${auth[@]}"
for proxy in "${proxies[@]}"; do
  mapfile -t proxy_auth < <(auth_of "$proxy")
  wait_pong -p "$(port_of "$proxy")" "${proxy_auth[@]}"
done

rps() { # n, keepalive, clients, test, redis-benchmark args...
  local n=$1 keepalive=$2 clients=$3 test=$4; shift 4
  redis-benchmark -h 127.0.0.1 "$@" -c "$clients" -n "$n" -P 1 -k "$keepalive" -t "$test" --csv -q 2>/dev/null |
    awk -F, 'NR>1 || !/test/ { gsub(/"/, "", $2); print $2; exit }'
}
port_args() { # runner: the redis-benchmark arguments that reach it
  case $1 in
    direct) printf '%s\n' -p "$tls_port" "${tls_client[@]}" "${auth[@]}" ;;
    *) printf '%s\n' -p "$(port_of "$1")"; auth_of "$1" ;;
  esac
}
cpu_ticks() { # pid: user + system time so far, in clock ticks
  if [ -n "$1" ]; then awk '{ print $14 + $15 }' "/proc/$1/stat"; else echo 0; fi
}

echo "redis $(redis-server --version | grep -o 'v=[^ ]*'), $(nproc) cores shared by redis-server, the proxy and redis-benchmark; $rounds rounds"
runners=(direct "${proxies[@]}")
: > "$work/results"
# test, -k, clients, requests. One client shows the latency a hop adds; 50 the throughput.
for workload in "set 1 50 $requests" "get 1 50 $requests" "get 1 1 $((requests / 5))" \
  "set 0 50 $reconnect_requests"; do
  read -r test keepalive clients n <<<"$workload"
  for round in $(seq "$rounds"); do
    for i in "${!runners[@]}"; do
      runner=${runners[$(( (i + round) % ${#runners[@]} ))]}
      mapfile -t args < <(port_args "$runner")
      pid=${pid_of[$runner]:-}
      before=$(cpu_ticks "$pid")
      rate=$(rps "$n" "$keepalive" "$clients" "$test" "${args[@]}")
      after=$(cpu_ticks "$pid")
      echo "$test $keepalive $clients $n $round $runner $rate $((after - before))" >> "$work/results"
    done
  done
done
python3 - "$work/results" "$(getconf CLK_TCK)" "${runners[@]}" <<'EOF'
import collections, statistics, sys
path, hz, runners = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
proxies = runners[1:]
rate, cpu = collections.defaultdict(dict), collections.defaultdict(dict)
for line in open(path):
    test, k, c, n, rnd, runner, r, ticks = line.split()
    w = (test, k, c)
    rate[w].setdefault(runner, {})[rnd] = float(r)
    cpu[w].setdefault(runner, []).append(int(ticks) * 1000 / hz / (int(n) / 10000))
med = statistics.median
print("\nrequests/s, median of the rounds (ratio to direct)")
head = f"{'test':5} {'k':>2} {'c':>3} {'direct':>9}" + "".join(f" {p:>10} {'ratio':>5}" for p in proxies)
vs = "haproxy" in proxies
print(head + ("   ambassador/haproxy by round: median (lowest-highest)" if vs else ""))
for w, by in rate.items():
    d = med(by["direct"].values())
    row = f"{w[0]:5} {w[1]:>2} {w[2]:>3} {d:9.0f}"
    for p in proxies:
        m = med(by[p].values())
        row += f" {m:10.0f} {m / d:5.2f}"
    if vs:
        rs = [by["ambassador"][r] / by["haproxy"][r] for r in by["haproxy"]]
        row += f"   {med(rs):.2f} ({min(rs):.2f}-{max(rs):.2f})"
    print(row)
print("\nCPU time of the proxy process, ms per 10000 requests (median of the rounds)")
print(f"{'test':5} {'k':>2} {'c':>3}" + "".join(f" {p:>10}" for p in proxies))
for w, by in cpu.items():
    print(f"{w[0]:5} {w[1]:>2} {w[2]:>3}" + "".join(f" {med(by[p]):10.0f}" for p in proxies))
EOF
