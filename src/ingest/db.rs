//! A small pool of tokio-postgres connections on the ingest thread (catalog lookups,
//! subscription checks, row-level security, private channel probes), with per-connection
//! prepared-statement caches and in-order request pipelining.
//!
//! A connection that broke is replaced on its next use. Requests issued by one future of
//! [`in_order`] reach the server back to back, so a transaction (`BEGIN`, settings, queries,
//! `COMMIT`) costs one round trip however many statements it has.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use tokio_postgres::{Client, Error, NoTls, Statement};

/// `statement_timeout` of pool connections, unless the database URL sets one.
pub const STATEMENT_TIMEOUT_MS: u32 = 10_000;

/// A pooled connection.
pub struct Conn {
    pub client: Client,
    stmts: RefCell<HashMap<String, Statement>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("closed", &self.client.is_closed()).finish()
    }
}

impl Conn {
    /// The prepared statement for `sql`, preparing it on first use.
    pub async fn prepare(&self, sql: &str) -> Result<Statement, Error> {
        if let Some(s) = self.stmts.borrow().get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.stmts.borrow_mut().insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

/// The pool.
#[derive(Debug)]
pub struct Db {
    config: tokio_postgres::Config,
    conns: RefCell<Vec<Option<Rc<Conn>>>>,
    /// One per slot: held while the slot connects, so that tasks finding it broken at the same
    /// time (every RLS check on it) make one new connection, not one each.
    connecting: Vec<tokio::sync::Mutex<()>>,
    next: Cell<usize>,
}

/// Whether an error came from the server for this statement (permission denied, bad input),
/// as opposed to a broken connection.
pub fn is_sql_error(e: &Error) -> bool {
    e.as_db_error().is_some()
}

/// The error with the database's message, hint and code when it has them (tokio-postgres's
/// own `Display` says only "db error").
pub fn describe(e: &Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.hint() {
            Some(h) => format!("{} ({}; hint: {h})", d.message(), d.code().code()),
            None => format!("{} ({})", d.message(), d.code().code()),
        },
        None => e.to_string(),
    }
}

impl Db {
    /// A pool of `size` connections to `config` (connected lazily).
    pub fn new(mut config: tokio_postgres::Config, size: usize) -> Self {
        if config.get_application_name().is_none() {
            config.application_name("corecast");
        }
        // A check stuck on a lock must not stall the pipeline forever: it fails (the rows count
        // as not visible) and the batch moves on.
        let opts = config.get_options().unwrap_or("").to_string();
        if !opts.contains("statement_timeout") {
            config.options(format!("{opts} -c statement_timeout={STATEMENT_TIMEOUT_MS}").trim());
        }
        let size = size.max(1);
        Self {
            config,
            conns: RefCell::new((0..size).map(|_| None).collect()),
            connecting: (0..size).map(|_| tokio::sync::Mutex::new(())).collect(),
            next: Cell::new(0),
        }
    }

    /// Number of connections.
    pub fn size(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Connection `i` (mod size), connecting it if needed.
    pub async fn get(&self, i: usize) -> Result<Rc<Conn>, Error> {
        let i = i % self.size();
        let open = || self.conns.borrow()[i].as_ref().filter(|c| !c.client.is_closed()).cloned();
        if let Some(c) = open() {
            return Ok(c);
        }
        let _connecting = self.connecting[i].lock().await;
        if let Some(c) = open() {
            return Ok(c);
        }
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::task::spawn_local(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        let conn = Rc::new(Conn { client, stmts: RefCell::new(HashMap::new()) });
        self.conns.borrow_mut()[i] = Some(conn.clone());
        Ok(conn)
    }

    /// The next connection, round robin.
    pub async fn any(&self) -> Result<Rc<Conn>, Error> {
        let i = self.next.get();
        self.next.set(i.wrapping_add(1));
        self.get(i).await
    }
}

/// A boxed future borrowing for `'a`.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Runs `futs` concurrently and returns their outputs in order. Each future is first polled in
/// order, so requests they send on their first poll (all of tokio-postgres's do) are queued on
/// the connection in that order: a pipeline.
pub async fn in_order<'a, T>(futs: Vec<BoxFut<'a, T>>) -> Vec<T> {
    let mut futs: Vec<Option<BoxFut<'a, T>>> = futs.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx: &mut Context<'_>| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *o = Some(v);
                        *f = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(out.iter_mut().map(|o| o.take().expect("every future finished")).collect())
        }
    })
    .await
}

/// `"ident"` with embedded quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("anon"), "\"anon\"");
        assert_eq!(quote_ident("a\"; drop"), "\"a\"\"; drop\"");
    }

    #[test]
    fn in_order_keeps_order() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let out = rt.block_on(async {
            let futs: Vec<BoxFut<'_, u32>> = (0..5u32)
                .map(|i| -> BoxFut<'_, u32> {
                    Box::pin(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(10 - 2 * i as u64)).await;
                        i
                    })
                })
                .collect();
            in_order(futs).await
        });
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
    }
}
