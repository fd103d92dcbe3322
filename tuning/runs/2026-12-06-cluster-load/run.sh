#!/bin/sh
# Cluster mode (--cluster postgres) under load: loadtest cluster, 3 rounds per setting.
# PostgreSQL 15 on the same 2-vCPU VM (port 55999, wal_level=logical, fsync on), database lt.
# Usage: tuning/runs/2026-12-06-cluster-load/run.sh   (from the repository root, release builds)
set -e
DB=postgres://postgres@127.0.0.1:55999/lt
OUT=tuning/runs/2026-12-06-cluster-load
PSQL="psql -h 127.0.0.1 -p 55999 -U postgres -qX"
LT=target/release/loadtest
for zero in on off; do
  $PSQL -c "alter system set wal_init_zero=$zero" -c "select pg_reload_conf()" >/dev/null
  for i in 1 2 3; do
    echo "== latency, 3 nodes, 24 subscribers, 10000 msgs/s, wal_init_zero=$zero, round $i"
    $LT cluster --database-url $DB --nodes 3 --subscribers 24 --rate 10000 --seconds 10 --mode latency --out $OUT/json 2>&1 | grep -v "DEVELOPMENT MODE"
  done
done
$PSQL -c "alter system reset wal_init_zero" -c "select pg_reload_conf()" >/dev/null
for i in 1 2 3; do
  echo "== ceiling, 3 nodes, round $i"
  $LT cluster --database-url $DB --nodes 3 --seconds 10 --mode ceiling --out $OUT/json 2>&1 | grep -v "DEVELOPMENT MODE"
done
