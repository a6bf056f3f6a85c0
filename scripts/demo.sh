#!/usr/bin/env bash
# Set up .venv, start edge-agent on the bundled example models, run a scripted tour
# (predictions, hot swap, refusal, rollback, ...), then stop the agent. Exits 0 on success.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
echo "== installing edge-agent"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e . 2>&1 \
    | grep -v "^WARNING: Location" || true

work="$(mktemp -d)"
agent_pid=""
collector_pid=""
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    for pid in "$agent_pid" "$collector_pid"; do
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    rm -rf "$work"
}
trap cleanup EXIT

# start_agent CONFIG LOG: run edge-agent in the background; sets agent_pid and port.
start_agent() {
    echo "== starting edge-agent (log: $2)"
    .venv/bin/edge-agent run --config "$1" 2>"$2" &
    agent_pid=$!
    port=""
    for _ in $(seq 1 150); do
        port="$(sed -n 's/.*"port":\([0-9]*\).*"event":"server_listening".*/\1/p' "$2" | head -n1)"
        [ -n "$port" ] && return 0
        kill -0 "$agent_pid" 2>/dev/null || { cat "$2"; echo "agent exited"; exit 1; }
        sleep 0.2
    done
    cat "$2"
    echo "agent did not start"
    exit 1
}

# A drop dir with the examples, a private state dir, an ephemeral port.
mkdir -p "$work/models"
chmod 755 "$work/models"
cp -r examples/models/. "$work/models/"
# A drift baseline for the tabular model, from its training data (the operator's command).
echo "== edge-agent baseline (profile the training data and the model's outputs on it)"
.venv/bin/edge-agent baseline --model examples/models/breast_cancer.onnx \
    --data examples/data/breast_cancer_train.npy --manifest examples/models/breast_cancer.toml \
    -o "$work/models/breast_cancer_baseline.msgpack"
printf '\n[drift]\nbaseline = "breast_cancer_baseline.msgpack"\n' >> "$work/models/breast_cancer.toml"

# The reference collector stands in for the upstream service.
echo "== starting the reference collector (scripts/collector.py)"
.venv/bin/python scripts/collector.py --host 127.0.0.1 --port 0 --db "$work/collector.db" \
    --token demo-upstream-token >"$work/collector.log" 2>&1 &
collector_pid=$!
collector=""
for _ in $(seq 1 100); do
    collector="$(sed -n 's/^collector listening on \(http[^ ]*\).*/\1/p' "$work/collector.log" | head -n1)"
    [ -n "$collector" ] && break
    sleep 0.1
done
[ -n "$collector" ] || { cat "$work/collector.log"; echo "collector did not start"; exit 1; }
echo "== collector at $collector"

cat > "$work/config.toml" <<TOML
[server]
port = 0
[models]
dir = "$work/models"
settle_ms = 200
probation_s = 0
[state]
dir = "$work/state"
[drift]
min_rows = 100
[upstream]
url = "$collector/v1/batches"
token = "demo-upstream-token"
flush_interval_s = 1.0
[log]
format = "json"
access_log = false
TOML

start_agent "$work/config.toml" "$work/agent.log"
echo "== agent pid $agent_pid listening on http://127.0.0.1:$port"

.venv/bin/python scripts/demo_tour.py --url "http://127.0.0.1:$port" --drop "$work/models" \
    --collector "$collector" --collector-token demo-upstream-token

echo "== stopping edge-agent (SIGTERM: drain, flush, exit 0)"
kill -TERM "$agent_pid"
status=0
wait "$agent_pid" || status=$?
agent_pid=""
echo "agent exited with status $status"
[ "$status" -eq 0 ] || exit "$status"

# The same examples, served by two processes on one port ([server] processes = 2).
mkdir -p "$work/models2"
chmod 755 "$work/models2"
cp -r examples/models/. "$work/models2/"
cat > "$work/config2.toml" <<TOML
[server]
host = "127.0.0.1"
port = 0
processes = 2
[models]
dir = "$work/models2"
[state]
dir = "$work/state2"
[log]
format = "json"
access_log = false
TOML
echo "== with [server] processes = 2"
start_agent "$work/config2.toml" "$work/agent2.log"
.venv/bin/python scripts/demo_processes.py --url "http://127.0.0.1:$port"
echo "== stopping edge-agent (SIGTERM: the replica drains and hands over, then the primary)"
kill -TERM "$agent_pid"
status=0
wait "$agent_pid" || status=$?
agent_pid=""
echo "agent exited with status $status"
exit "$status"
