//! Postgres changes against a real PostgreSQL 15 (see `util::pg`): payload shapes, filters,
//! row-level security (and the warning when it filters a channel that runs with the apikey's
//! claims), private channels, bad subscriptions, and no change lost when Postgres or corecast
//! restarts. Plus the unmodified realtime-js client (`tests/js/pg.test.mjs`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::pg::{PrivatePg, TestDb};
use crate::util::{jwt, unix_now, Client, Msg, Server, SseClient};

const SECRET: &str = "pg-test-secret";

/// corecast on `db` (its own slot), plus `extra` flags.
fn server(db: &TestDb, extra: &[&str]) -> Server {
    let url = db.url();
    let mut args = vec!["--slot", db.slot()];
    args.extend_from_slice(extra);
    Server::start_with_env(&args, &[("DATABASE_URL", &url)])
}

fn token(claims: Value) -> String {
    let mut c = claims;
    c["exp"] = json!(unix_now() + 3600);
    jwt(SECRET, c)
}

/// A client that keeps what it read, so tests can wait for one kind of message while others
/// arrive.
struct Rx {
    c: Client,
    buf: Vec<Value>,
    closed: bool,
}

impl Rx {
    fn connect(url: &str) -> Rx {
        Rx { c: Client::connect(url), buf: Vec::new(), closed: false }
    }

    fn pump(&mut self, d: Duration) {
        match self.c.try_recv(d) {
            Some(Msg::Json(v)) => self.buf.push(v),
            Some(Msg::Close(_)) | Some(Msg::Error(_)) => self.closed = true,
            _ => {}
        }
    }

    /// Removes and returns the first message matching `pred`, reading up to `timeout`.
    fn wait(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(&pred) {
                return self.buf.remove(i);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero() && !self.closed, "timed out waiting for {what}; got {:#?}", self.buf);
            self.pump(left.min(Duration::from_millis(200)));
        }
    }

    /// Joins `topic` with `postgres_changes` bindings; returns the binding ids of the reply.
    fn join(&mut self, topic: &str, join_ref: &str, bindings: Value, extra: Value) -> Vec<u64> {
        let mut payload = json!({"config": {"postgres_changes": bindings, "private": false}});
        if let Value::Object(m) = extra {
            for (k, v) in m {
                if k == "private" {
                    payload["config"]["private"] = v;
                } else {
                    payload[k] = v;
                }
            }
        }
        let wire = format!("realtime:{topic}");
        self.c.send_json(&json!([join_ref, join_ref, wire, "phx_join", payload]));
        let reply = self.wait("join reply", Duration::from_secs(5), |v| v[3] == "phx_reply" && v[1] == join_ref);
        assert_eq!(reply[4]["status"], "ok", "{reply}");
        reply[4]["response"]["postgres_changes"].as_array().unwrap().iter().map(|b| b["id"].as_u64().unwrap()).collect()
    }

    /// The next `system` message of `topic`.
    fn system(&mut self, topic: &str) -> Value {
        let wire = format!("realtime:{topic}");
        self.wait(&format!("system on {topic}"), Duration::from_secs(15), |v| v[3] == "system" && v[2] == wire)[4]
            .clone()
    }

    /// Waits for "Subscribed to PostgreSQL" on `topic`.
    fn subscribed(&mut self, topic: &str) {
        let s = self.system(topic);
        assert_eq!(
            (s["status"].as_str(), s["message"].as_str()),
            (Some("ok"), Some("Subscribed to PostgreSQL")),
            "{s}"
        );
        assert_eq!(s["extension"], "postgres_changes");
    }

    /// The next `n` postgres_changes payloads of `topic`, in order.
    fn changes(&mut self, topic: &str, n: usize) -> Vec<Value> {
        let wire = format!("realtime:{topic}");
        (0..n)
            .map(|i| {
                self.wait(&format!("change {} of {n} on {topic}", i + 1), Duration::from_secs(15), |v| {
                    v[3] == "postgres_changes" && v[2] == wire
                })[4]
                    .clone()
            })
            .collect()
    }

    /// postgres_changes payloads of `topic` that arrive within `d`.
    fn quiet(&mut self, topic: &str, d: Duration) -> Vec<Value> {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            self.pump(deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)));
        }
        let wire = format!("realtime:{topic}");
        let (hit, rest): (Vec<Value>, Vec<Value>) =
            self.buf.drain(..).partition(|v| v[3] == "postgres_changes" && v[2] == wire);
        self.buf = rest;
        hit.into_iter().map(|v| v[4].clone()).collect()
    }
}

fn ids_of(changes: &[Value], field: &str) -> Vec<i64> {
    changes.iter().map(|c| c["data"][field]["id"].as_i64().unwrap()).collect()
}

