//! Row-level security, checked in batches: one transaction per distinct auth context per
//! batch of changes, never one query per subscriber per change.
//!
//! For each auth context (role + claims) with subscribers that matched changes to tables with
//! RLS enabled, one pipelined transaction runs on the pool, as PostgREST would run a request:
//!
//! ```sql
//! BEGIN READ ONLY;
//! SELECT set_config('role', $role, true), set_config('request.jwt.claims', $claims, true),
//!        set_config('request.jwt.claim.<k>', …), set_config('plan_cache_mode', …, true);
//! SELECT t."id"::text FROM "public"."todos" t WHERE t."id" = ANY($1::text[]::bigint[]); -- per table
//! COMMIT;
//! ```
//!
//! The statements are sent back to back (one round trip per context), and the answer is the
//! set of (context, change) pairs whose row the context can see now, under that role's
//! policies. A SQL error (missing role, no privilege) means not visible; a broken connection
//! is reported so the caller retries that context. [`check_one`] runs one context; the
//! engine runs them concurrently across the pool and delivers each context's changes as soon
//! as its check has answered.
//!
//! The key comparison must be usable as an index condition under the table's policies: only
//! leakproof conditions may be evaluated before a policy, and a cast of a column of the key
//! list (`t.id = u.k0::bigint`) is not leakproof, so Postgres would apply the policy to every
//! row of the table first. The key lists are therefore cast as a whole. Keys of one column
//! whose text form is canonical (integers, text, varchar, uuid) are matched with `= ANY` and a
//! generic plan (no planning per check); other keys go through `unnest` with custom plans
//! ([`check_sql`]).
//!
//! Private channels use the same settings around a probe on `realtime.messages`, as Supabase
//! does (`reference/realtime-protocol.md` §3.3): rows for the topic are inserted as corecast,
//! read back under the subscriber's role with `realtime.topic` set, and rolled back.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, Row};

use super::catalog::{ColMeta, TableMeta};
use super::db::{self, in_order, quote_ident, BoxFut, Conn};
use super::subscriptions::{AuthCtx, AuthId};

/// Sets `request.jwt.claims`, `request.jwt.claim.<key>` for each top-level claim with a
/// plain name (PostgREST's legacy settings), and `realtime.topic`.
const SET_CLAIMS: &str = "SELECT set_config('request.jwt.claims', $1, true), set_config('realtime.topic', $2, true), \
     (SELECT count(set_config('request.jwt.claim.' || key, value, true)) FROM jsonb_each_text($1::jsonb) \
      WHERE key ~ '^[A-Za-z_][A-Za-z0-9_]*$')";

/// [`SET_CLAIMS`] for a row check, plus the role (`set_config('role')` is `SET LOCAL ROLE`)
/// and the plan cache mode of the check queries.
const CHECK_SETTINGS: &str = "SELECT set_config('role', $3, true), set_config('plan_cache_mode', $4, true), \
     set_config('request.jwt.claims', $1, true), set_config('realtime.topic', $2, true), \
     (SELECT count(set_config('request.jwt.claim.' || key, value, true)) FROM jsonb_each_text($1::jsonb) \
      WHERE key ~ '^[A-Za-z_][A-Za-z0-9_]*$')";

/// Whether a role name may be set for a check. `none` is what `SET ROLE NONE` sets (quoted
/// or not, and through `set_config`): it would run the check as corecast's own database
/// user, which may bypass row-level security. A token with `"role": "none"` sees nothing.
pub fn settable_role(role: &str) -> bool {
    role != "none"
}

/// Key types whose text form is canonical: `key::text` gives back the text pgoutput sent
/// (int2, int4, int8, text, varchar, uuid), so visible keys can be matched by their text.
const CANONICAL_TEXT: [u32; 6] = [21, 23, 20, 25, 1043, 2950];

/// How one table's rows are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub sql: String,
    /// `true`: one key column, the query takes the distinct keys (`$1`) and returns the
    /// visible ones as text; `false`: it takes the change indices (`$1`) and one key list per
    /// key column (`$2`…) and returns the visible indices.
    pub by_key: bool,
}

/// The visibility query for one table: which of the given primary keys the current role sees.
pub fn check_sql(t: &TableMeta) -> Option<Check> {
    let pk: Vec<&ColMeta> = t.pk().collect();
    let table = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
    match pk.as_slice() {
        [] => None,
        [c] if CANONICAL_TEXT.contains(&c.type_oid) => Some(Check {
            sql: format!(
                "SELECT t.{col}::text FROM {table} t WHERE t.{col} = ANY($1::text[]::{ty}[])",
                col = quote_ident(&c.name),
                ty = c.sql_type
            ),
            by_key: true,
        }),
        pk => {
            // Array-typed keys keep the per-row cast (a whole-array cast of their text would
            // not parse): correct, but not an index condition.
            let is_array = |c: &ColMeta| c.sql_type.ends_with(']');
            let arrays: Vec<String> = pk
                .iter()
                .enumerate()
                .map(|(i, c)| match is_array(c) {
                    true => format!("${}::text[]", i + 2),
                    false => format!("${}::text[]::{}[]", i + 2, c.sql_type),
                })
                .collect();
            let names: Vec<String> = (0..pk.len()).map(|i| format!("k{i}")).collect();
            let conds: Vec<String> = pk
                .iter()
                .enumerate()
                .map(|(i, c)| match is_array(c) {
                    true => format!("t.{} = u.k{i}::{}", quote_ident(&c.name), c.sql_type),
                    false => format!("t.{} = u.k{i}", quote_ident(&c.name)),
                })
                .collect();
            Some(Check {
                sql: format!(
                    "SELECT u.i FROM unnest($1::int4[], {}) AS u(i, {}) WHERE EXISTS (SELECT 1 FROM {table} t WHERE {})",
                    arrays.join(", "),
                    names.join(", "),
                    conds.join(" AND ")
                ),
                by_key: false,
            })
        }
    }
}

