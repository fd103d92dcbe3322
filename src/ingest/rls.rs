//! Row-level security, checked in batches: one transaction per distinct auth context per
//! batch of changes, never one query per subscriber per change.
//!
//! For each auth context (role + claims) with subscribers that matched changes to tables with
//! RLS enabled, one pipelined transaction runs on the pool, as PostgREST would run a request:
//!
//! ```sql
//! BEGIN READ ONLY; SET LOCAL ROLE "authenticated";
//! SELECT set_config('request.jwt.claims', $claims, true), set_config('request.jwt.claim.<k>', …);
//! SELECT u.i FROM unnest($1::int4[], $2::text[]) AS u(i, k0)
//!   WHERE EXISTS (SELECT 1 FROM "public"."todos" t WHERE t."id" = u.k0::bigint);   -- per table
//! COMMIT;
//! ```
//!
//! The statements are sent back to back (one round trip per context), contexts run
//! concurrently across the pool, and the answer is the set of (context, change) pairs whose
//! row the context can see now, under that role's policies. A SQL error (missing role, no
//! privilege) means not visible; a broken connection is reported so the caller retries.
//!
//! Private channels use the same settings around a probe on `realtime.messages`, as Supabase
//! does (`reference/realtime-protocol.md` §3.3): rows for the topic are inserted as corecast,
//! read back under the subscriber's role with `realtime.topic` set, and rolled back.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, Row};

use super::catalog::TableMeta;
use super::db::{self, in_order, quote_ident, BoxFut, Conn, Db};
use super::subscriptions::{AuthCtx, AuthId};

/// Sets `request.jwt.claims`, `request.jwt.claim.<key>` for each top-level claim with a
/// plain name (PostgREST's legacy settings), and `realtime.topic`.
const SET_CLAIMS: &str = "SELECT set_config('request.jwt.claims', $1, true), set_config('realtime.topic', $2, true), \
     (SELECT count(set_config('request.jwt.claim.' || key, value, true)) FROM jsonb_each_text($1::jsonb) \
      WHERE key ~ '^[A-Za-z_][A-Za-z0-9_]*$')";

/// The visibility query for one table: which of the given primary keys the current role sees.
pub fn check_sql(t: &TableMeta) -> Option<String> {
    let pk: Vec<_> = t.pk().collect();
    if pk.is_empty() {
        return None;
    }
    let arrays: Vec<String> = (0..pk.len()).map(|i| format!("${}::text[]", i + 2)).collect();
    let names: Vec<String> = (0..pk.len()).map(|i| format!("k{i}")).collect();
    let conds: Vec<String> =
        pk.iter().enumerate().map(|(i, c)| format!("t.{} = u.k{i}::{}", quote_ident(&c.name), c.sql_type)).collect();
    Some(format!(
        "SELECT u.i FROM unnest($1::int4[], {}) AS u(i, {}) WHERE EXISTS (SELECT 1 FROM {}.{} t WHERE {})",
        arrays.join(", "),
        names.join(", "),
        quote_ident(&t.schema),
        quote_ident(&t.name),
        conds.join(" AND ")
    ))
}

/// The rows of one table to check for one context.
#[derive(Debug, Clone)]
pub struct TableRows {
    pub sql: Arc<str>,
    /// Change indices (returned when visible).
    pub items: Vec<i32>,
    /// Primary key text values, one vector per key column, aligned with `items`.
    pub keys: Vec<Vec<String>>,
}

/// One auth context's checks.
#[derive(Debug, Clone)]
pub struct CtxRows {
    pub auth: AuthId,
    pub ctx: Arc<AuthCtx>,
    pub tables: Vec<TableRows>,
}

fn settings_prefix(role: &str) -> String {
    format!("BEGIN READ ONLY; SET LOCAL ROLE {}", quote_ident(role))
}

