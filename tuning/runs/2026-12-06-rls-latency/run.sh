#!/bin/bash
# A/B: the same generator (loadtest pg at HEAD) against corecast before (221c9a5) and after (HEAD),
# alternating, each scenario twice, on an otherwise idle machine.
ulimit -n 20000
DB=postgres://postgres@127.0.0.1:55999/bench
B=/tmp/rls2/bin
OUT=${OUT:-/tmp/rls2/out}
mkdir -p $OUT
run() { # name args...
  local name=$1; shift
  for rep in 1 2; do
  for v in before after; do
    { echo "### $name $v (run $rep)  $(date -u +%FT%TZ)  loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
      echo "\$ loadtest pg --database-url $DB --corecast $v-corecast $*"
      $B/loadtest pg --database-url $DB --corecast $B/$v-corecast "$@" --json $OUT/$name-$v-$rep.json 2>&1 | grep -v -e DEVELOPMENT -e "Supabase Realtime (published)"
      echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)"; echo
    } >> $OUT/$name.txt
  done
  done
}
run rlslat-ownfilter-1000 --mode rls-latency --users 1000 --rate 1000 --seconds 10 --rls-own-filter
run rlslat-nofilter-1000 --mode rls-latency --users 1000 --rate 1000 --seconds 10
run rlslat-nofilter-100 --mode rls-latency --users 1000 --rate 100 --seconds 10
run rlslat-nofilter-20 --mode rls-latency --users 1000 --rate 20 --seconds 10
run rls-throughput --mode rls --users 1000
run latency-norls --mode latency --subscribers 100 --rate 1000 --seconds 10
echo DONE >> $OUT/done
