# Shared by the benchmark scripts: tool checks, a release build, a scratch folder whose
# processes are killed (by PID) on exit, ephemeral loopback ports, and medians.

require_tools() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$tool missing: apt-get install redis-server redis-tools openssl python3 haproxy" >&2; exit 1; }
  done
}

# Sets $work and $ambassador_bin (AMBASSADOR_BIN, or the release build of this checkout, built
# into CARGO_TARGET_DIR if set), and kills every PID added to $pids when the script exits.
start_scratch() {
  if [ -n "${AMBASSADOR_BIN:-}" ]; then
    ambassador_bin=$AMBASSADOR_BIN
  else
    cargo build --release --quiet
    ambassador_bin=${CARGO_TARGET_DIR:-target}/release/redis-ambassador
  fi
  [ -x "$ambassador_bin" ] || { echo "no ambassador binary at $ambassador_bin" >&2; exit 1; }
  work=$(mktemp -d)
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
