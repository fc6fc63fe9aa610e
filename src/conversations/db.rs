//! PostgreSQL side of the conversation record: connecting, the schema (created
//! or migrated at start under an advisory lock, so instances starting together
//! do not race), batched writes by binary COPY (new records straight into the
//! table; replays through a session-local staging table then one `INSERT ... ON
//! CONFLICT (request_id) DO NOTHING`, since COPY alone cannot skip rows a replay
//! already wrote), retention deletes and export.

use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::{BufMut, BytesMut};
use futures::{pin_mut, SinkExt, TryStreamExt};
use pingora::tls::{ClientConfig, RootCertStore};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::record::Record;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i32 = 2;

/// `pg_advisory_xact_lock` key taken while the schema is created or migrated.
const SCHEMA_LOCK: i64 = 0x6368_6174_6761_7465; // "chatgate"

/// The table's columns, in COPY order.
const COLUMNS: &str = "request_id, user_id, username, route, model, messages, answer, outcome, \
     status, prompt_tokens, completion_tokens, started_at, duration_ms, ttfb_ms";

const COLUMN_TYPES: [Type; 14] = [
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::JSONB,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
    Type::INT4,
    Type::INT4,
    Type::TIMESTAMPTZ,
    Type::FLOAT8,
    Type::FLOAT8,
];

/// Version 1 of the schema (the documented columns plus status and time to first byte).
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS chatgate_conversations (
    request_id text PRIMARY KEY,
    user_id bigint,
    username text,
    route text NOT NULL,
    model text NOT NULL,
    messages jsonb NOT NULL,
    answer text,
    outcome text NOT NULL,
    status integer,
    prompt_tokens integer,
    completion_tokens integer,
    started_at timestamptz NOT NULL,
    duration_ms double precision NOT NULL,
    ttfb_ms double precision
);
CREATE INDEX IF NOT EXISTS chatgate_conversations_started_at ON chatgate_conversations (started_at);
CREATE INDEX IF NOT EXISTS chatgate_conversations_user ON chatgate_conversations (username, started_at);
";

/// Version 2: the long texts (`messages`, `answer`) are compressed with lz4 instead of
/// PostgreSQL's default pglz: about half of PostgreSQL's CPU per row for a 10 KiB
/// record (see benches/RESULTS.md), for ~10% more disk. Only the catalog changes
/// (rows already stored stay as they are, none is rewritten), so it is instant on any
/// table; it still needs the table's exclusive lock for a moment, hence the lock
/// timeout: waiting behind a long export would stall every writer queued behind it.
/// Servers built without lz4 (or older than 14) keep pglz.
const SCHEMA_V2: &str = "
SET LOCAL lock_timeout = '1s';
ALTER TABLE chatgate_conversations
    ALTER COLUMN messages SET COMPRESSION lz4,
    ALTER COLUMN answer SET COMPRESSION lz4;
";

/// Opens a connection (driven by a task on the current runtime) within `timeout`.
/// TLS as the URL's `sslmode` asks (`disable`, `prefer`: the default, `require`);
/// whenever TLS is used, the server's certificate and name are verified against
/// `ca_file`, or the system's CAs without one.
pub async fn connect(
    url: &str,
    ca_file: Option<&Path>,
    timeout: Duration,
) -> Result<Client, String> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|_| "not a valid PostgreSQL URL".to_string())?;
    config.connect_timeout(timeout);
    if config.get_application_name().is_none() {
        config.application_name("chatgate");
    }
    let tls = if config.get_ssl_mode() == SslMode::Disable {
        None
    } else {
        Some(MakeRustlsConnect::new(tls_config(ca_file)?))
    };
    let connecting = async {
        match tls {
            Some(tls) => {
                let (client, connection) = config.connect(tls).await?;
                tokio::spawn(drive(connection));
                Ok(client)
            }
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                tokio::spawn(drive(connection));
                Ok(client)
            }
        }
    };
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| format!("no answer within {}", humantime::format_duration(timeout)))?
        .map_err(pg_error)
}