/// The rows of one table to check for one context.
#[derive(Debug, Clone)]
pub struct TableRows {
    pub check: Arc<Check>,
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

/// The parameters of one table's check query.
enum Params<'a> {
    /// Distinct keys, and the changes of each.
    ByKey(Vec<&'a str>, HashMap<&'a str, Vec<i32>>),
    ByIndex,
}

/// Runs one context's checks on `conn`: the indices of the changes whose rows it sees. `Err`
/// only for a broken connection (SQL errors mean not visible).
pub async fn check_one(conn: &Conn, job: &CtxRows) -> Result<Vec<i32>, Error> {
    if !settable_role(&job.ctx.role) {
        return Ok(Vec::new());
    }
    let settings = conn.prepare(CHECK_SETTINGS).await?;
    let mut stmts = Vec::with_capacity(job.tables.len());
    for t in &job.tables {
        stmts.push(conn.prepare(&t.check.sql).await?);
    }
    let prepared: Vec<Params<'_>> = job
        .tables
        .iter()
        .map(|t| match t.check.by_key {
            true => {
                let mut by: HashMap<&str, Vec<i32>> = HashMap::with_capacity(t.items.len());
                let mut distinct = Vec::with_capacity(t.items.len());
                for (&item, key) in t.items.iter().zip(&t.keys[0]) {
                    by.entry(key.as_str())
                        .or_insert_with(|| {
                            distinct.push(key.as_str());
                            Vec::new()
                        })
                        .push(item);
                }
                Params::ByKey(distinct, by)
            }
            false => Params::ByIndex,
        })
        .collect();
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = job
        .tables
        .iter()
        .zip(&prepared)
        .map(|(t, p)| match p {
            Params::ByKey(distinct, _) => vec![distinct as &(dyn ToSql + Sync)],
            Params::ByIndex => {
                let mut p: Vec<&(dyn ToSql + Sync)> = vec![&t.items];
                p.extend(t.keys.iter().map(|k| k as &(dyn ToSql + Sync)));
                p
            }
        })
        .collect();
    // A generic plan (no planning per check) only when every query is an `= ANY` on a key: the
    // `unnest` joins need custom plans to stay index lookups.
    let plans = if job.tables.iter().all(|t| t.check.by_key) { "force_generic_plan" } else { "auto" };
    let topic = "";
    let settings_params: [&(dyn ToSql + Sync); 4] = [&job.ctx.claims, &topic, &job.ctx.role, &plans];
    let c = &conn.client;
    let mut futs: Vec<BoxFut<'_, Result<Vec<Row>, Error>>> = Vec::with_capacity(job.tables.len() + 3);
    futs.push(Box::pin(async { c.batch_execute("BEGIN READ ONLY").await.map(|_| Vec::new()) }));
    futs.push(Box::pin(c.query(&settings, &settings_params)));
    for (st, p) in stmts.iter().zip(&params) {
        futs.push(Box::pin(c.query(st, p)));
    }
    futs.push(Box::pin(async { c.batch_execute("COMMIT").await.map(|_| Vec::new()) }));
    let results = in_order(futs).await;
    let mut visible = Vec::new();
    for (r, p) in results.into_iter().skip(2).take(job.tables.len()).zip(&prepared) {
        match (r, p) {
            (Ok(rows), Params::ByKey(_, by)) => {
                for row in &rows {
                    if let Some(items) = by.get(row.get::<_, &str>(0)) {
                        visible.extend_from_slice(items);
                    }
                }
            }
            (Ok(rows), Params::ByIndex) => visible.extend(rows.iter().map(|row| row.get::<_, i32>(0))),
            (Err(e), _) if db::is_sql_error(&e) => {
                tracing::debug!(role = %job.ctx.role, error = %e, "RLS check refused: rows not visible");
            }
            (Err(e), _) => return Err(e),
        }
    }
    Ok(visible)
}

/// Whether every transaction `xids` (32-bit, as pgoutput sends them) is visible to a snapshot
/// taken now, its epoch taken from the snapshot's `xmax`.
const VISIBLE: &str = "SELECT coalesce(bool_and(pg_visible_in_snapshot(((((pg_snapshot_xmax(s)::text::int8 >> 32) \
     - (x > (pg_snapshot_xmax(s)::text::int8 & 4294967295))::int) << 32) | x)::text::xid8, s)), true) \
     FROM pg_current_snapshot() s, unnest($1::int8[]) x";

