"""Supabase's Python client `realtime` (async API, `AsyncRealtimeClient`), unmodified, against the
real corecast binary: broadcast over the socket (self, ack) and over REST (`http_send`), presence
(track/untrack/sync/join/leave, `remove_channel`), private channels, and `postgres_changes` under
row-level security with `set_auth` switching the identity of a joined channel.

The client speaks vsn 1.0.0 (JSON objects) and validates every server frame against pydantic
models: a frame it cannot parse is logged ("Unrecognized message format") and dropped, so these
tests also check that corecast's frames have the shapes that client accepts. Every frame sent
and received is logged at DEBUG by the client; pytest prints that log for a failing test.

See conftest.py for how to run it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Callable

import pytest
from conftest import SECRET, Server, jwt, needs_pg, sql, DATABASE_URL
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

ANON = jwt({"role": "anon"})
_seq = itertools.count(1)


def topic(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_seq)}-{int(time.time() * 1000) % 100000}"


@pytest.fixture(autouse=True)
def client_log(caplog):
    """The client's own DEBUG log (every frame sent and received), shown for failing tests."""
    caplog.set_level(logging.DEBUG, logger="realtime")
    return caplog


@pytest.fixture
async def connect():
    """`await connect(server, token)`: a connected AsyncRealtimeClient, closed after the test."""
    made: list[AsyncRealtimeClient] = []

    async def make(server: Server, token: str = ANON) -> AsyncRealtimeClient:
        client = AsyncRealtimeClient(server.endpoint, token, auto_reconnect=False)
        await client.connect()
        made.append(client)
        return client

    yield make
    for c in made:
        for ch in list(c.channels.values()):
            ch.rejoin_timer.reset()
        await c.close()


