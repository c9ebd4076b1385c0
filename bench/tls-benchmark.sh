#!/usr/bin/env bash
# Throughput toward a TLS-only Redis, in one run, with redis-benchmark (50 clients):
#   direct      redis-benchmark --tls straight to Redis (the client does TLS and AUTH itself)
#   ambassador  plain TCP to the ambassador, which does TLS and injects AUTH
#   stunnel     plain TCP to stunnel (client mode), which does TLS; AUTH from the client
#   haproxy     plain TCP to HAProxy (`server ... ssl verify required`); AUTH from the client
# Workloads: SET and GET with pipelines of 1 on kept-alive connections, then SET with one new
# connection per request (-k 0), which is dominated by connection set-up: TCP, the TLS
# handshake (resumed by the proxies that cache sessions) and AUTH. stunnel and HAProxy are
# measured when installed (apt-get install -y stunnel4 haproxy). Loopback only; every run is
# bounded by -n.
#
# Every workload runs `rounds` times; within a round direct and each proxy run back to back,
# in an order that rotates from round to round. Prints the median requests per second of
# each, its ratio to direct, and the ambassador's median against HAProxy's.
#
#   bash bench/tls-benchmark.sh [requests] [requests with -k 0] [rounds]
#   (defaults: 100000, 10000, 5)
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

rps() { # n, keepalive, test, redis-benchmark args...
  local n=$1 keepalive=$2 test=$3; shift 3
  redis-benchmark -h 127.0.0.1 "$@" -c 50 -n "$n" -P 1 -k "$keepalive" -t "$test" --csv -q 2>/dev/null |
    awk -F, 'NR>1 || !/test/ { gsub(/"/, "", $2); print $2; exit }'
}

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
port_args() { # runner: the redis-benchmark arguments that reach it
  case $1 in
    direct) printf '%s\n' -p "$tls_port" "${tls_client[@]}" "${auth[@]}" ;;
    *) printf '%s\n' -p "$(port_of "$1")"; auth_of "$1" ;;
  esac
}

echo "redis $(redis-server --version | grep -o 'v=[^ ]*'), $(nproc) cores shared by redis-server, the proxy and redis-benchmark; median of $rounds rounds"
runners=(direct "${proxies[@]}")
printf '%-5s %-3s %10s' test k direct
for proxy in "${proxies[@]}"; do printf ' %10s %5s' "$proxy" ratio; done
[[ " ${proxies[*]} " == *" haproxy "* ]] && printf ' %18s' ambassador/haproxy
printf '\n'
for workload in "set 1 $requests" "get 1 $requests" "set 0 $reconnect_requests"; do
  read -r test keepalive n <<<"$workload"
  declare -A runs=()
  for round in $(seq "$rounds"); do
    for i in "${!runners[@]}"; do
      runner=${runners[$(( (i + round) % ${#runners[@]} ))]}
      mapfile -t args < <(port_args "$runner")
      runs[$runner]+="$(rps "$n" "$keepalive" "$test" "${args[@]}") "
    done
  done
  declare -A med=()
  for runner in "${runners[@]}"; do
    med[$runner]=$(printf '%s\n' ${runs[$runner]} | median)
  done
  printf '%-5s %-3s %10.0f' "$test" "$keepalive" "${med[direct]}"
  for proxy in "${proxies[@]}"; do
    printf ' %10.0f %5s' "${med[$proxy]}" "$(ratio "${med[$proxy]}" "${med[direct]}")"
  done
  [ -n "${med[haproxy]:-}" ] && printf ' %18s' "$(ratio "${med[ambassador]}" "${med[haproxy]}")"
  printf '\n'
  unset runs med
done
