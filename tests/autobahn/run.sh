#!/usr/bin/env bash
# Autobahn TestSuite conformance run: the suite's `fuzzingclient` (every case, 1.* to 13.*)
# against examples/ws_echo.rs, an echo server on corecast's own WebSocket codec, built in
# release mode. Prints a table of behaviours and exits non-zero if any case FAILED.
#
#   tests/autobahn/run.sh            # set up (first run only), build, run, summarize
#   tests/autobahn/run.sh --setup    # only set up the Python 2.7 environment
#   tests/autobahn/run.sh --summary  # only summarize the last run's reports/index.json
#
# The suite runs on Python 2.7 only, which Debian 12 no longer ships. The interpreter comes
# from Debian 11's packages (python2.7, with libssl1.1 and libffi7), downloaded with apt into a
# private apt state and unpacked under the cache dir, so nothing is installed system-wide;
# pip 20.3.4 (the last for Python 2) then installs the pinned requirements.txt next to it.
# Everything is cached under $AUTOBAHN_CACHE (default target/autobahn) and redone only when
# this script or requirements.txt changes. Reports land in $AUTOBAHN_CACHE/reports
# (index.json, and index.html to browse).
#
# Environment: AUTOBAHN_CACHE (cache and report dir), AUTOBAHN_PORT (default 9001: the port is
# also in fuzzingclient.json, which is rewritten on the fly when it differs),
# AUTOBAHN_CASES (a comma-separated case list such as "1.*,7.*"; default every case),
# AUTOBAHN_TIMEOUT (seconds for the whole fuzzingclient run, default 900). The example's own
# WS_ECHO_* variables (size limits, see examples/ws_echo.rs) reach it as well.
# Needs: apt-get and dpkg-deb (Debian/Ubuntu, x86_64), gcc, python3 with pip, cargo.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/tests/autobahn
CACHE=${AUTOBAHN_CACHE:-$ROOT/target/autobahn}
PORT=${AUTOBAHN_PORT:-9001}
TIMEOUT=${AUTOBAHN_TIMEOUT:-900}
PYROOT=$CACHE/py27
SITE=$CACHE/site
TOOLS=$CACHE/tools
PY=$PYROOT/usr/bin/python2.7
# The Debian 11 packages that make a working Python 2.7 with ssl and ctypes, plus its headers
# (wsaccel, the suite's C masking and UTF-8 validation, is compiled from source).
DEBS="python2.7-minimal libpython2.7-minimal libpython2.7-stdlib python2.7 libssl1.1 libffi7
      libpython2.7-dev python2.7-dev"

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

log() { printf '[autobahn] %s\n' "$*" >&2; }

# Runs the unpacked Python 2.7 with its own libraries and packages only.
py27() {
    env -u PYTHONHOME -u PIP_FIND_LINKS -u PIP_REQUIRE_VIRTUALENV \
        LD_LIBRARY_PATH="$PYROOT/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        PYTHONPATH="$SITE:$TOOLS" AUTOBAHN_SITE="$SITE" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 "$PY" "$@"
}