/// Runs a connection until it closes.
async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "conversation log: connection closed");
    }
}

/// The TLS client settings: `ca_file`'s CAs, or the system's.
fn tls_config(ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let roots = match crate::tls::ca_roots(ca_file) {
        Ok(roots) => roots,
        // None found: TLS then fails verification, and only TLS needs them.
        Err(e) if ca_file.is_none() => {
            tracing::debug!(error = %e, "conversation log: the system's CA certificates");
            RootCertStore::empty()
        }
        Err(e) => return Err(e),
    };
    Ok(crate::tls::client_config_with(roots))
}

/// `user@host:port/database` of a URL: the parts an operator may see (never the password).
pub fn describe(url: &str) -> String {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "(invalid URL)".into();
    };
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        config.get_user().unwrap_or("(default user)"),
        config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("(default)")
    )
}

/// Creates or migrates the schema; safe when several instances do it at once.
pub async fn migrate(client: &mut Client) -> Result<(), String> {
    let e = pg_error;
    let tx = client.transaction().await.map_err(e)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(e)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS chatgate_schema (component text PRIMARY KEY, version integer NOT NULL)",
    )
    .await
    .map_err(e)?;
    let version: Option<i32> = tx
        .query_opt(
            "SELECT version FROM chatgate_schema WHERE component = 'conversations'",
            &[],
        )
        .await
        .map_err(e)?
        .map(|row| row.get(0));
    match version {
        Some(v) if v == SCHEMA_VERSION => {}
        Some(v) if v > SCHEMA_VERSION => {
            return Err(format!(
                "the schema is at version {v}, newer than this gateway's {SCHEMA_VERSION}"
            ))
        }
        // Step by step from what is there (nothing: `None`).
        _ => {
            let from = version.unwrap_or(0);
            tracing::info!(
                from,
                to = SCHEMA_VERSION,
                "conversation log: migrating the schema"
            );
            if from < 1 {
                tx.batch_execute(SCHEMA_V1).await.map_err(e)?;
            }
            if from < 2 && server_has_lz4(&tx).await.map_err(e)? {
                tx.batch_execute(SCHEMA_V2).await.map_err(e)?;
            }
            tx.execute(
                "INSERT INTO chatgate_schema (component, version) VALUES ('conversations', $1)
                 ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(e)?;
        }
    }
    tx.commit().await.map_err(e)
}

/// Whether the server can compress with lz4 (built with it, version 14 or later).
async fn server_has_lz4(tx: &Transaction<'_>) -> Result<bool, tokio_postgres::Error> {
    let row = tx
        .query_one(
            "SELECT coalesce((SELECT 'lz4' = ANY(enumvals) FROM pg_settings
                              WHERE name = 'default_toast_compression'), false)",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The schema version in the database; `None` when it was never created.
pub async fn schema_version(client: &Client) -> Result<Option<i32>, String> {
    let row = client
        .query_one(
            "SELECT CASE WHEN to_regclass('chatgate_schema') IS NULL THEN NULL ELSE 1 END",
            &[],
        )
        .await
        .map_err(pg_error)?;
    if row.get::<_, Option<i32>>(0).is_none() {
        return Ok(None);
    }
    Ok(client
        .query_opt(
            "SELECT version FROM chatgate_schema WHERE component = 'conversations'",
            &[],
        )
        .await
        .map_err(pg_error)?
        .map(|row| row.get(0)))
}

/// A connection ready to take batches.
pub struct Writer {
    client: Client,
    /// COPY straight into the table: for new records, which cannot be there yet.
    copy_direct: Statement,
    /// COPY into the staging table, then `insert`: for replays, which may be.
    copy: Statement,
    insert: Statement,
}

