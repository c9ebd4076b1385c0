#!/usr/bin/env bash
# The ambassador on its embedded default profile (profiles/dev.toml), in front of a local
# password-protected redis-server that this script starts and stops. Then:
#   redis-cli -p 6379 ACL WHOAMI      -> "app", though redis-cli sent no password
# Ports: the ambassador on 127.0.0.1:6379, Redis on 127.0.0.1:6380 (as dev.toml says).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { echo "redis-server missing: apt-get install redis-server redis-tools" >&2; exit 1; }
work=$(mktemp -d)
printf 'user default off\nuser app on >dev-only-not-a-secret ~* &* +@all\n' > "$work/users.acl"
redis-server --port 6380 --bind 127.0.0.1 --save '' --appendonly no --aclfile "$work/users.acl" \
  --dir "$work" --logfile redis.log &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null; rm -rf "$work"' EXIT
echo "redis-server (password-protected) on 127.0.0.1:6380; ambassador on 127.0.0.1:6379"
echo "try: redis-cli -p 6379 ACL WHOAMI     (Ctrl-C to stop both)"
cargo run --release --quiet -- --profile dev "$@"