async def until(check: Callable[[], object], label: str, timeout: float = 10.0, describe=lambda: ""):
    """Polls `check` every 10 ms until it returns something truthy; fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {label}; {describe()}")
        await asyncio.sleep(0.01)


def config(broadcast=None, presence=None, private=False) -> dict:
    return {
        "config": {
            "broadcast": broadcast or {"ack": False, "self": False},
            "presence": presence or {"key": "", "enabled": False},
            "private": private,
        }
    }


async def subscribed(ch) -> list:
    """Subscribes `ch`, asserts SUBSCRIBED; returns the status log."""
    statuses: list = []
    await ch.subscribe(lambda status, err: statuses.append((status, err)))
    assert statuses and statuses[0][0] == RealtimeSubscribeStates.SUBSCRIBED, statuses
    return statuses


def sent_frames(caplog, event: str) -> list[dict]:
    """Frames the client sent with `event` (from its DEBUG log)."""
    out = []
    for r in caplog.records:
        msg = r.getMessage()
        if r.name == "realtime._async.client" and msg.startswith("send: "):
            frame = json.loads(msg[len("send: ") :])
            if frame["event"] == event:
                out.append(frame)
    return out


def unparsed(caplog) -> list[str]:
    """Server frames the client could not parse (and dropped)."""
    return [r.getMessage() for r in caplog.records if "Unrecognized message format" in r.getMessage()]


# -----------------------------------------------------------------------------------------------
# Broadcast
# -----------------------------------------------------------------------------------------------


async def test_broadcast_socket_and_rest(server, connect, client_log):
    a, b = await connect(server), await connect(server)
    assert "vsn=1.0.0" in a.endpoint_url() and "/realtime/v1/websocket?" in a.endpoint_url()
    name = topic("py-bc")
    cha = a.channel(name, config(broadcast={"self": True, "ack": True}))
    chb = b.channel(name, config())
    got_a, got_b = [], []
    cha.on_broadcast("*", got_a.append)
    chb.on_broadcast("*", got_b.append)
    await subscribed(cha)
    await subscribed(chb)

    # ack: true: the push is answered ok once sequenced.
    acks = []
    push = await cha.push("broadcast", {"type": "broadcast", "event": "hello", "payload": {"n": 1}})
    push.receive("ok", lambda r: acks.append(("ok", r))).receive("error", lambda r: acks.append(("error", r)))
    await until(lambda: acks, "the ack")
    assert acks[0][0] == "ok", acks
    m = await until(lambda: next((x for x in got_b if x["event"] == "hello"), None), "hello at b")
    assert m["payload"] == {"n": 1}
    assert isinstance(m["meta"]["id"], str)
    await until(lambda: any(x["event"] == "hello" for x in got_a), "hello echoed to a (self: true)")

    # send_broadcast (no ack wanted on b's channel); a gets it, b (self: false) does not.
    await chb.send_broadcast("back", {"from": "b"})
    back = await until(lambda: next((x for x in got_a if x["event"] == "back"), None), "back at a")
    assert back["payload"] == {"from": "b"}

    # REST: http_send posts to /realtime/v1/api/broadcast/<topic>/events/<event>.
    await cha.http_send("rest", {"r": 1})
    r = await until(lambda: next((x for x in got_b if x["event"] == "rest"), None), "REST message at b")
    assert r["payload"] == {"r": 1}
    await asyncio.sleep(0.2)
    assert not any(x["event"] == "back" for x in got_b)
    assert unparsed(client_log) == []


async def test_private_channels(server, connect):
    rooms = await connect(server, jwt({"role": "authenticated", "sub": "u", "topics": ["py-room-*"]}))
    anon = await connect(server)
    name = topic("py-room")
    ok = rooms.channel(name, config(private=True, broadcast={"self": True}))
    got = []
    ok.on_broadcast("e", got.append)
    await subscribed(ok)
    await ok.send_broadcast("e", {"x": 1})
    await until(lambda: got, "own broadcast on the private channel")

    no = anon.channel(name, config(private=True))
    statuses = []
    await no.subscribe(lambda status, err: statuses.append((status, str(err))))
    assert statuses[0][0] == RealtimeSubscribeStates.CHANNEL_ERROR, statuses
    assert "Unauthorized" in statuses[0][1], statuses


# -----------------------------------------------------------------------------------------------
# Presence
# -----------------------------------------------------------------------------------------------


def plain(state: dict) -> dict:
    """presence_state() without presence_refs, keys sorted."""
    return {k: [{f: v for f, v in m.items() if f != "presence_ref"} for m in state[k]] for k in sorted(state)}


async def test_presence(server, connect, client_log):
    a, b = await connect(server), await connect(server)
    name = topic("py-pres")
    events: dict[str, list] = {"alice": [], "bob": []}

    def chan(client, key):
        ch = client.channel(name, config(presence={"key": key, "enabled": True}))
        ch.on_presence_sync(lambda: events[key].append(("sync", plain(ch.presence_state()))))
        ch.on_presence_join(lambda k, cur, new: events[key].append(("join", k, new)))
        ch.on_presence_leave(lambda k, cur, left: events[key].append(("leave", k, left)))
        return ch

    cha, chb = chan(a, "alice"), chan(b, "bob")
    await subscribed(cha)
    # presence_state after a presence-enabled join (the first sync, empty).
    await until(lambda: ("sync", {}) in events["alice"], "alice's first sync")
    await cha.track({"name": "Alice"})
    await subscribed(chb)
    await chb.track({"name": "Bob"})
    both = {"alice": [{"name": "Alice"}], "bob": [{"name": "Bob"}]}
    for ch in (cha, chb):
        await until(
            lambda: plain(ch.presence_state()) == both,
            f"both members at {ch.topic}",
            describe=lambda: f"{ch.presence_state()}",
        )
    j = await until(lambda: next((e for e in events["alice"] if e[:2] == ("join", "bob")), None), "bob's join at alice")
    assert j[2][0]["name"] == "Bob" and isinstance(j[2][0]["presence_ref"], str)

    # An update replaces the meta.
    await cha.track({"name": "Alice", "status": "away"})
    await until(
        lambda: plain(chb.presence_state()).get("alice") == [{"name": "Alice", "status": "away"}],
        "alice's updated meta at bob",
        describe=lambda: f"{chb.presence_state()}",
    )

    # untrack: bob leaves for alice.
    await chb.untrack()
    await until(lambda: "bob" not in cha.presence_state(), "bob gone at alice")
    assert any(e[:2] == ("leave", "bob") for e in events["alice"])

    # remove_channel leaves: alice disappears for bob.
    await a.remove_channel(cha)
    await until(lambda: chb.presence_state() == {}, "empty presence at bob", describe=lambda: f"{chb.presence_state()}")
    # The Python client sends presence pushes without "type" ({"event": "track", "payload": …}).
    assert sent_frames(client_log, "presence")[0]["payload"] == {"event": "track", "payload": {"name": "Alice"}}
    assert unparsed(client_log) == []


# -----------------------------------------------------------------------------------------------
# Postgres changes (needs DATABASE_URL)
# -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_server():
    sql(
        """DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
           DO $$ BEGIN CREATE ROLE anon NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
           CREATE TABLE py_notes (id serial PRIMARY KEY, owner text NOT NULL, body text);
           ALTER TABLE py_notes ENABLE ROW LEVEL SECURITY;
           CREATE POLICY own_notes ON py_notes FOR SELECT TO authenticated
             USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
           GRANT SELECT ON py_notes TO authenticated, anon;"""
    )
    srv = Server(env={"DATABASE_URL": DATABASE_URL})
    yield srv
    srv.stop()


def user(sub: str) -> str:
    return jwt({"role": "authenticated", "sub": sub})


async def notes_channel(client):
    """A channel with one '*' binding on py_notes; returns (channel, changes) once subscribed to
    PostgreSQL."""
    ch = client.channel(topic("py-pg"), config())
    changes, system = [], []
    ch.on_postgres_changes("*", changes.append, table="py_notes", schema="public")
    ch.on_system(system.append)
    await subscribed(ch)
    await until(lambda: system, "a system message")
    assert system[0].message == "Subscribed to PostgreSQL", system
    assert system[0].extension == "postgres_changes" and system[0].status == "ok"
    return ch, changes


@needs_pg
async def test_postgres_changes_rls(pg_server, connect, client_log):
    alice, bob, anon = await connect(pg_server, user("alice")), await connect(pg_server, user("bob")), await connect(pg_server)
    (_, ga), (_, gb), (_, gn) = [await notes_channel(c) for c in (alice, bob, anon)]
    sql(
        """INSERT INTO py_notes (owner, body) VALUES ('alice', 'a1'), ('bob', 'b1');
           UPDATE py_notes SET body = 'a1!' WHERE body = 'a1';"""
    )
    await until(lambda: len(ga) >= 2, "alice's two changes", describe=lambda: f"{ga}")
    await until(lambda: len(gb) >= 1, "bob's change", describe=lambda: f"{gb}")
    assert [(p["data"]["type"], p["data"]["record"]["body"]) for p in ga] == [("INSERT", "a1"), ("UPDATE", "a1!")]
    p = ga[0]
    assert p["data"]["schema"] == "public" and p["data"]["table"] == "py_notes" and p["data"]["errors"] is None
    assert [(c["name"], c["type"]) for c in p["data"]["columns"]] == [("id", "int4"), ("owner", "text"), ("body", "text")]
    assert isinstance(p["ids"], list) and len(p["ids"]) == 1
    assert ga[1]["data"]["old_record"] == {"id": p["data"]["record"]["id"]}
    assert [x["data"]["record"]["body"] for x in gb] == ["b1"]
    await asyncio.sleep(0.3)
    assert len(ga) == 2 and len(gb) == 1
    assert gn == [], "anon sees no row of an RLS table whose policy is for authenticated"

    # DELETE cannot be checked against the policy (the row is gone): every subscriber gets it,
    # with the primary key only (as Supabase does).
    sql("DELETE FROM py_notes WHERE body = 'b1'")
    for log in (ga, gb, gn):
        d = await until(lambda: next((x for x in log if x["data"]["type"] == "DELETE"), None), "the DELETE")
        assert list(d["data"]["old_record"]) == ["id"], d
    assert unparsed(client_log) == []


@needs_pg
async def test_set_auth_switches_identity(pg_server, connect, client_log):
    c = await connect(pg_server, user("carol"))
    ch, changes = await notes_channel(c)
    sql("INSERT INTO py_notes (owner, body) VALUES ('dave', 'd0'), ('carol', 'c1')")
    await until(lambda: changes, "carol's row")
    assert changes[0]["data"]["record"]["body"] == "c1"

    dave = user("dave")
    await c.set_auth(dave)
    pushes = sent_frames(client_log, "access_token")
    # (the client's log redacts the token itself)
    assert pushes and pushes[-1]["topic"] == ch.topic and "access_token" in pushes[-1]["payload"], pushes
    assert c.access_token == dave
    # The new identity applies once the server took the token: wait for one of dave's rows.
    n = 0

    def daves():
        nonlocal n
        if any(x["data"]["record"]["owner"] == "dave" for x in changes if x["data"]["type"] == "INSERT"):
            return True
        if n % 20 == 0:
            sql("INSERT INTO py_notes (owner, body) VALUES ('dave', 'probe')")
        n += 1
        return False

    await until(daves, "a row of dave's after set_auth", describe=lambda: f"{changes}")
    seen = len(changes)
    sql("INSERT INTO py_notes (owner, body) VALUES ('carol', 'c2'), ('dave', 'd2')")
    await until(lambda: any(x["data"]["record"]["body"] == "d2" for x in changes), "d2")
    await asyncio.sleep(0.3)
    bodies = [x["data"]["record"]["body"] for x in changes[seen:] if x["data"]["record"]["body"] != "probe"]
    assert bodies == ["d2"], "carol's rows are no longer visible after set_auth(dave)"


# -----------------------------------------------------------------------------------------------
# Reconnect
# -----------------------------------------------------------------------------------------------


async def test_reconnect_after_server_restart():
    """The client's auto-reconnect: the server goes away (1001), comes back on the same port, the
    channel is rejoined (presence_state again) and broadcasts flow."""
    srv = Server()
    port = srv.port
    client = AsyncRealtimeClient(srv.endpoint, ANON, initial_backoff=0.2, max_retries=30)
    try:
        await client.connect()
        ch = client.channel(topic("py-rc"), config(broadcast={"self": True}, presence={"key": "me", "enabled": True}))
        got, statuses, syncs = [], [], []
        ch.on_broadcast("*", got.append)
        ch.on_presence_sync(lambda: syncs.append(dict(ch.presence_state())))
        await ch.subscribe(lambda status, err: statuses.append(status))
        srv.stop()
        srv = None
        for _ in range(50):
            try:
                srv = Server(port=port)
                break
            except RuntimeError:
                await asyncio.sleep(0.1)
        assert srv is not None, "corecast did not start again on the same port"
        await until(
            lambda: statuses.count(RealtimeSubscribeStates.SUBSCRIBED) >= 2, "SUBSCRIBED again", describe=lambda: f"{statuses}"
        )
        assert RealtimeSubscribeStates.CHANNEL_ERROR in statuses
        await until(lambda: len(syncs) >= 2, "presence_state after the rejoin")
        await ch.send_broadcast("after", {"x": 1})
        await until(lambda: any(m["event"] == "after" for m in got), "a broadcast after the rejoin")
    finally:
        for c in list(client.channels.values()):
            c.rejoin_timer.reset()
        await client.close()
        if srv:
            srv.stop()