impl Writer {
    /// Prepares the staging table and statements on a migrated connection.
    pub async fn new(client: Client) -> Result<Writer, String> {
        let e = pg_error;
        // The staging table compresses as the table does: `INSERT ... SELECT` moves
        // compressed values as they are, so a pglz staging table would leave every
        // replayed row in pglz.
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .map_err(e)?
            .get(0);
        let including = if version >= 140_000 {
            "INCLUDING COMPRESSION"
        } else {
            ""
        };
        client
            .batch_execute(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS chatgate_conversations_in
                 (LIKE chatgate_conversations {including}) ON COMMIT DELETE ROWS"
            ))
            .await
            .map_err(e)?;
        let copy = client
            .prepare(&format!(
                "COPY chatgate_conversations_in ({COLUMNS}) FROM STDIN BINARY"
            ))
            .await
            .map_err(e)?;
        let copy_direct = client
            .prepare(&format!(
                "COPY chatgate_conversations ({COLUMNS}) FROM STDIN BINARY"
            ))
            .await
            .map_err(e)?;
        let insert = client
            .prepare(&format!(
                "INSERT INTO chatgate_conversations ({COLUMNS}) SELECT {COLUMNS} FROM chatgate_conversations_in
                 ON CONFLICT (request_id) DO NOTHING"
            ))
            .await
            .map_err(e)?;
        Ok(Writer {
            client,
            copy_direct,
            copy,
            insert,
        })
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Writes records just taken from the queue in one transaction, by a COPY
    /// straight into the table: about half the database's work of [`Writer::write`].
    /// Should one be there already (a client that repeats its `X-Request-Id`), the
    /// COPY fails as a whole and the batch goes through [`Writer::write`] instead.
    pub async fn write_new(&mut self, records: &[Record]) -> Result<u64, String> {
        let copied = {
            let tx = self.client.transaction().await.map_err(pg_error)?;
            match copy_rows(&tx, &self.copy_direct, records).await {
                Ok(()) => tx.commit().await.map_err(CopyFailed::Db),
                // Dropping the transaction rolls it back.
                Err(e) => Err(e),
            }
        };
        match copied {
            Ok(()) => Ok(records.len() as u64),
            Err(CopyFailed::Db(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                self.write(records).await
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `records` in one transaction; returns how many rows were new (the rest
    /// were already there: a replay).
    pub async fn write(&mut self, records: &[Record]) -> Result<u64, String> {
        let e = pg_error;
        let tx = self.client.transaction().await.map_err(e)?;
        copy_rows(&tx, &self.copy, records).await?;
        let inserted = tx.execute(&self.insert, &[]).await.map_err(e)?;
        tx.commit().await.map_err(e)?;
        Ok(inserted)
    }

    /// Deletes up to `batch` rows that started before `older_than` ago; returns how many.
    pub async fn delete_expired(&self, older_than: Duration, batch: i64) -> Result<u64, String> {
        self.client
            .execute(
                "DELETE FROM chatgate_conversations WHERE ctid = ANY(ARRAY(
                   SELECT ctid FROM chatgate_conversations
                   WHERE started_at < now() - make_interval(secs => $1) LIMIT $2))",
                &[&older_than.as_secs_f64(), &batch],
            )
            .await
            .map_err(pg_error)
    }
}

/// Which rows `chatgate conversations export` prints.
#[derive(Debug, Default, Clone)]
pub struct ExportFilter {
    pub username: Option<String>,
    pub since: Option<SystemTime>,
    pub route: Option<String>,
}

/// Writes every matching row as one JSON object per line (columns as keys), oldest
/// first; returns how many.
pub async fn export(
    client: &Client,
    filter: &ExportFilter,
    out: &mut impl std::io::Write,
) -> Result<u64, String> {
    let e = pg_error;
    client
        .batch_execute("SET TIME ZONE 'UTC'")
        .await
        .map_err(e)?;
    let params: [&(dyn ToSql + Sync); 3] = [&filter.username, &filter.since, &filter.route];
    let rows = client
        .query_raw(
            "SELECT row_to_json(c)::text FROM chatgate_conversations c
             WHERE ($1::text IS NULL OR c.username = $1)
               AND ($2::timestamptz IS NULL OR c.started_at >= $2)
               AND ($3::text IS NULL OR c.route = $3)
             ORDER BY c.started_at, c.request_id",
            params,
        )
        .await
        .map_err(e)?;
    pin_mut!(rows);
    let mut n = 0;
    while let Some(row) = rows.try_next().await.map_err(e)? {
        let line: &str = row.get(0);
        writeln!(out, "{line}").map_err(|e| e.to_string())?;
        n += 1;
    }
    Ok(n)
}

/// The signature, flags and header extension length that open PostgreSQL's binary
/// COPY format; [`COPY_TRAILER`] closes it.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
const COPY_TRAILER: i16 = -1;
/// Bytes of encoded rows per COPY message. tokio-postgres's `BinaryCopyInWriter`
/// sends one per 4 KiB, each a hand-off to the connection's task and a socket write
/// of its own; a batch of the usual size goes as one message here.
const COPY_MESSAGE_BYTES: usize = 1 << 20;

/// Why a COPY failed.
enum CopyFailed {
    Db(tokio_postgres::Error),
    /// A value the binary format cannot hold (a text over 2 GiB: none the queue takes).
    Encode(String),
}

impl From<CopyFailed> for String {
    fn from(e: CopyFailed) -> String {
        match e {
            CopyFailed::Db(e) => pg_error(e),
            CopyFailed::Encode(e) => e,
        }
    }
}

/// Sends `records` through the COPY statement `copy` in PostgreSQL's binary format,
/// the table's columns in order.
async fn copy_rows(
    tx: &Transaction<'_>,
    copy: &Statement,
    records: &[Record],
) -> Result<(), CopyFailed> {
    let sink = tx.copy_in(copy).await.map_err(CopyFailed::Db)?;
    pin_mut!(sink);
    let size: usize = records.iter().map(Record::weight).sum();
    let mut out = BytesMut::with_capacity(size.min(COPY_MESSAGE_BYTES) + 64);
    out.put_slice(COPY_HEADER);
    for r in records {
        encode_row(r, &mut out).map_err(CopyFailed::Encode)?;
        if out.len() >= COPY_MESSAGE_BYTES {
            let full = out.split().freeze();
            sink.send(full).await.map_err(CopyFailed::Db)?;
        }
    }
    out.put_i16(COPY_TRAILER);
    sink.send(out.freeze()).await.map_err(CopyFailed::Db)?;
    sink.finish().await.map_err(CopyFailed::Db)?;
    Ok(())
}

/// Appends one row: the field count, then each field's length (-1: null) and bytes.
fn encode_row(r: &Record, out: &mut BytesMut) -> Result<(), String> {
    let started_at = r.started_at();
    let fields: [&(dyn ToSql + Sync); 14] = [
        &r.request_id,
        &r.user_id,
        &r.username,
        &r.route,
        &r.model,
        &JsonText(&r.messages),
        &r.answer,
        &r.outcome,
        &r.status,
        &r.prompt_tokens,
        &r.completion_tokens,
        &started_at,
        &r.duration_ms,
        &r.ttfb_ms,
    ];
    out.put_i16(fields.len() as i16);
    for (value, ty) in fields.iter().zip(&COLUMN_TYPES) {
        let at = out.len();
        out.put_i32(0);
        let len = match value.to_sql_checked(ty, out) {
            Ok(IsNull::Yes) => -1,
            Ok(IsNull::No) => i32::try_from(out.len() - at - 4)
                .map_err(|_| "a record field over 2 GiB".to_string())?,
            Err(e) => return Err(format!("cannot encode a record: {e}")),
        };
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
    Ok(())
}

/// A short cause: the server's SQLSTATE and message for database errors (whose
/// `Display` is only "db error"), else the error and its source. Never the URL.
pub fn pg_error(e: tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(&e) {
        Some(source) if !e.to_string().contains(&source.to_string()) => format!("{e}: {source}"),
        _ => e.to_string(),
    }
}

/// Already-encoded JSON text sent as `jsonb` (binary format: version 1, then the text).
#[derive(Debug)]
struct JsonText<'a>(&'a str);

impl ToSql for JsonText<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_u8(1);
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}
