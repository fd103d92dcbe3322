#!/bin/bash
# Candidate cross-node mechanisms in PostgreSQL 15, measured with pgbench on this machine while
# three consumers read the stream as three nodes would. Usage: PGHOST=… PGPORT=… run.sh OUTDIR
# (a database `bench` on a server with wal_level=logical, max_replication_slots >= 3).
set -u
OUT=${1:-.}; mkdir -p "$OUT"
BIN=/usr/lib/postgresql/15/bin
PSQL="$BIN/psql -X -q -At -U postgres -d bench"
SECS=${SECS:-10}
W=$(mktemp -d)
cat > $W/emit1.sql <<'Q'
SELECT pg_logical_emit_message(true, 'corecast', repeat('x', 100));
Q
cat > $W/emit100.sql <<'Q'
SELECT pg_logical_emit_message(true, 'corecast', repeat('x', 10000));
Q
cat > $W/emitnt1.sql <<'Q'
SELECT pg_logical_emit_message(false, 'corecast', repeat('x', 100));
Q
cat > $W/notify1.sql <<'Q'
SELECT pg_notify('corecast', repeat('x', 100));
Q
cat > $W/notify70.sql <<'Q'
SELECT pg_notify('corecast', repeat('x', 7000));
Q
cat > $W/insert1.sql <<'Q'
INSERT INTO cluster_log(payload) VALUES (repeat('x', 100));
Q
cat > $W/insert100.sql <<'Q'
INSERT INTO cluster_log(payload) SELECT repeat('x', 100) FROM generate_series(1, 100);
Q
$PSQL -c "DROP TABLE IF EXISTS cluster_log; CREATE TABLE cluster_log (id bigserial PRIMARY KEY, payload text)"
# Three "nodes": each a logical slot read by pg_recvlogical (test_decoding prints messages as
# text, with include-xids off), and each a LISTEN session.
pids=()
for n in 1 2 3; do
  $PSQL -c "SELECT pg_drop_replication_slot('cm_node$n')" >/dev/null 2>&1
  $PSQL -c "SELECT pg_create_logical_replication_slot('cm_node$n', 'test_decoding')" >/dev/null
  $BIN/pg_recvlogical -U postgres -d bench --slot cm_node$n --start -o include-xids=0 -f /dev/null -s 1 &
  pids+=($!)
  $PSQL -c "LISTEN corecast; SELECT pg_sleep(100000)" >/dev/null 2>&1 &
  pids+=($!)
done
sleep 1
row() { # name msgs-per-tx clients
  local name=$1 per=$2 c=$3
  local tps
  tps=$($BIN/pgbench -n -U postgres -d bench -f $W/$name.sql -c $c -j $c -T $SECS 2>/dev/null | awk '/^tps = /{print $3}')
  printf '| %s | %s | %s | %.0f | %.0f |\n' "$name" "$per" "$c" "$tps" "$(echo "$tps * $per" | bc -l)"
}
{
  echo "| script | msgs per tx | clients | tx/s | msgs/s |"
  echo "|---|---:|---:|---:|---:|"
  for c in 1 4; do
    row emit1 1 $c; row emit100 100 $c; row emitnt1 1 $c; row notify1 1 $c; row notify70 70 $c; row insert1 1 $c; row insert100 100 $c
  done
} | tee "$OUT/throughput.md"
# Slot lag after the runs: every node must have decoded everything.
sleep 2
$PSQL -c "SELECT slot_name, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)) FROM pg_replication_slots WHERE slot_name LIKE 'cm_node%'" | tee "$OUT/slot-lag.txt"
kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null
for n in 1 2 3; do $PSQL -c "SELECT pg_drop_replication_slot('cm_node$n')" >/dev/null 2>&1; done
rm -rf $W
