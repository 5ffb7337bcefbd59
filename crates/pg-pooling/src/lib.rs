//! How the Hephaestus PostgreSQL crates (`hephaestus-storage-pg`,
//! `hephaestus-queue-pg`) run their statements, given how the connections
//! of their pool reach the server: [`Pooling`].
//!
//! - [`Pooling::Session`] (the default): each connection is a server session
//!   of its own for as long as it lives, as with a direct connection (or a
//!   pooler in session mode). Statements are prepared once per connection
//!   under a name and cached (sqlx's default), and a statement outside a
//!   transaction runs as it is (autocommit). Nothing here changes that path.
//! - [`Pooling::Transaction`]: the server session is shared between
//!   transactions, as behind PgBouncer with `pool_mode = transaction`. The
//!   pooler hands the client a server connection for one transaction and
//!   takes it back at the first `ReadyForQuery` that is outside one. With
//!   sqlx that breaks two ways, both seen through PgBouncer 1.18:
//!   - a statement prepared under a name stays on the server session that
//!     prepared it: the next client given that session fails with `prepared
//!     statement "sqlx_s_1" already exists`, and the preparing client, given
//!     another session, would not find it. sqlx names statements even with
//!     its cache turned off (`statement_cache_capacity(0)`), unless a query
//!     is made with `persistent(false)`;
//!   - sqlx runs a statement with parameters in two exchanges (parse and
//!     describe, then bind and execute), each ending with a `Sync`. Outside
//!     a transaction the pooler may give the second exchange to another
//!     server session: the bind then fails (`unnamed prepared statement does
//!     not exist`, `bind message supplies 2 parameters, but prepared
//!     statement "" requires 1`) or, worse, runs ANOTHER client's unnamed
//!     statement with this one's parameters and returns its rows.
//!
//!   So every statement with parameters is unnamed
//!   ([`Pooling::persistent_statements`] is false) and runs inside a
//!   transaction: the caller's, or one of its own ([`Pooled`] for a single
//!   statement, [`Pooling::acquire`] for statements on one connection).
//!   [`Pooling::connect_options`] turns sqlx's statement cache off and drops
//!   the `extra_float_digits` startup parameter, which PgBouncer refuses
//!   unless it is listed in its `ignore_startup_parameters`. Statements
//!   without parameters (`sqlx::raw_sql`) go in one message and run as they
//!   are either way.
//!
//! What no pooling mode changes, and transaction pooling cannot carry:
//! session state. The crates keep none: their advisory locks are
//! transaction-scoped (`pg_advisory_xact_lock`), their settings
//! transaction-local (`set_config(.., true)`), leader election is a lease
//! row. `LISTEN` is the exception: it needs a session that stays, so
//! queue-pg's runtime polls instead (`poll_only`) under transaction pooling.
//!
//! # Example
//!
//! ```no_run
//! # async fn f() -> Result<(), sqlx::Error> {
//! use std::str::FromStr;
//! use hephaestus_pg_pooling::Pooling;
//! use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
//!
//! // PgBouncer with `pool_mode = transaction` on port 6432.
//! let pooling = Pooling::Transaction;
//! let options = PgConnectOptions::from_str("postgres://app@pgbouncer:6432/app")?;
//! let pool = PgPoolOptions::new()
//!     .connect_with(pooling.connect_options(options))
//!     .await?;
//! // A statement of its own: unnamed, in a transaction of its own.
//! let one: i32 = sqlx::query_scalar("select $1::int4")
//!     .bind(1_i32)
//!     .persistent(pooling.persistent_statements())
//!     .fetch_one(pooling.on(&pool))
//!     .await?;
//! assert_eq!(one, 1);
//! # Ok(()) }
//! ```

use std::ops::{Deref, DerefMut};

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt as _, TryStreamExt as _};
use sqlx::error::BoxDynError;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgConnection, PgQueryResult, PgRow, PgStatement, PgTypeInfo,
};
use sqlx::{Describe, Either, Error, Execute, Executor, PgPool, Postgres, Transaction};

/// How the connections of a pool reach PostgreSQL, and so how statements
/// may run on them (see the crate documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Pooling {
    /// Each connection keeps its server session: a direct connection, or a
    /// pooler in session mode. Named, cached prepared statements;
    /// autocommit statements. The default and the fastest.
    #[default]
    Session,
    /// Server sessions are shared between transactions: PgBouncer (or
    /// another pooler) with `pool_mode = transaction`. Unnamed statements,
    /// each inside a transaction; no session state.
    Transaction,
}

impl Pooling {
    /// Whether statements may be prepared under a name and kept on the
    /// connection: the value of sqlx's `Query::persistent` for every
    /// statement with parameters. `false` under transaction pooling.
    #[must_use]
    pub fn persistent_statements(self) -> bool {
        self == Self::Session
    }

    /// Whether a statement must run inside a transaction (its own when the
    /// caller has none).
    #[must_use]
    pub fn needs_transaction(self) -> bool {
        self == Self::Transaction
    }

    /// `options` as this pooling needs them. Session: unchanged. Transaction:
    /// no statement cache (a cached statement would be reused by name), and
    /// no `extra_float_digits` startup parameter (PgBouncer refuses startup
    /// parameters it does not know; without it PostgreSQL 12 and later
    /// print floats exactly anyway). A startup `options` parameter of your
    /// own (`?options=` or `PGOPTIONS`) is kept: PgBouncer accepts it only
    /// when listed in its `ignore_startup_parameters`, and then ignores it.
    #[must_use]
    pub fn connect_options(self, options: PgConnectOptions) -> PgConnectOptions {
        match self {
            Self::Session => options,
            Self::Transaction => options.statement_cache_capacity(0).extra_float_digits(None),
        }
    }