/// Whether the transactions `xids` are visible to new snapshots. The replication stream sends
/// a commit once its WAL is flushed, which can be a moment before the committing backend has
/// left the proc array: a check that ran then would not see the rows yet and drop them. Once
/// a snapshot sees a transaction, every later snapshot (any connection) does.
pub async fn committed_visible(conn: &Conn, xids: &[u32]) -> Result<bool, Error> {
    let st = conn.prepare(VISIBLE).await?;
    let xids: Vec<i64> = xids.iter().map(|&x| x as i64).collect();
    let row = conn.client.query_one(&st, &[&xids]).await?;
    Ok(row.get(0))
}

const PROBE_INSERT: &str = "INSERT INTO realtime.messages (id, topic, extension, private) \
     VALUES ($1::text::uuid, $3, 'broadcast', true), ($2::text::uuid, $3, 'presence', true)";

const PROBE_SELECT: &str = "SELECT extension::text FROM realtime.messages WHERE id IN ($1::text::uuid, $2::text::uuid)";

/// Whether `ctx` may read the private `topic`: at least one probe row (broadcast or presence)
/// is visible under its role and claims. `Err` only for a broken connection.
pub async fn authorize_private(conn: &Conn, ctx: &AuthCtx, topic: &str) -> Result<bool, Error> {
    if !settable_role(&ctx.role) {
        return Ok(false);
    }
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

/// Groups `(auth, table check, change, key values)` into per-context jobs.
pub fn group(rows: impl IntoIterator<Item = (AuthId, Arc<AuthCtx>, Arc<Check>, i32, Vec<String>)>) -> Vec<CtxRows> {
    let mut by_ctx: HashMap<AuthId, CtxRows> = HashMap::new();
    for (auth, ctx, check, item, key) in rows {
        let job = by_ctx.entry(auth).or_insert_with(|| CtxRows { auth, ctx, tables: Vec::new() });
        let t = match job.tables.iter().position(|t| Arc::ptr_eq(&t.check, &check) || t.check == check) {
            Some(i) => &mut job.tables[i],
            None => {
                job.tables.push(TableRows {
                    check,
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

    fn meta(pk: &[(&str, u32, &str)]) -> TableMeta {
        TableMeta {
            relid: 1,
            schema: "public".into(),
            name: "to\"dos".into(),
            rls: true,
            published: true,
            columns: pk
                .iter()
                .map(|(n, oid, t)| ColMeta {
                    name: n.to_string(),
                    type_oid: *oid,
                    typname: String::new(),
                    sql_type: t.to_string(),
                    pk: true,
                })
                .collect(),
        }
    }

    #[test]
    fn check_queries() {
        // One key column with a canonical text form: `= ANY` over the whole cast list.
        let by_key = check_sql(&meta(&[("id", 20, "bigint")])).unwrap();
        assert!(by_key.by_key);
        assert_eq!(
            by_key.sql,
            r#"SELECT t."id"::text FROM "public"."to""dos" t WHERE t."id" = ANY($1::text[]::bigint[])"#
        );
        assert!(check_sql(&meta(&[("id", 2950, "uuid")])).unwrap().sql.ends_with("ANY($1::text[]::uuid[])"));
        // Others: `unnest` with the lists cast as a whole, so the join condition casts no column.
        let ts = check_sql(&meta(&[("at", 1184, "timestamp with time zone")])).unwrap();
        assert!(!ts.by_key);
        assert_eq!(
            ts.sql,
            r#"SELECT u.i FROM unnest($1::int4[], $2::text[]::timestamp with time zone[]) AS u(i, k0) WHERE EXISTS (SELECT 1 FROM "public"."to""dos" t WHERE t."at" = u.k0)"#
        );
        let two = check_sql(&meta(&[("a", 23, "integer"), ("b", 25, "text")])).unwrap();
        assert!(two.sql.contains("unnest($1::int4[], $2::text[]::integer[], $3::text[]::text[]) AS u(i, k0, k1)"));
        assert!(two.sql.contains(r#"t."a" = u.k0 AND t."b" = u.k1"#));
        let arr = check_sql(&meta(&[("a", 1007, "integer[]")])).unwrap();
        assert!(arr.sql.contains(
            r#"unnest($1::int4[], $2::text[]) AS u(i, k0) WHERE EXISTS (SELECT 1 FROM "public"."to""dos" t WHERE t."a" = u.k0::integer[])"#
        ));
        assert!(check_sql(&meta(&[])).is_none());
        assert!(!settable_role("none") && settable_role("NONE") && settable_role("anon"));
    }

    #[test]
    fn grouping_by_context_then_table() {
        let ctx = |r: &str| Arc::new(AuthCtx { role: r.into(), claims: "{}".into() });
        let check = |sql: &str| Arc::new(Check { sql: sql.into(), by_key: false });
        let (a, b) = (check("qa"), check("qb"));
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