setup() {
    local stamp want
    stamp=$CACHE/.setup-done
    want=$(cat "$0" "$HERE/requirements.txt" | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$PY" ]; then
        return
    fi
    [ "$(uname -m)" = x86_64 ] || { log "only x86_64 is set up by this script"; exit 2; }
    command -v apt-get >/dev/null || { log "needs apt-get (Debian/Ubuntu)"; exit 2; }
    command -v gcc >/dev/null || { log "needs gcc (to build wsaccel)"; exit 2; }
    python3 -m pip --version >/dev/null 2>&1 || { log "needs python3 with pip (apt-get install python3-pip)"; exit 2; }
    log "setting up Python 2.7 and the suite under $CACHE (once)"
    rm -rf "$PYROOT" "$SITE" "$TOOLS" "$CACHE/apt" "$stamp"

    # A private apt state that knows only Debian 11 (bullseye); the system's is not touched.
    local apt=$CACHE/apt
    mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/sources.list.d" "$apt/debs"
    : >"$apt/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main" \
        >"$apt/sources.list"
    local aptopts=(
        -o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/sources.list.d"
        -o "Dir::State::Lists=$apt/lists" -o "Dir::State::status=$apt/status"
        -o "Dir::Cache=$apt" -o "Dir::Cache::archives=$apt/archives"
        -o "APT::Architecture=amd64" -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1"
    )
    apt-get -q "${aptopts[@]}" update >/dev/null
    # shellcheck disable=SC2086
    (cd "$apt/debs" && apt-get -q "${aptopts[@]}" download $DEBS >/dev/null)
    local deb
    for deb in "$apt/debs"/*.deb; do
        dpkg-deb -x "$deb" "$PYROOT"
    done
    py27 -c 'import ssl, ctypes, zlib, hashlib' || { log "the unpacked Python 2.7 does not run"; exit 2; }

    # pip 20.3.4 is the last pip for Python 2.7; it runs straight from its wheel.
    mkdir -p "$CACHE/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$CACHE/wheels" pip==20.3.4
    local pip=(install -q --no-cache-dir --disable-pip-version-check --no-warn-script-location)
    # pip itself, setuptools and wheel first, on their own path: the suite's sdists build with
    # them, and pkg_resources (which the suite uses at run time) stays apart from the pinned set.
    local whl=$CACHE/wheels/pip-20.3.4-py2.py3-none-any.whl
    py27 "$whl/pip" "${pip[@]}" --target "$TOOLS" "$whl" setuptools==44.1.1 wheel==0.37.1
    # --target leaves the namespace packages' .pth files (zope.*) unprocessed: make the
    # package dir a site dir.
    echo 'import os, site; site.addsitedir(os.environ["AUTOBAHN_SITE"])' >"$TOOLS/sitecustomize.py"
    # distutils names /usr/include/python2.7 and pyconfig.h includes
    # <x86_64-linux-gnu/python2.7/pyconfig.h>: point both at the unpacked headers.
    CFLAGS="-I$PYROOT/usr/include -I$PYROOT/usr/include/python2.7" py27 -m pip "${pip[@]}" --target "$SITE" -r "$HERE/requirements.txt"
    py27 -c 'import autobahntestsuite, autobahn, twisted, wsaccel' \
        || { log "the suite does not import"; exit 2; }
    rm -rf "$apt" # the package lists and .debs (~100 MB) are not needed any more
    echo "$want" >"$stamp"
}

summarize() {
    python3 - "$CACHE/reports/index.json" <<'EOF'
import collections, json, sys

path = sys.argv[1]
try:
    with open(path) as f:
        index = json.load(f)
except (OSError, ValueError) as e:
    print(f"no usable report at {path}: {e}")
    sys.exit(1)
order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
failed = False
for agent, cases in index.items():
    def key(case):
        return [int(p) for p in case.split(".")]
    behaviour = collections.Counter(c["behavior"] for c in cases.values())
    close = collections.Counter(c["behaviorClose"] for c in cases.values())
    print(f"Autobahn fuzzingclient against {agent}: {len(cases)} cases")
    print(f"{'':14} {'behaviour':>9} {'close':>9}")
    for b in order + sorted((set(behaviour) | set(close)) - set(order)):
        print(f"{b:14} {behaviour.get(b, 0):9} {close.get(b, 0):9}")
    groups = collections.defaultdict(collections.Counter)
    for case, c in cases.items():
        groups[int(case.split(".")[0])][c["behavior"]] += 1
    print("by group: " + "  ".join(
        f"{g}.*: " + ",".join(f"{n} {b}" for b, n in sorted(cnt.items())) for g, cnt in sorted(groups.items())))
    notable = [(case, c) for case, c in sorted(cases.items(), key=lambda kv: key(kv[0]))
               if c["behavior"] not in ("OK", "INFORMATIONAL", "UNIMPLEMENTED") or c["behaviorClose"] not in ("OK", "INFORMATIONAL", "UNIMPLEMENTED")]
    for case, c in notable:
        print(f"  {case}: behaviour {c['behavior']}, close {c['behaviorClose']}, "
              f"remote close code {c.get('remoteCloseCode')}, report {c.get('reportfile')}")
    if any("FAILED" in (c["behavior"], c["behaviorClose"]) for c in cases.values()):
        failed = True
slow = sorted(((c["duration"], agent, case) for agent, cases in index.items() for case, c in cases.items()), reverse=True)[:3]
print("slowest: " + ", ".join(f"{case} {d} ms" for d, _, case in slow))
if failed:
    print("FAILED cases: see the reports above (index.html in the same folder)")
    sys.exit(1)
EOF
}

case "${1:-}" in
--setup)
    setup
    exit 0
    ;;
--summary)
    summarize
    exit
    ;;
"") ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2
    exit 2
    ;;
esac

setup

log "building examples/ws_echo (release)"
cargo build -q --release --example ws_echo
TARGET_DIR=$(cargo metadata -q --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
ECHO=$TARGET_DIR/release/examples/ws_echo

# The run's own copy of the spec: the port and case list may be overridden.
SPEC=$CACHE/fuzzingclient.json
python3 - "$HERE/fuzzingclient.json" "$SPEC" "$PORT" "${AUTOBAHN_CASES:-}" <<'EOF'
import json, sys
src, dst, port, cases = sys.argv[1:]
spec = json.load(open(src))
for s in spec["servers"]:
    s["url"] = s["url"].replace(":9001", ":" + port)
if cases:
    spec["cases"] = cases.split(",")
json.dump(spec, open(dst, "w"), indent=2)
EOF

rm -rf "$CACHE/reports"
"$ECHO" --listen "127.0.0.1:$PORT" >"$CACHE/ws_echo.log" 2>&1 &
ECHO_PID=$!
trap 'kill "$ECHO_PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    grep -q "listening" "$CACHE/ws_echo.log" 2>/dev/null && break
    kill -0 "$ECHO_PID" 2>/dev/null || { cat "$CACHE/ws_echo.log" >&2; log "ws_echo did not start"; exit 1; }
    sleep 0.1
done

log "running the fuzzingclient (log: $CACHE/wstest.log)"
start=$(date +%s)
rc=0
(cd "$CACHE" && timeout "$TIMEOUT" bash -c "$(declare -f py27); PYROOT='$PYROOT' SITE='$SITE' TOOLS='$TOOLS' PY='$PY'; \
    py27 -c 'from autobahntestsuite.wstest import run; run()' -m fuzzingclient -s '$SPEC'") \
    >"$CACHE/wstest.log" 2>&1 || rc=$?
log "fuzzingclient finished in $(($(date +%s) - start)) s (exit $rc)"
if [ "$rc" -ne 0 ]; then
    tail -n 30 "$CACHE/wstest.log" >&2
    log "the fuzzingclient did not finish"
    exit 1
fi
summarize
