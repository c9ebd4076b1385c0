# Shared by the benchmark scripts: tool checks, a release build, a scratch folder whose
# processes are killed (by PID) on exit, ephemeral loopback ports, and medians.

require_tools() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$tool missing: apt-get install redis-server redis-tools openssl python3" >&2; exit 1; }
  done
}

# Sets $work, and kills every PID added to $pids when the script exits.
start_scratch() {
  cargo build --release --quiet
  work=$(mktemp -d)
  pids=()
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
