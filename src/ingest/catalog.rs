//! Catalog lookups: tables (row-level security flag, primary key, columns, publication
//! membership), types and column privileges, each one prepared query.

use std::sync::Arc;

use tokio_postgres::Error;

use super::db::{self, Conn};
use super::types::CatalogType;

/// A table as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableMeta {
    pub relid: u32,
    pub schema: String,
    pub name: String,
    /// `relrowsecurity`: row-level security is enabled.
    pub rls: bool,
    /// In the publication corecast streams.
    pub published: bool,
    pub columns: Vec<ColMeta>,
}

impl TableMeta {
    /// `schema.name`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The primary key columns, in attribute order.
    pub fn pk(&self) -> impl Iterator<Item = &ColMeta> {
        self.columns.iter().filter(|c| c.pk)
    }
}

/// A column of a [`TableMeta`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColMeta {
    pub name: String,
    pub type_oid: u32,
    pub typname: String,
    /// `format_type(atttypid, atttypmod)`: usable in a cast.
    pub sql_type: String,
    pub pk: bool,
}

const TABLE_BY_NAME: &str = "SELECT c.oid, n.nspname::text, c.relname::text, c.relrowsecurity, \
     EXISTS (SELECT 1 FROM pg_publication_tables p WHERE p.pubname = $3 AND p.schemaname = n.nspname AND p.tablename = c.relname) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')";

const TABLE_BY_OID: &str = "SELECT c.oid, n.nspname::text, c.relname::text, c.relrowsecurity, \
     EXISTS (SELECT 1 FROM pg_publication_tables p WHERE p.pubname = $2 AND p.schemaname = n.nspname AND p.tablename = c.relname) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.oid = $1";

const COLUMNS: &str = "SELECT a.attname::text, a.atttypid, t.typname::text, format_type(a.atttypid, a.atttypmod), \
     coalesce(a.attnum = ANY (i.indkey), false) \
     FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
     LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";

const SCHEMA: &str = "SELECT 1 FROM pg_namespace WHERE nspname = $1";

const TYPES: &str = "SELECT oid, typname::text, typtype::text, typbasetype, typelem, typcategory::text \
     FROM pg_type WHERE oid = ANY ($1)";

const PRIVILEGES: &str = "SELECT a.attname::text FROM pg_attribute a \
     WHERE a.attrelid = $2 AND a.attnum > 0 AND NOT a.attisdropped \
     AND has_column_privilege($1::text::name, a.attrelid, a.attnum, 'SELECT') ORDER BY a.attnum";

async fn table(
    conn: &Conn,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<TableMeta>, Error> {
    let st = conn.prepare(sql).await?;
    let Some(row) = conn.client.query_opt(&st, params).await? else {
        return Ok(None);
    };
    let relid: u32 = row.get(0);
    let cols = conn.prepare(COLUMNS).await?;
    let columns = conn
        .client
        .query(&cols, &[&relid])
        .await?
        .into_iter()
        .map(|r| ColMeta { name: r.get(0), type_oid: r.get(1), typname: r.get(2), sql_type: r.get(3), pk: r.get(4) })
        .collect();
    Ok(Some(TableMeta { relid, schema: row.get(1), name: row.get(2), rls: row.get(3), published: row.get(4), columns }))
}

/// The table `schema.name` (ordinary or partitioned), if it exists.
pub async fn table_by_name(
    conn: &Conn,
    schema: &str,
    name: &str,
    publication: &str,
) -> Result<Option<TableMeta>, Error> {
    table(conn, TABLE_BY_NAME, &[&schema, &name, &publication]).await
}

/// The table with `relid`, if it still exists.
pub async fn table_by_oid(conn: &Conn, relid: u32, publication: &str) -> Result<Option<Arc<TableMeta>>, Error> {
    Ok(table(conn, TABLE_BY_OID, &[&relid, &publication]).await?.map(Arc::new))
}

/// Whether the schema exists.
pub async fn schema_exists(conn: &Conn, schema: &str) -> Result<bool, Error> {
    let st = conn.prepare(SCHEMA).await?;
    Ok(conn.client.query_opt(&st, &[&schema]).await?.is_some())
}

/// `pg_type` rows for `oids`.
pub async fn types(conn: &Conn, oids: &[u32]) -> Result<Vec<CatalogType>, Error> {
    let st = conn.prepare(TYPES).await?;
    let byte = |s: String| s.bytes().next().unwrap_or(b' ');
    Ok(conn
        .client
        .query(&st, &[&oids])
        .await?
        .into_iter()
        .map(|r| CatalogType {
            oid: r.get(0),
            name: r.get(1),
            typtype: byte(r.get(2)),
            base: r.get(3),
            elem: r.get(4),
            category: byte(r.get(5)),
        })
        .collect())
}

/// The columns of `relid` that `role` may `SELECT`; `None` when the role does not exist.
pub async fn column_privileges(conn: &Conn, role: &str, relid: u32) -> Result<Option<Vec<String>>, Error> {
    let st = conn.prepare(PRIVILEGES).await?;
    match conn.client.query(&st, &[&role, &relid]).await {
        Ok(rows) => Ok(Some(rows.into_iter().map(|r| r.get(0)).collect())),
        Err(e) if db::is_sql_error(&e) => Ok(None),
        Err(e) => Err(e),
    }
}
