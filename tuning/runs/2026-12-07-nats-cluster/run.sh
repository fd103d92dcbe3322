#!/bin/sh
# Cluster mode over NATS (--cluster nats://…) under load: loadtest cluster --backend nats, which
# starts its own nats-server -js (Debian's 2.9.10, unpinned, fresh store) and 3 corecast nodes
# (--shards 1, all on CPU 0; generator on CPU 1). Postgres backend once more in the same session
# for comparison (PostgreSQL 15 on this VM, port 55999, database lt).
# Usage: tuning/runs/2026-12-07-nats-cluster/run.sh   (from the repository root, release builds)
set -e
OUT=tuning/runs/2026-12-07-nats-cluster
LT=target/release/loadtest
q() { grep -v "DEVELOPMENT MODE\|max_payload is below"; }
for i in 1 2 3; do
  echo "== nats latency, 3 nodes, 24 subscribers, 10000 msgs/s, round $i"
  $LT cluster --backend nats --nodes 3 --subscribers 24 --rate 10000 --seconds 10 --mode latency --out $OUT/json 2>&1 | q
done
for i in 1 2 3; do
  echo "== nats ceiling, 3 nodes, round $i"
  $LT cluster --backend nats --nodes 3 --seconds 10 --mode ceiling --out $OUT/json 2>&1 | q
done
echo "== nats ceiling, 1 node"
$LT cluster --backend nats --nodes 1 --seconds 10 --mode ceiling --out $OUT/json 2>&1 | q
echo "== ceiling, one --cluster none node (what the cluster adds)"
$LT cluster --backend nats --seconds 10 --mode ceiling-single --out $OUT/json 2>&1 | q
if [ -n "$DATABASE_URL" ]; then
  echo "== postgres ceiling, 3 nodes (same session)"
  $LT cluster --backend postgres --nodes 3 --seconds 10 --mode ceiling --out $OUT/json 2>&1 | q
fi
