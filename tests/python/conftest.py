"""Fixtures for the Python client tests: the corecast binary (env CORECAST_BIN) started on a
free port with its own data directory, HS256 tokens, psql against DATABASE_URL.

Run through `cargo test python_realtime` (tests/interop.rs: creates target/py-venv with
tests/python/setup.sh when missing, starts PostgreSQL, sets DATABASE_URL, CORECAST_SLOT, PSQL
and CORECAST_BIN). By hand (the Postgres tests are skipped without DATABASE_URL):

    cargo build && tests/python/setup.sh && \
    CORECAST_BIN=$PWD/target/debug/corecast target/py-venv/bin/python -m pytest tests/python
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

SECRET = "python-realtime-test-secret-0123456789"
READY = re.compile(r"corecast listening on http://([0-9.]+):(\d+) with (\d+) shards")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: dict, secret: str = SECRET) -> str:
    """An HS256 JWT with `claims`, expiring in an hour unless `claims` has `exp`."""
    claims = {"exp": int(time.time()) + 3600, **claims}
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(sig)}"


class Server:
    """A corecast process: `--shards 2 --cpus 0,1`, `--jwt-secret SECRET`, a temp data dir."""

    def __init__(self, args: list[str] = (), env: dict[str, str] | None = None, port: int = 0):
        binary = os.environ.get("CORECAST_BIN")
        if not binary:
            raise RuntimeError("CORECAST_BIN is not set (path of the corecast binary)")
        self.data_dir = tempfile.mkdtemp(prefix="corecast-py-")
        full_env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        for k in ("DATABASE_URL", "CORECAST_DATABASE_URL", "CORECAST_JWT_SECRET"):
            full_env.pop(k, None)
        full_env.update(env or {})
        argv = [binary, "--listen", f"127.0.0.1:{port}", "--shards", "2", "--cpus", "0,1"]
        argv += ["--data-dir", self.data_dir, "--jwt-secret", SECRET, *args]
        self.argv = argv
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        port: list[int] = []
        ready = threading.Event()

        def read_stdout() -> None:
            for line in self.proc.stdout:
                m = READY.search(line)
                if m and not port:
                    port.append(int(m.group(2)))
                    ready.set()

        threading.Thread(target=read_stdout, daemon=True).start()
        if not ready.wait(20):
            self.proc.kill()
            raise RuntimeError(f"corecast did not become ready: {argv}\n{''.join(self.stderr)}")
        self.port = port[0]

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """What AsyncRealtimeClient is given (it appends /websocket)."""
        return f"ws://127.0.0.1:{self.port}/realtime/v1"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    srv = Server()
    yield srv
    srv.stop()


DATABASE_URL = os.environ.get("DATABASE_URL")
PSQL = os.environ.get("PSQL", "psql")
needs_pg = pytest.mark.skipif(
    not DATABASE_URL, reason="needs DATABASE_URL (run it through `cargo test python_realtime`)"
)


def sql(query: str) -> str:
    """Runs SQL with psql against DATABASE_URL (stops at the first error)."""
    out = subprocess.run(
        [PSQL, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", DATABASE_URL, "-c", query],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()
