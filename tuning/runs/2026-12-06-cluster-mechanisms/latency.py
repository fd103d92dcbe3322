#!/usr/bin/env python3
"""Emit → decoded latency of pg_logical_emit_message through a logical slot, as a node reading
the replication stream would see it. pgbench emits, at --rate per second, a message carrying
its clock_timestamp(); pg_recvlogical (test_decoding, which prints messages as text) reads the
slot; this script timestamps each decoded line. Usage: PGHOST=… PGPORT=… latency.py RATE SECS
TRANSACTIONAL(true|false)"""
import os, subprocess, sys, time, datetime, tempfile, threading
BIN = "/usr/lib/postgresql/15/bin"
rate, secs, tx = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
psql = [f"{BIN}/psql", "-X", "-q", "-At", "-U", "postgres", "-d", "bench", "-c"]
subprocess.run(psql + ["SELECT pg_drop_replication_slot('cm_lat')"], capture_output=True)
subprocess.run(psql + ["SELECT pg_create_logical_replication_slot('cm_lat', 'test_decoding')"], check=True, capture_output=True)
rx = subprocess.Popen([f"{BIN}/pg_recvlogical", "-U", "postgres", "-d", "bench", "--slot", "cm_lat", "--start",
                       "-o", "include-xids=0", "-f", "-", "-s", "1"], stdout=subprocess.PIPE, bufsize=0)
lat = []
def read():
    buf = b""
    while True:
        chunk = rx.stdout.read1(65536) if hasattr(rx.stdout, "read1") else os.read(rx.stdout.fileno(), 65536)
        if not chunk:
            return
        now = time.time()
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for l in lines:
            i = l.find(b"content:")
            if b"prefix: cclat" in l and i >= 0:
                sent = float(l[i + 8:].decode())
                lat.append((now - sent) * 1000)
t = threading.Thread(target=read, daemon=True); t.start()
time.sleep(1)
f = tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False)
f.write(f"SELECT pg_logical_emit_message({tx}, 'cclat', extract(epoch from clock_timestamp())::text);\n"); f.close()
subprocess.run([f"{BIN}/pgbench", "-n", "-U", "postgres", "-d", "bench", "-f", f.name, "-c", "2", "-j", "2",
                "-R", str(rate), "-T", str(secs)], capture_output=True)
time.sleep(1.5)
rx.terminate(); rx.wait()
subprocess.run(psql + ["SELECT pg_drop_replication_slot('cm_lat')"], capture_output=True)
os.unlink(f.name)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(f"transactional={tx} rate={rate}/s for {secs}s: decoded {len(lat)} of ~{rate*secs}; emit->decoded ms p50 {q(0.5):.2f} p99 {q(0.99):.2f} max {lat[-1]:.2f}")