#[test]
fn pg_insert_update_delete_filters_and_payloads() {
    let db = TestDb::new("cc_shapes");
    db.sql(
        "CREATE TABLE todos (id bigserial PRIMARY KEY, task text, done bool DEFAULT false, tags text[], meta jsonb, \
           price numeric, at timestamptz, raw bytea);
         CREATE TABLE items (id int PRIMARY KEY, name text);
         ALTER TABLE items REPLICA IDENTITY FULL;",
    );
    let srv = server(&db, &[]);
    let mut c = Rx::connect(&srv.ws_url("2.0.0"));
    let all = c.join("all", "1", json!([{"event": "*", "schema": "public", "table": "todos"}]), json!({}));
    let ins = c.join(
        "ins",
        "2",
        json!([{"event": "INSERT", "schema": "public", "table": "todos", "filter": "id=in.(2,3)"}]),
        json!({}),
    );
    let upd = c.join(
        "upd",
        "3",
        json!([{"event": "UPDATE", "schema": "public", "table": "todos", "filter": "done=eq.true"}]),
        json!({}),
    );
    let full = c.join("full", "4", json!([{"event": "*", "schema": "public", "table": "items"}]), json!({}));
    let wild = c.join("wild", "5", json!([{"event": "DELETE", "schema": "public"}]), json!({}));
    let two = c.join(
        "two",
        "6",
        json!([{"event": "INSERT", "schema": "public", "table": "todos"}, {"event": "*", "schema": "public", "table": "todos", "filter": "task=eq.a"}]),
        json!({}),
    );
    for t in ["all", "ins", "upd", "full", "wild", "two"] {
        c.subscribed(t);
    }
    db.sql(
        "INSERT INTO todos (task, tags, meta, price, at, raw) VALUES
           ('a', '{x,\"y z\"}', '{\"k\": [1, 2]}', 1.50, '2024-01-02 03:04:05.5+00', '\\x0102');
         INSERT INTO todos (task) VALUES ('b');
         INSERT INTO todos (task) VALUES ('c');
         UPDATE todos SET done = true WHERE id = 2;
         DELETE FROM todos WHERE id = 3;
         INSERT INTO items VALUES (1, 'a');
         UPDATE items SET name = 'b' WHERE id = 1;
         DELETE FROM items WHERE id = 1;",
    );
    let got = c.changes("all", 5);
    let types: Vec<&str> = got.iter().map(|g| g["data"]["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["INSERT", "INSERT", "INSERT", "UPDATE", "DELETE"]);
    let first = &got[0];
    assert_eq!(first["ids"], json!(all));
    let d = &first["data"];
    assert_eq!((d["schema"].as_str(), d["table"].as_str()), (Some("public"), Some("todos")));
    assert!(d.get("old_record").is_none());
    assert_eq!(d["errors"], Value::Null);
    let ts = d["commit_timestamp"].as_str().unwrap();
    assert!(ts.len() == 24 && ts.ends_with('Z') && &ts[10..11] == "T", "{ts}");
    assert_eq!(
        d["columns"],
        json!([{"name":"id","type":"int8"},{"name":"task","type":"text"},{"name":"done","type":"bool"},
               {"name":"tags","type":"_text"},{"name":"meta","type":"jsonb"},{"name":"price","type":"numeric"},
               {"name":"at","type":"timestamptz"},{"name":"raw","type":"bytea"}])
    );
    assert_eq!(
        d["record"],
        json!({"id": 1, "task": "a", "done": false, "tags": ["x", "y z"], "meta": {"k": [1, 2]}, "price": 1.50,
               "at": "2024-01-02T03:04:05.5+00:00", "raw": "0102"})
    );
    // Default replica identity: UPDATE/DELETE carry the key.
    assert_eq!(got[3]["data"]["old_record"], json!({"id": 2}));
    assert_eq!(got[3]["data"]["record"]["done"], json!(true));
    assert_eq!(got[4]["data"]["old_record"], json!({"id": 3}));
    assert!(got[4]["data"].get("record").is_none());
    // Filters.
    let got = c.changes("ins", 2);
    assert_eq!(ids_of(&got, "record"), [2, 3]);
    assert_eq!(got[0]["ids"], json!(ins));
    let got = c.changes("upd", 1);
    assert_eq!((got[0]["ids"].clone(), got[0]["data"]["record"]["id"].clone()), (json!(upd), json!(2)));
    // REPLICA IDENTITY FULL: whole old rows.
    let got = c.changes("full", 3);
    assert_eq!(got[0]["ids"], json!(full));
    assert_eq!(got[1]["data"]["old_record"], json!({"id": 1, "name": "a"}));
    assert_eq!(got[1]["data"]["record"], json!({"id": 1, "name": "b"}));
    assert_eq!(got[2]["data"]["old_record"], json!({"id": 1, "name": "b"}));
    // `schema` without `table`: every table of the schema.
    let got = c.changes("wild", 2);
    assert_eq!(got.iter().map(|g| g["data"]["table"].as_str().unwrap()).collect::<Vec<_>>(), ["todos", "items"]);
    assert_eq!(got[0]["ids"], json!(wild));
    // Two bindings matching one change: one message with both ids.
    let got = c.changes("two", 3);
    assert_eq!(got[0]["ids"], json!(two));
    assert_eq!(got[1]["ids"], json!([two[0]]));
    // Nothing else arrives.
    for t in ["all", "ins", "upd", "full", "wild", "two"] {
        assert_eq!(c.quiet(t, Duration::from_millis(300)), Vec::<Value>::new(), "{t}");
    }
    // vsn 1.0.0 gets the same payload in the object framing.
    let mut v1 = Rx::connect(&srv.ws_url("1.0.0"));
    v1.c.send_json(&json!({"topic": "realtime:v1", "event": "phx_join", "ref": "1", "join_ref": "1",
        "payload": {"config": {"postgres_changes": [{"event": "INSERT", "schema": "public", "table": "items"}]}}}));
    let s = v1.wait("v1 system", Duration::from_secs(15), |v| v["event"] == "system");
    assert_eq!(s["payload"]["message"], "Subscribed to PostgreSQL");
    db.sql("INSERT INTO items VALUES (9, 'v1')");
    let m = v1.wait("v1 change", Duration::from_secs(15), |v| v["event"] == "postgres_changes");
    assert_eq!((m["topic"].as_str(), m["ref"].clone()), (Some("realtime:v1"), Value::Null));
    assert_eq!(m["payload"]["data"]["record"], json!({"id": 9, "name": "v1"}));
}

#[test]
fn pg_bad_subscriptions_get_system_errors() {
    let db = TestDb::new("cc_bad");
    db.sql("CREATE TABLE t (id int PRIMARY KEY, name text)");
    let srv = server(&db, &[]);
    let mut c = Rx::connect(&srv.ws_url("2.0.0"));
    let many: Vec<String> = (0..101).map(|i| i.to_string()).collect();
    let bad = [
        ("syntax", "id=foo.1".to_string(), "t"),
        ("column", "nope=eq.1".to_string(), "t"),
        ("value", "id=eq.abc".to_string(), "t"),
        ("toomany", format!("id=in.({})", many.join(",")), "t"),
        ("table", String::new(), "missing"),
    ];
    for (i, (topic, filter, table)) in bad.iter().enumerate() {
        let mut b = json!({"event": "*", "schema": "public", "table": table});
        if !filter.is_empty() {
            b["filter"] = json!(filter);
        }
        c.join(topic, &(i + 1).to_string(), json!([b]), json!({}));
    }
    c.join(
        "good",
        "9",
        json!([{"event": "INSERT", "schema": "public", "table": "t", "filter": "name=eq.\"x, y\""}]),
        json!({}),
    );
    for (topic, _, _) in &bad {
        let s = c.system(topic);
        assert_eq!((s["status"].as_str(), s["extension"].as_str()), (Some("error"), Some("postgres_changes")), "{s}");
        assert!(
            s["message"].as_str().unwrap().starts_with("Unable to subscribe to changes with given parameters"),
            "{s}"
        );
    }
    c.subscribed("good");
    // The connection and the other channels carry on.
    db.sql("INSERT INTO t VALUES (1, 'x, y'), (2, 'z')");
    let got = c.changes("good", 1);
    assert_eq!(got[0]["data"]["record"], json!({"id": 1, "name": "x, y"}));
    for (topic, _, _) in &bad {
        assert!(c.quiet(topic, Duration::from_millis(100)).is_empty());
    }
    c.c.send_text(r#"[null,"99","phoenix","heartbeat",{}]"#);
    let hb = c.wait("heartbeat reply", Duration::from_secs(5), |v| v[1] == "99");
    assert_eq!(hb[4]["status"], "ok");
}

#[test]
fn pg_row_level_security_per_user_batched() {
    let db = TestDb::new("cc_rls");
    db.sql(
        "DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         CREATE TABLE notes (id bigserial PRIMARY KEY, owner text NOT NULL, body text, secret text);
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         GRANT SELECT (id, owner, body) ON notes TO authenticated;
         CREATE POLICY own ON notes FOR SELECT TO authenticated
           USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub'
                  AND owner = current_setting('request.jwt.claim.sub', true));",
    );
    let srv = server(&db, &["--jwt-secret", SECRET]);
    let url = |sub: &str| {
        format!(
            "ws://{}/realtime/v1/websocket?apikey={}&vsn=2.0.0",
            srv.addr,
            token(json!({"role": "authenticated", "sub": sub}))
        )
    };
    let binding = json!([{"event": "*", "schema": "public", "table": "notes"}]);
    let mut users: Vec<Rx> = ["u1", "u2"].iter().map(|u| Rx::connect(&url(u))).collect();
    for u in users.iter_mut() {
        u.join("notes", "1", binding.clone(), json!({}));
        u.subscribed("notes");
    }
    db.sql("INSERT INTO notes (owner, body, secret) VALUES ('u1', 'one', 's1'), ('u2', 'two', 's2'), ('u1', 'three', 's3')");
    let (u1, u2) = users.split_at_mut(1);
    let (u1, u2) = (&mut u1[0], &mut u2[0]);
    let got1 = u1.changes("notes", 2);
    assert_eq!(ids_of(&got1, "record"), [1, 3]);
    assert_eq!(got1[0]["data"]["record"], json!({"id": 1, "owner": "u1", "body": "one"}));
    assert_eq!(
        got1[0]["data"]["columns"],
        json!([{"name": "id", "type": "int8"}, {"name": "owner", "type": "text"}, {"name": "body", "type": "text"}])
    );
    let got2 = u2.changes("notes", 1);
    assert_eq!(ids_of(&got2, "record"), [2]);
    assert!(u1.quiet("notes", Duration::from_millis(300)).is_empty());
    assert!(u2.quiet("notes", Duration::from_millis(100)).is_empty());
    // DELETE cannot be checked: everyone subscribed gets the primary key only.
    db.sql("DELETE FROM notes WHERE id = 2");
    for u in [&mut *u1, &mut *u2] {
        let d = u.changes("notes", 1);
        assert_eq!(d[0]["data"]["old_record"], json!({"id": 2}));
    }
    // access_token: new claims are used for the next checks.
    u1.c.send_json(&json!(["1", "5", "realtime:notes", "access_token", {"access_token": token(json!({"role": "authenticated", "sub": "u2"}))}]));
    std::thread::sleep(Duration::from_millis(300));
    db.sql("INSERT INTO notes (owner, body) VALUES ('u2', 'four')");
    assert_eq!(ids_of(&u1.changes("notes", 1), "record"), [4]);
    assert_eq!(ids_of(&u2.changes("notes", 1), "record"), [4]);
}

/// corecast on `db` (its own slot), its log (stderr, escape sequences removed) kept line by
/// line for the test to read.
struct LoggedServer {
    addr: std::net::SocketAddr,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    data_dir: std::path::PathBuf,
}

impl LoggedServer {
    fn start(db: &TestDb, extra: &[&str]) -> LoggedServer {
        let data_dir = crate::util::temp_dir("pglog");
        let mut child = Command::new(env!("CARGO_BIN_EXE_corecast"))
            .args(["--listen", "127.0.0.1:0", "--shards", "2", "--cpus", "0,1", "--slot", db.slot()])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra)
            .env("DATABASE_URL", db.url())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn corecast");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(strip_ansi(&line));
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.next().and_then(Result::ok).unwrap_or_default();
        std::thread::spawn(move || for _ in lines {});
        let addr = ready
            .strip_prefix("corecast listening on http://")
            .and_then(|r| r.split(' ').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no ready line (got {ready:?}); log: {:#?}", log.lock().unwrap()));
        LoggedServer { addr, child, log, data_dir }
    }

    /// Log lines containing `needle`.
    fn lines_with(&self, needle: &str) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }

    fn ws(&self, apikey: &str) -> Rx {
        Rx::connect(&format!("ws://{}/realtime/v1/websocket?apikey={apikey}&vsn=2.0.0", self.addr))
    }
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// `s` without ANSI escape sequences (`ESC [ … letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The scenario of a realtime-js client with the anon key as `apikey` and an `accessToken`
/// callback: its join goes out before the callback resolved, so the channel runs with the
/// apikey's claims (`anon`) and RLS filters every row. That is correct, and corecast says why,
/// once per connection however many rows, channels and rejoins; the three ways that do run as
/// the user (join `access_token`, a later `access_token` push, the user token as apikey) get
/// the rows and no warning.
#[test]
fn pg_rls_filtering_apikey_claims_is_logged_once_per_connection() {
    const WARNING: &str = "row-level security filtered a change for this channel";
    // Creates the cluster-wide role `anon`: on the shared instance every other test's dev-mode
    // subscribers (role `anon` when it exists) would lose SELECT on their tables.
    let db = TestDb::on(crate::util::pg::clients(), "cc_rls_warn");
    db.sql(
        "DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         DO $$ BEGIN CREATE ROLE anon NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         CREATE TABLE todos (id bigserial PRIMARY KEY, owner text NOT NULL, task text);
         ALTER TABLE todos ENABLE ROW LEVEL SECURITY;
         GRANT SELECT ON todos TO anon, authenticated;
         CREATE POLICY own ON todos FOR SELECT TO authenticated
           USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');",
    );
    let srv = LoggedServer::start(&db, &["--jwt-secret", SECRET]);
    let (anon, user) = (token(json!({"role": "anon"})), token(json!({"role": "authenticated", "sub": "u1"})));
    let binding = json!([{"event": "*", "schema": "public", "table": "todos"}]);
    // The case that is warned about: anon apikey, joins without access_token (two channels).
    let mut filtered = srv.ws(&anon);
    filtered.join("todos", "1", binding.clone(), json!({}));
    filtered.join("todos-2", "2", binding.clone(), json!({}));
    // The three ways that run as the user.
    let mut join_token = srv.ws(&anon);
    join_token.join("todos", "1", binding.clone(), json!({"access_token": user}));
    let mut pushed = srv.ws(&anon);
    pushed.join("todos", "1", binding.clone(), json!({}));
    let mut as_apikey = srv.ws(&user);
    as_apikey.join("todos", "1", binding.clone(), json!({}));
    for c in [&mut filtered, &mut join_token, &mut pushed, &mut as_apikey] {
        c.subscribed("todos");
    }
    filtered.subscribed("todos-2");
    pushed.c.send_json(&json!(["1", "5", "realtime:todos", "access_token", {"access_token": user}]));
    std::thread::sleep(Duration::from_millis(300));
    for round in 0..3 {
        db.sql(&format!(
            "INSERT INTO todos (owner, task) VALUES ('u1', 'a{round}'); INSERT INTO todos (owner, task) VALUES ('u1', 'b{round}')"
        ));
        for c in [&mut join_token, &mut pushed, &mut as_apikey] {
            assert_eq!(c.changes("todos", 2).len(), 2, "round {round}");
        }
        // A rejoin storm on the same connection: still one warning.
        let r = (10 + round).to_string();
        filtered.join("todos", &r, binding.clone(), json!({}));
        filtered.subscribed("todos");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.lines_with(WARNING).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let warned = srv.lines_with(WARNING);
    assert_eq!(warned.len(), 1, "exactly one warning; log: {:#?}", srv.log.lock().unwrap());
    let w = &warned[0];
    assert!(w.contains("WARN"), "{w}");
    for part in ["todos", "anon", "public.todos", "await client.setAuth()", "as apikey", "access_token"] {
        assert!(w.contains(part), "the warning names {part:?}: {w}");
    }
    for t in ["todos", "todos-2"] {
        assert!(filtered.quiet(t, Duration::from_millis(100)).is_empty(), "{t}: RLS filtered every row");
    }
    // A second connection in the same situation is warned once too.
    let mut again = srv.ws(&anon);
    again.join("todos", "1", binding, json!({}));
    again.subscribed("todos");
    db.sql("INSERT INTO todos (owner, task) VALUES ('u1', 'c')");
    assert_eq!(as_apikey.changes("todos", 1).len(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.lines_with(WARNING).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(srv.lines_with(WARNING).len(), 2, "one more for the new connection");
}

/// The RLS check queries corecast sends are index lookups under the table's policies, not a
/// scan of the whole table per auth context: the key comparison must be leakproof to be
/// evaluated before a policy (`rls::check_sql`). Planned here by the real Postgres, as corecast
/// runs them: `= ANY` keys with a generic plan, `unnest` keys with custom plans.
#[test]
fn pg_rls_check_queries_use_the_primary_key() {
    use corecast::ingest::catalog::{ColMeta, TableMeta};
    use corecast::ingest::rls::check_sql;
    let db = TestDb::new("cc_rls_plan");
    db.sql(
        "DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         CREATE TABLE one (id bigint PRIMARY KEY, owner text NOT NULL);
         CREATE TABLE two (a int, b timestamptz, owner text NOT NULL, PRIMARY KEY (a, b));
         INSERT INTO one SELECT g, 'u' || (g % 100) FROM generate_series(1, 20000) g;
         INSERT INTO two SELECT g, '2024-01-01'::timestamptz + g * interval '1 s', 'u' || (g % 100) FROM generate_series(1, 20000) g;
         ALTER TABLE one ENABLE ROW LEVEL SECURITY;
         ALTER TABLE two ENABLE ROW LEVEL SECURITY;
         GRANT SELECT ON one, two TO authenticated;
         CREATE POLICY own ON one FOR SELECT TO authenticated USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
         CREATE POLICY own ON two FOR SELECT TO authenticated USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
         ANALYZE one; ANALYZE two;",
    );
    let col = |name: &str, type_oid: u32, sql_type: &str| ColMeta {
        name: name.into(),
        type_oid,
        typname: String::new(),
        sql_type: sql_type.into(),
        pk: true,
    };
    let table = |name: &str, columns| TableMeta {
        relid: 0,
        schema: "public".into(),
        name: name.into(),
        rls: true,
        published: true,
        columns,
    };
    let plan = |setup: &str, prepare: &str, execute: &str| {
        db.sql(&format!(
            "BEGIN; SET LOCAL ROLE authenticated; SELECT set_config('request.jwt.claims', '{{\"sub\": \"u7\"}}', true); \
             {setup} PREPARE q{prepare}; EXPLAIN (COSTS OFF) EXECUTE q{execute}; COMMIT;"
        ))
    };
    let one = check_sql(&table("one", vec![col("id", 20, "bigint")])).unwrap();
    assert!(one.by_key, "{one:?}");
    let p =
        plan("SET LOCAL plan_cache_mode = force_generic_plan;", &format!("(text[]) AS {}", one.sql), "('{7,8,107}')");
    assert!(p.contains("Index Cond") && !p.contains("Seq Scan"), "{p}");
    assert_eq!(
        db.sql(&format!(
            "BEGIN; SET LOCAL ROLE authenticated; SELECT set_config('request.jwt.claims', '{{\"sub\": \"u7\"}}', true); \
             PREPARE q(text[]) AS {}; EXECUTE q('{{7,8,107}}'); COMMIT;",
            one.sql
        ))
        .lines()
        .skip(1)
        .collect::<Vec<_>>(),
        ["7", "107"],
        "the visible keys, as text"
    );
    let two =
        check_sql(&table("two", vec![col("a", 23, "integer"), col("b", 1184, "timestamp with time zone")])).unwrap();
    assert!(!two.by_key, "{two:?}");
    let p = plan(
        "",
        &format!("(int4[], text[], text[]) AS {}", two.sql),
        "('{0,1}', '{7,8}', '{\"2024-01-01 00:00:07+00\",\"2024-01-01 00:00:08+00\"}')",
    );
    assert!(p.contains("Index Cond") && !p.contains("Seq Scan"), "{p}");
}

#[test]
fn pg_private_channels_by_policy() {
    let db = TestDb::new("cc_private");
    db.sql("DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;");
    let srv = server(&db, &["--jwt-secret", SECRET]);
    // corecast creates realtime.messages (RLS on, no policy) once it reached the database.
    let deadline = Instant::now() + Duration::from_secs(15);
    while db.sql("SELECT to_regprocedure('realtime.topic()') IS NOT NULL") != "t" {
        assert!(Instant::now() < deadline, "realtime.messages was not created");
        std::thread::sleep(Duration::from_millis(50));
    }
    db.sql(
        "CREATE POLICY room_of_user ON realtime.messages FOR SELECT TO authenticated
           USING (realtime.topic() = 'room-' || (current_setting('request.jwt.claims', true)::jsonb ->> 'sub'))",
    );
    let apikey = token(json!({"role": "anon"}));
    let mut c = Rx::connect(&format!("ws://{}/realtime/v1/websocket?apikey={apikey}&vsn=2.0.0", srv.addr));
    let u1 = token(json!({"role": "authenticated", "sub": "u1"}));
    c.join("room-u1", "1", json!([]), json!({"private": true, "access_token": u1}));
    c.c.send_json(
        &json!(["2", "2", "realtime:room-u2", "phx_join", {"config": {"private": true}, "access_token": u1}]),
    );
    let r = c.wait("refusal", Duration::from_secs(10), |v| v[1] == "2");
    assert_eq!(r[4]["status"], "error");
    assert!(r[4]["response"]["reason"].as_str().unwrap().starts_with("Unauthorized"), "{r}");
    // A new token whose policy no longer allows the topic closes the channel.
    let u3 = token(json!({"role": "authenticated", "sub": "u3"}));
    c.c.send_json(&json!(["1", "3", "realtime:room-u1", "access_token", {"access_token": u3}]));
    let s = c.system("room-u1");
    assert_eq!(s["status"], "error");
    assert!(s["message"].as_str().unwrap().contains("no longer have permission"), "{s}");
    c.wait("phx_close", Duration::from_secs(5), |v| v[3] == "phx_close" && v[2] == "realtime:room-u1");
}

/// Inserts rows `range` one transaction each.
fn insert_range(db: &TestDb, range: std::ops::RangeInclusive<i64>) {
    let values: Vec<String> = range.map(|i| format!("INSERT INTO events VALUES ({i});")).collect();
    db.sql(&values.join("\n"));
}

fn received(c: &mut Rx, want: usize, timeout: Duration) -> Vec<i64> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.iter().collect::<BTreeSet<_>>().len() < want && Instant::now() < deadline {
        got.extend(ids_of(&c.quiet("ev", Duration::from_millis(100)), "record"));
    }
    got
}

#[test]
fn pg_postgres_restart_loses_nothing() {
    let private = PrivatePg::start();
    let pg = private.pg();
    let db = TestDb::on(pg, "cc_pgrestart");
    db.sql("CREATE TABLE events (id int PRIMARY KEY)");
    let srv = server(&db, &[]);
    let mut c = Rx::connect(&srv.ws_url("2.0.0"));
    c.join("ev", "1", json!([{"event": "INSERT", "schema": "public", "table": "events"}]), json!({}));
    c.subscribed("ev");
    insert_range(&db, 1..=5);
    assert_eq!(ids_of(&c.changes("ev", 5), "record"), [1, 2, 3, 4, 5]);
    // Rows committed right before the restart, possibly not streamed or acknowledged yet.
    insert_range(&db, 6..=10);
    pg.restart();
    let lost = c.system("ev");
    assert_eq!(lost["status"], "error", "{lost}");
    assert!(lost["message"].as_str().unwrap().contains("Replication connection lost"), "{lost}");
    let back = c.system("ev");
    assert_eq!(
        (back["status"].as_str(), back["message"].as_str()),
        (Some("ok"), Some("Replication connection re-established"))
    );
    insert_range(&db, 11..=15);
    let got = received(&mut c, 10, Duration::from_secs(20));
    let set: BTreeSet<i64> = got.iter().copied().collect();
    assert_eq!(set, (6..=15).collect(), "got {got:?}");
    assert_eq!(got.len(), set.len(), "duplicates after a Postgres restart: {got:?}");

    // History in Postgres while it is down: the persisted message is acknowledged only once
    // it is committed, after the database is back.
    pg.stop();
    let addr = srv.addr;
    let publish = std::thread::spawn(move || {
        let body = json!({"messages": [{"topic": "h", "event": "m", "payload": {"n": 1}, "persist": true}]});
        let t = Instant::now();
        let (st, _, _) =
            crate::util::http(addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
        (st, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!publish.is_finished(), "a persisted message was acknowledged while the database was down");
    pg.start_again();
    let (st, waited) = publish.join().unwrap();
    assert_eq!(st, 202);
    assert!(waited >= Duration::from_millis(1500), "acknowledged after {waited:?}");
    assert_eq!(db.sql("SELECT payload::text FROM corecast.history WHERE topic = 'h'").trim(), r#"{"n":1}"#);
    drop(c);
    drop(srv);
}

/// While corecast is down the database writes more WAL than `max_slot_wal_keep_size` and a
/// checkpoint invalidates the slot: it can never stream again. corecast recreates it, and the
/// clients rejoining after the restart are told that changes were lost, then get new ones.
#[test]
fn pg_invalidated_slot_is_recreated_and_rejoining_clients_are_told() {
    let private = PrivatePg::start();
    let pg = private.pg();
    pg.psql("postgres", "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'");
    pg.psql("postgres", "SELECT pg_reload_conf()");
    let db = TestDb::on(pg, "cc_lostslot");
    db.sql("CREATE TABLE events (id int PRIMARY KEY); CREATE TABLE filler (x text)");
    let binding = json!([{"event": "INSERT", "schema": "public", "table": "events"}]);
    let srv = server(&db, &[]);
    let mut c = Rx::connect(&srv.ws_url("2.0.0"));
    c.join("ev", "1", binding.clone(), json!({}));
    c.subscribed("ev");
    insert_range(&db, 1..=1);
    assert_eq!(ids_of(&c.changes("ev", 1), "record"), [1]);
    drop(c);
    drop(srv);
    insert_range(&db, 2..=2);
    for _ in 0..3 {
        db.sql("INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 20000); SELECT pg_switch_wal();");
    }
    db.sql("CHECKPOINT");
    let status = format!("SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{}'", db.slot());
    assert_eq!(pg.psql("postgres", &status), "lost");
    let srv = server(&db, &[]);
    let mut c = Rx::connect(&srv.ws_url("2.0.0"));
    c.join("ev", "1", binding, json!({}));
    c.subscribed("ev");
    let lost = c.system("ev");
    assert_eq!(lost["status"], "error", "{lost}");
    assert!(lost["message"].as_str().unwrap().starts_with("Changes were lost: replication slot"), "{lost}");
    assert_ne!(pg.psql("postgres", &status), "lost");
    insert_range(&db, 3..=3);
    assert_eq!(ids_of(&c.changes("ev", 1), "record"), [3]);
}

/// `/metrics` reports the slot's lag and retained WAL and the commit → hand-off delay.
#[test]
fn pg_metrics_report_slot_lag_and_commit_delay() {
    let db = TestDb::new("cc_pgmetrics");
    db.sql("CREATE TABLE events (id int PRIMARY KEY)");
    let srv = server(&db, &[]);
    let mut c = Rx::connect(&srv.ws_url("2.0.0"));
    c.join("ev", "1", json!([{"event": "INSERT", "schema": "public", "table": "events"}]), json!({}));
    c.subscribed("ev");
    insert_range(&db, 1..=1);
    assert_eq!(ids_of(&c.changes("ev", 1), "record"), [1]);
    let gauge = |text: &str, name: &str| -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let (_, _, b) = crate::util::http(srv.addr, "GET", "/metrics", &[], b"");
        let text = String::from_utf8(b).unwrap();
        if gauge(&text, "corecast_pg_replication_lag_bytes").is_some() || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let lag = gauge(&text, "corecast_pg_replication_lag_bytes").expect("no slot lag gauge");
    let kept = gauge(&text, "corecast_pg_slot_retained_wal_bytes").expect("no retained WAL gauge");
    let delay = gauge(&text, "corecast_pg_replication_lag_seconds").expect("no lag in seconds gauge");
    let handoffs = gauge(&text, "corecast_pg_commit_to_handoff_seconds_count").expect("no commit → hand-off histogram");
    assert!(handoffs >= 1.0, "{text}");
    assert!(text.contains("# TYPE corecast_pg_commit_to_handoff_seconds histogram"));
    assert!(text.contains("corecast_pg_commit_to_handoff_seconds_bucket{le=\"+Inf\"}"));
    assert!(text.contains("# TYPE corecast_pg_rls_check_seconds histogram"));
    // Every metric the Grafana dashboard reads exists (this server has a database, so all do).
    let dashboard = include_str!("../tuning/grafana/corecast.json");
    let mut names: Vec<&str> = dashboard
        .match_indices("corecast_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 15, "{names:?}");
    for name in names {
        assert!(text.contains(&format!("\n{name}")), "the dashboard reads {name}, which /metrics does not have");
    }
    assert!(lag >= 0.0 && kept >= lag, "lag {lag}, retained {kept}");
    // Seconds, not µs (which would read in the thousands): a unit check, not a latency bound.
    assert!((0.0..600.0).contains(&delay), "commit → hand-off {delay} s");
    assert!(text.contains("# TYPE corecast_pg_replication_lag_bytes gauge"));
}

/// A join that cannot be served yet (here the slot name is taken by a physical slot; in the
/// field: every replication slot in use) is told why at once, and subscribed once it works.
#[test]
fn pg_unusable_slot_is_reported_to_joins_then_recovers() {
    let db = TestDb::new("cc_badslot");
    db.sql("CREATE TABLE events (id int PRIMARY KEY)");
    db.pg.psql("postgres", &format!("SELECT pg_create_physical_replication_slot('{}')", db.slot()));
    let srv = server(&db, &[]);
    let mut c = Rx::connect(&srv.ws_url("2.0.0"));
    c.join("ev", "1", json!([{"event": "INSERT", "schema": "public", "table": "events"}]), json!({}));
    let err = c.system("ev");
    assert_eq!((err["status"].as_str(), err["extension"].as_str()), (Some("error"), Some("postgres_changes")), "{err}");
    let text = err["message"].as_str().unwrap();
    assert!(text.contains("not available yet") && text.contains("is not a pgoutput slot"), "{text}");
    // The operator frees the name: corecast creates its slot on its next try.
    db.pg.psql("postgres", &format!("SELECT pg_drop_replication_slot('{}')", db.slot()));
    c.subscribed("ev");
    insert_range(&db, 1..=2);
    assert_eq!(ids_of(&c.changes("ev", 2), "record"), [1, 2]);
}

#[test]
fn pg_corecast_restart_loses_nothing() {
    let db = TestDb::new("cc_ccrestart");
    db.sql("CREATE TABLE events (id int PRIMARY KEY)");
    let grace = "4000";
    let binding = json!([{"event": "INSERT", "schema": "public", "table": "events"}]);
    let srv = server(&db, &["--pg-resume-grace-ms", grace]);
    let mut c = Rx::connect(&srv.ws_url("2.0.0"));
    c.join("ev", "1", binding.clone(), json!({}));
    c.subscribed("ev");
    insert_range(&db, 1..=3);
    assert_eq!(ids_of(&c.changes("ev", 3), "record"), [1, 2, 3]);
    assert!(db.wait_acked(Duration::from_secs(10)), "corecast did not acknowledge what it delivered");
    // SIGKILL: nothing is flushed on the way out. Rows committed while corecast is down stay
    // in the slot.
    drop(c);
    drop(srv);
    insert_range(&db, 4..=6);
    let srv = server(&db, &["--pg-resume-grace-ms", grace]);
    let mut c = Rx::connect(&srv.ws_url("2.0.0"));
    c.join("ev", "1", binding, json!({}));
    c.subscribed("ev");
    insert_range(&db, 7..=7);
    let got = received(&mut c, 4, Duration::from_secs(20));
    let set: BTreeSet<i64> = got.iter().copied().collect();
    assert_eq!(set, (4..=7).collect(), "got {got:?}");
}

/// The unmodified realtime-js client: `tests/js/pg.test.mjs`, with a database (`DATABASE_URL`,
/// `CORECAST_SLOT` and `PSQL` for the file).
#[test]
fn pg_realtime_js() {
    // pg.test.mjs creates the role `anon`: not on the shared instance (see above).
    let db = TestDb::on(crate::util::pg::clients(), "cc_js");
    let (url, psql) = (db.url(), db.pg.psql_path());
    let env = [("DATABASE_URL", url.as_str()), ("CORECAST_SLOT", db.slot()), ("PSQL", psql.to_str().unwrap())];
    // Wall-clock limit for the file (it takes seconds; this only catches hangs).
    crate::interop::run_js_with("pg.test.mjs", &env, Duration::from_secs(120));
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The next SSE event named `event` (others are skipped), within 15 s.
fn sse_wait(s: &mut SseClient, event: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(e) = s.try_next(Duration::from_millis(500)) {
            if e.event == event {
                return e.data;
            }
        }
    }
    panic!("timed out waiting for SSE event {event}");
}

#[test]
fn pg_changes_over_sse() {
    let db = TestDb::new("cc_sse");
    db.sql(
        "DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         CREATE TABLE todos (id bigserial PRIMARY KEY, task text);
         CREATE TABLE notes (id bigserial PRIMARY KEY, owner text NOT NULL, body text);
         ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
         GRANT SELECT ON notes TO authenticated;
         CREATE POLICY own ON notes FOR SELECT TO authenticated
           USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');",
    );
    let srv = server(&db, &["--jwt-secret", SECRET]);
    let key = token(json!({"role": "anon"}));
    let bindings = json!([
        {"event": "INSERT", "schema": "public", "table": "todos"},
        {"event": "UPDATE", "table": "todos", "filter": "id=eq.1", "topic": "other"}
    ]);
    let path = format!(
        "/realtime/v1/sse?topic=todos&topic=other&apikey={key}&postgres_changes={}",
        enc(&bindings.to_string())
    );
    let mut s = SseClient::open(srv.addr, &path, &[]).expect("stream opens");
    let mut subscribed = BTreeSet::new();
    for _ in 0..2 {
        let sys = sse_wait(&mut s, "system");
        assert_eq!(
            (sys["event"].as_str(), sys["payload"]["extension"].as_str(), sys["payload"]["message"].as_str()),
            (Some("system"), Some("postgres_changes"), Some("Subscribed to PostgreSQL")),
            "{sys}"
        );
        subscribed.insert(sys["topic"].as_str().unwrap().to_string());
    }
    assert_eq!(subscribed, BTreeSet::from(["other".to_string(), "todos".to_string()]));
    db.sql("INSERT INTO todos (task) VALUES ('a'), ('b'); UPDATE todos SET task = 'c' WHERE id = 1;");
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(sse_wait(&mut s, "postgres_changes"));
    }
    let summary: Vec<(String, String, i64)> = got
        .iter()
        .map(|g| {
            assert_eq!(g["event"], "postgres_changes");
            (
                g["topic"].as_str().unwrap().to_string(),
                g["payload"]["data"]["type"].as_str().unwrap().to_string(),
                g["payload"]["data"]["record"]["id"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("todos".into(), "INSERT".into(), 1),
            ("todos".into(), "INSERT".into(), 2),
            ("other".into(), "UPDATE".into(), 1)
        ]
    );
    assert_eq!(got[0]["payload"]["data"]["record"], json!({"id": 1, "task": "a"}));
    assert_eq!(got[2]["payload"]["data"]["old_record"], json!({"id": 1}));
    assert_eq!(got[0]["payload"]["ids"].as_array().unwrap().len(), 1);
    assert_ne!(got[0]["payload"]["ids"], got[2]["payload"]["ids"]);
    // Broadcasts still flow on the same stream, with their resume ids.
    let (status, _, _) = crate::util::http(
        srv.addr,
        "POST",
        "/realtime/v1/api/broadcast/todos/events/note",
        &[("apikey", &key), ("content-type", "application/json")],
        br#"{"n":1}"#,
    );
    assert_eq!(status, 202);
    let b = sse_wait(&mut s, "broadcast");
    assert_eq!((b["event"].clone(), b["payload"].clone()), (json!("note"), json!({"n": 1})));

    // Row-level security uses the stream's own token.
    let path = |sub: &str| {
        let key = token(json!({"role": "authenticated", "sub": sub}));
        let b = enc(r#"[{"event":"*","schema":"public","table":"notes"}]"#);
        format!("/realtime/v1/sse?topic=notes&apikey={key}&postgres_changes={b}")
    };
    let mut u1 = SseClient::open(srv.addr, &path("u1"), &[]).expect("u1 stream");
    let mut u2 = SseClient::open(srv.addr, &path("u2"), &[]).expect("u2 stream");
    sse_wait(&mut u1, "system");
    sse_wait(&mut u2, "system");
    db.sql("INSERT INTO notes (owner, body) VALUES ('u2', 'x'), ('u1', 'y')");
    let c1 = sse_wait(&mut u1, "postgres_changes");
    assert_eq!(c1["payload"]["data"]["record"], json!({"id": 2, "owner": "u1", "body": "y"}));
    let c2 = sse_wait(&mut u2, "postgres_changes");
    assert_eq!(c2["payload"]["data"]["record"], json!({"id": 1, "owner": "u2", "body": "x"}));

    // Bad bindings are the request's error; bad filters come as a `system` error.
    for (q, want) in [
        ("not-json", "postgres_changes must be a JSON array"),
        (r#"[{"table":"todos","topic":"nope"}]"#, "not one of this stream's topics"),
        (r#"[{"table":"todos","colour":"red"}]"#, "unknown field"),
    ] {
        let err = SseClient::open(
            srv.addr,
            &format!("/realtime/v1/sse?topic=todos&apikey={key}&postgres_changes={}", enc(q)),
            &[],
        )
        .err()
        .expect("400");
        assert_eq!(err.0, 400, "{q}");
        assert!(err.1.contains(want), "{q}: {}", err.1);
    }
    let bad = enc(r#"[{"table":"todos","filter":"id=eq"}]"#);
    let mut s =
        SseClient::open(srv.addr, &format!("/realtime/v1/sse?topic=todos&apikey={key}&postgres_changes={bad}"), &[])
            .expect("stream opens");
    let sys = sse_wait(&mut s, "system");
    assert_eq!(sys["payload"]["status"], "error", "{sys}");
}

/// The Postgres history store: every acknowledged persisted message is a committed row; a
/// node with an empty disk continues the streams from the table; a clean shutdown keeps the
/// epoch, a crash does not; the bounds trim the table.
#[test]
fn history_in_postgres_is_shared_by_nodes() {
    let db = TestDb::new("hist");
    let a = server(&db, &[]);
    let count = |db: &TestDb, topic: &str| -> u64 {
        db.sql(&format!("SELECT count(*) FROM corecast.history WHERE topic = '{topic}'")).trim().parse().unwrap()
    };
    for n in 1..=5u64 {
        let body = json!({"messages": [{"topic": "room", "event": "m", "payload": {"n": n}, "persist": true}]});
        let (st, _, _) =
            crate::util::http(a.addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
        assert_eq!(st, 202);
        // The 202 comes after the COMMIT: the row is there already.
        assert_eq!(count(&db, "room"), n, "message {n} acknowledged before it was committed");
    }
    let (st, _, _) = crate::util::http(
        a.addr,
        "POST",
        "/realtime/v1/api/broadcast/room/events/bin?persist=true&private=true",
        &[("Content-Type", "application/octet-stream")],
        &[1, 2, 3],
    );
    assert_eq!(st, 202);
    // Not persisted: the recent window only, never a row.
    let body = json!({"messages": [{"topic": "room", "event": "m", "payload": {"n": 6}}]});
    let (st, _, _) = crate::util::http(a.addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
    assert_eq!(st, 202);
    assert_eq!(count(&db, "room"), 6, "five public rows and one private");
    // A record the database refuses (a NUL in a text column) is logged and skipped; the rest of
    // its batch is written and nothing is held back.
    let body = json!({"messages": [
        {"topic": "odd", "event": "bad\u{0}event", "payload": {}, "persist": true},
        {"topic": "odd", "event": "good", "payload": {}, "persist": true},
    ]});
    let (st, _, _) = crate::util::http(a.addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
    assert_eq!(st, 202);
    assert_eq!(db.sql("SELECT event FROM corecast.history WHERE topic = 'odd'").trim(), "good");
    let rows = db.sql("SELECT \"offset\", payload::text FROM corecast.history WHERE NOT private ORDER BY 1");
    assert!(rows.contains("5|{\"n\":5}") || rows.contains("5 | {\"n\":5}"), "rows: {rows}");
    let history = |srv: &Server, q: &str| -> Value {
        let (st, _, body) =
            crate::util::http(srv.addr, "GET", &format!("/realtime/v1/api/channels/room/messages{q}"), &[], b"");
        assert_eq!(st, 200);
        serde_json::from_slice(&body).unwrap()
    };
    let epoch = history(&a, "")["epoch"].as_str().unwrap().to_string();
    let (status, _) = a.terminate();
    assert!(status.success());

    // Another node, empty data directory, same database: the streams continue.
    let b = server(&db, &[]);
    let h = history(&b, "");
    assert_eq!(h["epoch"], epoch.as_str(), "a clean shutdown keeps the epoch");
    let offsets: Vec<u64> = h["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, vec![5, 4, 3, 2, 1], "the persisted messages, newest first (6 was not persisted)");
    assert_eq!(h["messages"][0]["payload"], json!({"n": 5}));
    let p = history(&b, "?private=true");
    assert_eq!(p["messages"][0]["payload"], "AQID");
    assert_eq!(p["messages"][0]["encoding"], "base64");
    let body = json!({"messages": [{"topic": "room", "event": "m", "payload": {"n": 7}, "persist": true}]});
    let (st, _, _) = crate::util::http(b.addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
    assert_eq!(st, 202);
    assert_eq!(history(&b, "?limit=1")["messages"][0]["offset"], 7, "offsets keep growing after 6");

    // A crash: the rows survive, the stream gets a new epoch; lower bounds trim the table.
    let c = b.crash_and_restart();
    let _ = c.terminate();
    let d = server(&db, &["--history-max-messages", "3"]);
    let h = history(&d, "");
    assert_ne!(h["epoch"], epoch.as_str(), "after a crash the stream gets a new epoch");
    let offsets: Vec<u64> = h["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, vec![7, 5, 4]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&db, "room") != 4 {
        assert!(Instant::now() < deadline, "the table was not trimmed to 3 public rows + 1 private");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `--history-store auto` with a database user that may not create `corecast.history`: the
/// history goes to the embedded log and everything else works; `--history-store postgres`
/// refuses to start with the reason.
#[test]
fn history_store_falls_back_to_the_log_without_privileges() {
    let db = TestDb::new("histpriv");
    // A replication user without CREATE on the database; the publication exists already.
    db.sql("CREATE ROLE histpriv_user LOGIN REPLICATION; CREATE PUBLICATION corecast FOR ALL TABLES");
    let url = db.url().replacen("postgres://postgres@", "postgres://histpriv_user@", 1);
    let srv = Server::start_with_env(&["--slot", db.slot()], &[("DATABASE_URL", &url)]);
    let body = json!({"messages": [{"topic": "t", "event": "m", "payload": {"n": 1}, "persist": true}]});
    let (st, _, _) =
        crate::util::http(srv.addr, "POST", "/realtime/v1/api/broadcast", &[], body.to_string().as_bytes());
    assert_eq!(st, 202);
    let srv = srv.restart();
    let (st, _, body) = crate::util::http(srv.addr, "GET", "/realtime/v1/api/channels/t/messages", &[], b"");
    assert_eq!(st, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["messages"][0]["payload"], json!({"n": 1}), "persisted in the log: {v}");
    assert_eq!(db.sql("SELECT count(*) FROM pg_namespace WHERE nspname = 'corecast'").trim(), "0");
    drop(srv);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corecast"))
        .args(["--listen", "127.0.0.1:0", "--history-store", "postgres", "--slot", db.slot()])
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot use the Postgres history store") && err.contains("permission denied"), "{err}");
}