async fn check_one(conn: Rc<Conn>, job: CtxRows) -> Result<(AuthId, Vec<i32>), Error> {
    let claims_st = conn.prepare(SET_CLAIMS).await?;
    let mut stmts = Vec::with_capacity(job.tables.len());
    for t in &job.tables {
        stmts.push(conn.prepare(&t.sql).await?);
    }
    let begin = settings_prefix(&job.ctx.role);
    let topic = "";
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = job
        .tables
        .iter()
        .map(|t| {
            let mut p: Vec<&(dyn ToSql + Sync)> = vec![&t.items];
            p.extend(t.keys.iter().map(|k| k as &(dyn ToSql + Sync)));
            p
        })
        .collect();
    let claims_params: [&(dyn ToSql + Sync); 2] = [&job.ctx.claims, &topic];
    let c = &conn.client;
    let mut futs: Vec<BoxFut<'_, Result<Vec<Row>, Error>>> = Vec::with_capacity(job.tables.len() + 3);
    futs.push(Box::pin(async { c.batch_execute(&begin).await.map(|_| Vec::new()) }));
    futs.push(Box::pin(c.query(&claims_st, &claims_params)));
    for (st, p) in stmts.iter().zip(&params) {
        futs.push(Box::pin(c.query(st, p)));
    }
    futs.push(Box::pin(async { c.batch_execute("COMMIT").await.map(|_| Vec::new()) }));
    let results = in_order(futs).await;
    let mut visible = Vec::new();
    for r in results.into_iter().skip(2).take(job.tables.len()) {
        match r {
            Ok(rows) => visible.extend(rows.iter().map(|row| row.get::<_, i32>(0))),
            Err(e) if db::is_sql_error(&e) => {
                tracing::debug!(role = %job.ctx.role, error = %e, "RLS check refused: rows not visible");
            }
            Err(e) => return Err(e),
        }
    }
    Ok((job.auth, visible))
}

