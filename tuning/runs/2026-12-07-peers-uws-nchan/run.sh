#!/usr/bin/env bash
# Reproduces the runs in this directory: corecast against nats, ws, Socket.IO, uWebSockets.js
# and nchan (loadtest compare; server on CPU 0, generator on CPU 1). Needs:
#   apt-get install -y nats-server nginx-light libnginx-mod-nchan   (Node 20 + npm for the rest)
#   cargo build --release --bin corecast && cargo build --release -p loadtest
# CORECAST_BIN: the corecast under test (default target/release/corecast).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=tuning/runs/2026-12-07-peers-uws-nchan
bin=${CORECAST_BIN:-target/release/corecast}
lt=${LOADTEST:-target/release/loadtest}
ulimit -n 20000 || true
run() { echo "== uptime: $(uptime)" | tee -a "$out/uptime.txt"; "$lt" "$@" --corecast-bin "$bin" --out "$out" 2>&1; }
run compare fanout --subscribers 5000 --seconds 10 -q | tee "$out/fanout.txt"
run compare connect-storm --subscribers 5000 -q | tee "$out/connect-storm.txt"
run compare idle --subscribers 5000 -q | tee "$out/idle.txt"
run compare sse --subscribers 1000 --servers corecast,nchan -q | tee "$out/sse.txt"
run compare fanout --subscribers 5000 --sweep | tee "$out/fanout-sweep.txt"