    /// An executor for one statement on `pool` that is no part of a
    /// caller's transaction: the pool itself (Session), or a transaction of
    /// the statement's own, unnamed (Transaction).
    #[must_use]
    pub fn on(self, pool: &PgPool) -> Pooled<'_> {
        Pooled {
            pool,
            pooling: self,
        }
    }

    /// A connection from `pool` for statements that are no part of a
    /// caller's transaction: the pool's connection as it is (Session,
    /// exactly `pool.acquire()`), or a transaction on it (Transaction).
    /// Call [`Acquired::finish`] after the statements: it commits that
    /// transaction (dropped instead, it rolls back).
    pub async fn acquire(self, pool: &PgPool) -> Result<Acquired, Error> {
        Ok(Acquired(if self.needs_transaction() {
            Held::Transaction(pool.begin().await?)
        } else {
            Held::Session(pool.acquire().await?)
        }))
    }
}

/// A connection from [`Pooling::acquire`]: use it as a `&mut PgConnection`,
/// then [`Acquired::finish`].
#[derive(Debug)]
#[must_use = "call `finish`: under transaction pooling, dropping it rolls its statements back"]
pub struct Acquired(Held);

#[derive(Debug)]
enum Held {
    Session(PoolConnection<Postgres>),
    Transaction(Transaction<'static, Postgres>),
}

impl Acquired {
    /// Ends the statements: commits the transaction under transaction
    /// pooling; returns the connection to the pool either way.
    pub async fn finish(self) -> Result<(), Error> {
        match self.0 {
            Held::Session(_) => Ok(()),
            Held::Transaction(tx) => tx.commit().await,
        }
    }
}

impl Deref for Acquired {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match &self.0 {
            Held::Session(conn) => conn,
            Held::Transaction(tx) => tx,
        }
    }
}

impl DerefMut for Acquired {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match &mut self.0 {
            Held::Session(conn) => conn,
            Held::Transaction(tx) => tx,
        }
    }
}

/// The executor of [`Pooling::on`]: pass it where sqlx takes an executor
/// (`.fetch_all(pooling.on(&pool))`). Under session pooling every call goes
/// to the pool's own executor unchanged; under transaction pooling the
/// statement runs unnamed in a transaction of its own (its rows are read
/// in full before the commit), and preparing a statement to keep
/// (`prepare`, `describe`) is refused with [`Error::Configuration`].
#[derive(Debug, Clone, Copy)]
pub struct Pooled<'p> {
    pool: &'p PgPool,
    pooling: Pooling,
}

impl<'p> Executor<'p> for Pooled<'p> {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.pooling.needs_transaction() {
            return self.pool.fetch_many(query);
        }
        let pool = self.pool;
        futures_util::stream::once(async move {
            let mut tx = pool.begin().await?;
            let items: Vec<_> = (&mut *tx).fetch_many(Unnamed(query)).try_collect().await?;
            tx.commit().await?;
            Ok::<_, Error>(futures_util::stream::iter(items.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, Result<Option<PgRow>, Error>>
    where
        'p: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.pooling.needs_transaction() {
            return self.pool.fetch_optional(query);
        }
        let pool = self.pool;
        Box::pin(async move {
            let mut tx = pool.begin().await?;
            let row = (&mut *tx).fetch_optional(Unnamed(query)).await?;
            tx.commit().await?;
            Ok(row)
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, Error>>
    where
        'p: 'e,
    {
        if self.pooling.needs_transaction() {
            return Box::pin(std::future::ready(Err(named_statement_refused())));
        }
        self.pool.prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, Result<Describe<Postgres>, Error>>
    where
        'p: 'e,
    {
        if self.pooling.needs_transaction() {
            return Box::pin(std::future::ready(Err(named_statement_refused())));
        }
        self.pool.describe(sql)
    }
}

/// sqlx prepares a statement to keep (or to describe it) under a name,
/// which transaction pooling cannot carry.
fn named_statement_refused() -> Error {
    Error::Configuration(
        "under transaction pooling no statement is prepared to be kept: run the query itself"
            .into(),
    )
}

/// A query that is never prepared under a name, whatever it was built
/// with.
struct Unnamed<E>(E);

impl<'q, E: Execute<'q, Postgres>> Execute<'q, Postgres> for Unnamed<E> {
    fn sql(&self) -> &'q str {
        self.0.sql()
    }

    fn statement(&self) -> Option<&PgStatement<'q>> {
        self.0.statement()
    }

    fn take_arguments(&mut self) -> Result<Option<PgArguments>, BoxDynError> {
        self.0.take_arguments()
    }

    fn persistent(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_pooling_leaves_the_options_and_statements_as_they_are() {
        let options = PgConnectOptions::new().host("h").database("d");
        let same = Pooling::Session.connect_options(options.clone());
        assert_eq!(format!("{same:?}"), format!("{options:?}"));
        assert!(Pooling::default().persistent_statements());
        assert!(!Pooling::default().needs_transaction());
    }

    #[test]
    fn transaction_pooling_turns_the_cache_and_the_refused_parameter_off() {
        let options = Pooling::Transaction.connect_options(PgConnectOptions::new());
        let shown = format!("{options:?}");
        assert!(shown.contains("statement_cache_capacity: 0"), "{shown}");
        assert!(shown.contains("extra_float_digits: None"), "{shown}");
        assert!(!Pooling::Transaction.persistent_statements());
        assert!(Pooling::Transaction.needs_transaction());
    }
}