/// Runs the checks, spread over the pool, and returns the visible (context, change) pairs.
/// Fails only if a connection broke (the caller retries the whole batch).
pub async fn check(db: &Db, jobs: Vec<CtxRows>) -> Result<HashSet<(AuthId, i32)>, Error> {
    let mut conns = Vec::with_capacity(db.size());
    for i in 0..db.size() {
        conns.push(db.get(i).await?);
    }
    let handles: Vec<_> = jobs
        .into_iter()
        .enumerate()
        .map(|(i, job)| tokio::task::spawn_local(check_one(conns[i % conns.len()].clone(), job)))
        .collect();
    let mut out = HashSet::new();
    let mut failed = None;
    for h in handles {
        match h.await {
            Ok(Ok((auth, items))) => out.extend(items.into_iter().map(|i| (auth, i))),
            Ok(Err(e)) => failed = Some(e),
            Err(join) => tracing::error!(error = %join, "RLS check task failed"),
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

const PROBE_INSERT: &str = "INSERT INTO realtime.messages (id, topic, extension, private) \
     VALUES ($1::text::uuid, $3, 'broadcast', true), ($2::text::uuid, $3, 'presence', true)";

const PROBE_SELECT: &str = "SELECT extension::text FROM realtime.messages WHERE id IN ($1::text::uuid, $2::text::uuid)";

/// Whether `ctx` may read the private `topic`: at least one probe row (broadcast or presence)
/// is visible under its role and claims. `Err` only for a broken connection.
pub async fn authorize_private(conn: &Conn, ctx: &AuthCtx, topic: &str) -> Result<bool, Error> {
    let ins = conn.prepare(PROBE_INSERT).await;
    let ins = match ins {
        Ok(s) => s,
        Err(e) if db::is_sql_error(&e) => {
            tracing::warn!(error = %e, "private channel check: cannot use realtime.messages; refusing");
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let sel = conn.prepare(PROBE_SELECT).await?;
    let claims_st = conn.prepare(SET_CLAIMS).await?;
    let mut rng = fastrand::Rng::new();
    let (a, b) = (
        crate::protocol::phoenix::session::format_uuid(rng.u128(..)),
        crate::protocol::phoenix::session::format_uuid(rng.u128(..)),
    );
    let c = &conn.client;
    let set_role = format!("SET LOCAL ROLE {}", quote_ident(&ctx.role));
    let claims_params: [&(dyn ToSql + Sync); 2] = [&ctx.claims, &topic];
    let sel_params: [&(dyn ToSql + Sync); 2] = [&a, &b];
    let futs: Vec<BoxFut<'_, Result<Vec<Row>, Error>>> = vec![
        Box::pin(async { c.batch_execute("BEGIN").await.map(|_| Vec::new()) }),
        Box::pin(async { c.execute(&ins, &[&a, &b, &topic]).await.map(|_| Vec::new()) }),
        Box::pin(async { c.batch_execute(&set_role).await.map(|_| Vec::new()) }),
        Box::pin(c.query(&claims_st, &claims_params)),
        Box::pin(c.query(&sel, &sel_params)),
        Box::pin(async { c.batch_execute("ROLLBACK").await.map(|_| Vec::new()) }),
    ];
    let mut results = in_order(futs).await;
    if let Some(pos) = results.iter().position(|r| matches!(r, Err(e) if !db::is_sql_error(e))) {
        results.swap_remove(pos)?;
    }
    match &results[4] {
        Ok(rows) => Ok(!rows.is_empty()),
        Err(e) => {
            tracing::debug!(role = %ctx.role, topic, error = %e, "private channel probe refused");
            Ok(false)
        }
    }
}

/// Groups `(auth, table, change, key values)` into per-context jobs.
pub fn group(rows: impl IntoIterator<Item = (AuthId, Arc<AuthCtx>, Arc<str>, i32, Vec<String>)>) -> Vec<CtxRows> {
    let mut by_ctx: HashMap<AuthId, CtxRows> = HashMap::new();
    for (auth, ctx, sql, item, key) in rows {
        let job = by_ctx.entry(auth).or_insert_with(|| CtxRows { auth, ctx, tables: Vec::new() });
        let t = match job.tables.iter().position(|t| t.sql == sql) {
            Some(i) => &mut job.tables[i],
            None => {
                job.tables.push(TableRows {
                    sql,
                    items: Vec::new(),
                    keys: (0..key.len()).map(|_| Vec::new()).collect(),
                });
                job.tables.last_mut().expect("just pushed")
            }
        };
        if t.keys.len() != key.len() {
            continue;
        }
        t.items.push(item);
        for (k, v) in t.keys.iter_mut().zip(key) {
            k.push(v);
        }
    }
    let mut v: Vec<CtxRows> = by_ctx.into_values().collect();
    v.sort_by_key(|j| j.auth);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::catalog::ColMeta;

    fn meta(pk: &[(&str, &str)]) -> TableMeta {
        TableMeta {
            relid: 1,
            schema: "public".into(),
            name: "to\"dos".into(),
            rls: true,
            published: true,
            columns: pk
                .iter()
                .map(|(n, t)| ColMeta {
                    name: n.to_string(),
                    type_oid: 0,
                    typname: String::new(),
                    sql_type: t.to_string(),
                    pk: true,
                })
                .collect(),
        }
    }

    #[test]
    fn check_queries() {
        assert_eq!(
            check_sql(&meta(&[("id", "bigint")])).unwrap(),
            r#"SELECT u.i FROM unnest($1::int4[], $2::text[]) AS u(i, k0) WHERE EXISTS (SELECT 1 FROM "public"."to""dos" t WHERE t."id" = u.k0::bigint)"#
        );
        let two = check_sql(&meta(&[("a", "integer"), ("b", "text")])).unwrap();
        assert!(two.contains("unnest($1::int4[], $2::text[], $3::text[]) AS u(i, k0, k1)"));
        assert!(two.contains(r#"t."a" = u.k0::integer AND t."b" = u.k1::text"#));
        assert!(check_sql(&meta(&[])).is_none());
        assert_eq!(settings_prefix("x\"y"), r#"BEGIN READ ONLY; SET LOCAL ROLE "x""y""#);
    }

    #[test]
    fn grouping_by_context_then_table() {
        let ctx = |r: &str| Arc::new(AuthCtx { role: r.into(), claims: "{}".into() });
        let (a, b): (Arc<str>, Arc<str>) = ("qa".into(), "qb".into());
        let jobs = group(vec![
            (1, ctx("u"), a.clone(), 0, vec!["1".into()]),
            (2, ctx("v"), a.clone(), 0, vec!["1".into()]),
            (1, ctx("u"), b.clone(), 1, vec!["x".into(), "y".into()]),
            (1, ctx("u"), a.clone(), 2, vec!["3".into()]),
        ]);
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].tables.len(), 2);
        assert_eq!(jobs[0].tables[0].items, vec![0, 2]);
        assert_eq!(jobs[0].tables[0].keys, vec![vec!["1".to_string(), "3".to_string()]]);
        assert_eq!(jobs[0].tables[1].keys.len(), 2);
    }
}
