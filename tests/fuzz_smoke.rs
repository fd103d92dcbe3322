//! Runs every fuzz target (`corecast::fuzzing`) on seed inputs and on random and mutated
//! bytes: the parsers must never panic. libFuzzer does the deep search (`cargo fuzz run
//! <target>`, see fuzz/README.md); this keeps every target exercised on each test run.

use corecast::fuzzing::TARGETS;

/// Inputs that reach deep into each parser, mutated from here.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let s = |x: &str| x.as_bytes().to_vec();
    match target {
        "ws_conn" => {
            let mut masked = vec![0x03, 0x81, 0x85, 1, 2, 3, 4];
            masked.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]));
            vec![masked, vec![7, 0x89, 0x80, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x80, 0x80, 0, 0, 0, 0]]
        }
        "http_request" => vec![
            s("GET /realtime/v1/websocket?apikey=x&vsn=2.0.0 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"),
            s("POST /api/broadcast HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        ],
        "phoenix_decode" | "session" => vec![
            s(r#"["6","6","realtime:room1","phx_join",{"config":{"broadcast":{"self":true,"ack":true},"presence":{"key":"u1","enabled":true},"postgres_changes":[{"event":"INSERT","schema":"public","table":"todos","filter":"id=eq.1"}],"private":false}}]"#),
            s(r#"["6","7","realtime:room1","broadcast",{"type":"broadcast","event":"e","payload":{"x":1}}]"#),
            s(r#"["6","8","realtime:room1","presence",{"type":"presence","event":"track","payload":{"a":1}}]"#),
            s(r#"[null,"9","phoenix","heartbeat",{}]"#),
            s(r#"["6","10","realtime:room1","access_token",{"access_token":"a.b.c"}]"#),
            s(r#"["6","11","realtime:room1","phx_leave",{}]"#),
            s(r#"{"topic":"realtime:r","event":"phx_join","payload":{},"ref":"1","join_ref":"1"}"#),
            b"\x03\x01\x01\x0e\x06\x00\x0167realtime:room1cursor{\"x\":2}".to_vec(),
        ],
        "join_config" => vec![s(
            r#"{"config":{"broadcast":{"self":"true","replay":{"since":1,"limit":3},"resume":{"epoch":"e","offset":"4"}},"presence":{"key":7},"postgres_changes":[{"event":"*"},{}],"private":true},"access_token":"x"}"#,
        )],
        "sse_token" => vec![s("9f2c0a1be44d7a10-42.0c77aa19d2e1f3b4-7")],
        "log_records" => {
            let topic = corecast::protocol::phoenix::Topic::new("room", true).unwrap();
            let mut buf = Vec::new();
            corecast::store::log::encode(
                &corecast::store::log::Record::Checkpoint { topic, epoch: "ep".into(), last_offset: 9 },
                &mut buf,
            );
            vec![buf]
        }
        "cluster_batch" => {
            use corecast::cluster::wire::{encode, Batch, Item, Member};
            let topic = corecast::protocol::phoenix::Topic::new("room", false).unwrap();
            let items = vec![Item::Track { topic, member: Member { shard: 1, conn: 7 }, key: "k".into(), meta: "{}".into() }];
            vec![encode(&Batch { run: 3, items })]
        }
        "pgoutput" => vec![vec![b'B', 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3]],
        "pg_filter" => vec![s("id=eq.1,name=not.in.(\"a,b\",c),created_at=gte.2024-01-01T00:00:00Z")],
        _ => vec![],
    }
}

fn mutate(rng: &mut fastrand::Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.usize(1..6) {
        match rng.u8(0..5) {
            0 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.u8(0..8);
            }
            1 if !v.is_empty() => v.truncate(rng.usize(..v.len())),
            2 => {
                let i = rng.usize(..=v.len());
                v.insert(i, rng.u8(..));
            }
            3 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] = *[0u8, 0xff, b'"', b'{', b'[', b',', b':', b'\\', 0x7f, 3].get(rng.usize(..10)).unwrap();
            }
            _ => v.extend((0..rng.usize(0..16)).map(|_| rng.u8(..))),
        }
    }
    v
}

/// Inputs libFuzzer once crashed a target with (`tests/fuzz_regressions/<target>-<what>`).
#[test]
fn past_fuzz_crashes_stay_fixed() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz_regressions");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let target = name.split('-').next().unwrap();
        let (_, f) = TARGETS.iter().find(|(n, _)| *n == target).unwrap_or_else(|| panic!("no target for {name}"));
        f(&std::fs::read(&path).unwrap());
    }
}

#[test]
fn fuzz_targets_survive_random_and_mutated_inputs() {
    let mut rng = fastrand::Rng::with_seed(0xC0DE);
    for (name, f) in TARGETS {
        let seeds = seeds(name);
        for s in &seeds {
            f(s);
        }
        for i in 0..4000 {
            let input = match (seeds.is_empty(), i % 4) {
                (false, 0..=2) => {
                    let pick = rng.usize(..seeds.len());
                    mutate(&mut rng, &seeds[pick])
                }
                _ => (0..rng.usize(0..256)).map(|_| rng.u8(..)).collect(),
            };
            f(&input);
        }
    }
}
