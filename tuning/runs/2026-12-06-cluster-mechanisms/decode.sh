#!/bin/bash
# How fast three "nodes" decode what the writers emit: pgoutput slots (messages=true), each
# read by pg_recvlogical; pgbench emits batched messages (100 x 100 B per call) for SECS, then
# we time until every slot has confirmed everything. Usage: PGHOST=… PGPORT=… decode.sh
set -u
BIN=/usr/lib/postgresql/15/bin
PSQL="$BIN/psql -X -q -At -U postgres -d bench"
SECS=${SECS:-10}; CLIENTS=${CLIENTS:-4}; NODES=${NODES:-3}
W=$(mktemp -d)
echo "SELECT pg_logical_emit_message(true, 'corecast', repeat('x', 10000));" > $W/emit100.sql
$PSQL -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname='cm') THEN CREATE PUBLICATION cm; END IF; END \$\$"
pids=()
for n in $(seq 1 $NODES); do
  $PSQL -c "SELECT pg_drop_replication_slot('cm_dec$n')" >/dev/null 2>&1
  $PSQL -c "SELECT pg_create_logical_replication_slot('cm_dec$n', 'pgoutput')" >/dev/null
  $BIN/pg_recvlogical -U postgres -d bench --slot cm_dec$n --start -o proto_version=1 -o publication_names=cm -o messages=true -f /dev/null -s 1 -F 1 &
  pids+=($!)
done
sleep 1
start_lsn=$($PSQL -c "SELECT pg_current_wal_lsn()")
t0=$(date +%s.%N)
tps=$($BIN/pgbench -n -U postgres -d bench -f $W/emit100.sql -c $CLIENTS -j $CLIENTS -T $SECS 2>/dev/null | awk '/^tps = /{print $3}')
t1=$(date +%s.%N)
end_lsn=$($PSQL -c "SELECT pg_current_wal_lsn()")
while :; do
  lag=$($PSQL -c "SELECT coalesce(max(pg_wal_lsn_diff('$end_lsn', confirmed_flush_lsn)), 0) FROM pg_replication_slots WHERE slot_name LIKE 'cm_dec%'")
  [ "${lag%.*}" -le 0 ] && break
  sleep 0.2
done
t2=$(date +%s.%N)
wal=$($PSQL -c "SELECT pg_wal_lsn_diff('$end_lsn', '$start_lsn')")
msgs=$(echo "$tps * 100 * ($t1 - $t0)" | bc -l)
printf 'nodes %s, writers %s: emitted %.0f msgs (%.0f msgs/s, %.1f MB WAL) in %.1f s; every node had decoded and confirmed all of it %.1f s after the start: %.0f msgs/s end to end\n' \
  $NODES $CLIENTS "$msgs" "$(echo "$msgs / ($t1 - $t0)" | bc -l)" "$(echo "$wal / 1000000" | bc -l)" "$(echo "$t1 - $t0" | bc -l)" "$(echo "$t2 - $t0" | bc -l)" "$(echo "$msgs / ($t2 - $t0)" | bc -l)"
kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null
for n in $(seq 1 $NODES); do $PSQL -c "SELECT pg_drop_replication_slot('cm_dec$n')" >/dev/null 2>&1; done
rm -rf $W
