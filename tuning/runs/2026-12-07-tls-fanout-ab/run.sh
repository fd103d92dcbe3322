#!/usr/bin/env bash
# Fan-out A/B of the TLS commit's plain path (base 7ce7e63 vs 36dac06, alternating, 2 rounds),
# and the TLS handshake cost measured with `openssl s_time` (full handshakes, no resumption).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for r in 1 2; do
  for b in /tmp/corecast-7ce7e63 /tmp/corecast-36dac06; do
    ./target/release/loadtest compare fanout --subscribers 5000 --seconds 10 --servers corecast --no-baseline --corecast-bin "$b"
  done
done
d=$(mktemp -d)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$d/key.pem" -out "$d/cert.pem" 2>/dev/null
taskset -c 0 /tmp/corecast-36dac06 --listen 127.0.0.1:4443 --shards 1 --cpus 0 --tls-cert "$d/cert.pem" --tls-key "$d/key.pem" --data-dir "$d/data" >/dev/null 2>&1 &
pid=$!; sleep 1
t0=$(awk '{print $14+$15}' /proc/$pid/stat)
taskset -c 1 openssl s_time -connect 127.0.0.1:4443 -new -time 10 -www /health
t1=$(awk '{print $14+$15}' /proc/$pid/stat)
echo "server CPU: $((t1 - t0)) ticks of 10 ms"
kill $pid
