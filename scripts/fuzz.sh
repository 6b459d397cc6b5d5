#!/usr/bin/env bash
# make fuzz: schemathesis against the live OpenAPI spec of `imagesmith serve` (a throwaway home, loopback), every
# operation, EXAMPLES generated cases each (default 150: over 1,000 requests in all); fails on any 5xx.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
EXAMPLES=${EXAMPLES:-150}
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
HOME_DIR=$(mktemp -d)
export IMAGESMITH_HOME=$HOME_DIR
export IMAGESMITH_RATE_PER_MINUTE=${IMAGESMITH_RATE_PER_MINUTE:-1000000}  # fuzz the routes, not the rate limiter
$BIN/pip show schemathesis >/dev/null 2>&1 || $BIN/pip install -q "schemathesis>=4,<5"
$BIN/imagesmith serve --port "$PORT" > "$HOME_DIR/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -rf "$HOME_DIR"' EXIT
for _ in $(seq 1 120); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.5; done
$BIN/st run "http://127.0.0.1:$PORT/openapi.json" --checks not_a_server_error --max-examples "$EXAMPLES" \
  --phases examples,fuzzing --seed "${SEED:-1}" ${ST_ARGS:-} | tee "$HOME_DIR/fuzz.log" | tail -25
grep -q "Server error" "$HOME_DIR/fuzz.log" && { echo "fuzz: 5xx responses found"; exit 1; }
echo "fuzz: $(grep -Eo '[0-9]+ generated' "$HOME_DIR/fuzz.log") cases, no 5xx"
