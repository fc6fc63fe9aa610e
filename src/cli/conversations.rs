//! `chatgate conversations export`: the conversation record as JSON lines on
//! standard output (one object per row, the table's columns as keys), oldest
//! first; and the database line of `chatgate check`.

use std::io::Write;
use std::time::{Duration, SystemTime};

use clap::Subcommand;

use super::ConfigArg;
use crate::config::{parse_duration, Config, ConversationLogSettings, SecretsPolicy};
use crate::conversations::db::{self, ExportFilter, SCHEMA_VERSION};

/// How long the CLI waits for PostgreSQL to answer.
const CLI_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Subcommand)]
pub enum ConversationsCommand {
    /// Print recorded exchanges as JSON lines, oldest first.
    Export {
        /// Only this user's exchanges (the token's `sub`).
        #[arg(long)]
        user: Option<String>,
        /// Only exchanges that started within this long ago (`1d`, `12h`, `30m`).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Only exchanges on this route path.
        #[arg(long)]
        route: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Runs a `conversations` subcommand; returns the exit code.
pub fn run(command: ConversationsCommand) -> i32 {
    match command {
        ConversationsCommand::Export {
            user,
            since,
            route,
            config,
        } => {
            let config = match Config::load_with(&config.config, SecretsPolicy::Skip) {
                Ok(c) => c,
                Err(e) => return super::fail(&e.to_string()),
            };
            let Some(url) = database_url(&config) else {
                return super::fail(
                    "conversation_log is not configured, or its url_env is not set",
                );
            };
            let filter = ExportFilter {
                username: user,
                since: since.map(|d| SystemTime::now() - d),
                route,
            };
            let result = runtime().and_then(|rt| {
                rt.block_on(async {
                    let ca_file = config
                        .conversation_log
                        .as_ref()
                        .and_then(|c| c.ca_file.as_deref());
                    let client = db::connect(&url, ca_file, CLI_TIMEOUT).await?;
                    let stdout = std::io::stdout();
                    let mut out = std::io::BufWriter::new(stdout.lock());
                    let n = db::export(&client, &filter, &mut out).await?;
                    out.flush().map_err(|e| e.to_string())?;
                    Ok::<u64, String>(n)
                })
            });
            match result {
                Ok(n) => {
                    eprintln!("{n} exchange(s) exported");
                    0
                }
                Err(e) => super::fail(&format!("conversation log: {e}")),
            }
        }
    }
}

fn database_url(config: &Config) -> Option<String> {
    config
        .conversation_log
        .as_ref()
        .and_then(|c| c.url.as_ref())
        .map(|u| u.expose_str())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// `chatgate check`'s line about the conversation record: whether PostgreSQL
/// answers and whether the schema is current (the URL's password never shown).
pub fn check_line(settings: &ConversationLogSettings) -> String {
    let Some(url) = settings.url.as_ref().map(|u| u.expose_str()) else {
        return "conversation log: no database URL\n".into();
    };
    let target = db::describe(&url);
    let status = runtime().and_then(|rt| {
        rt.block_on(async {
            let client = db::connect(&url, settings.ca_file.as_deref(), CLI_TIMEOUT).await?;
            db::schema_version(&client).await
        })
    });
    let state = match status {
        Ok(Some(v)) if v == SCHEMA_VERSION => format!("answers, schema version {v} (current)"),
        Ok(Some(v)) if v > SCHEMA_VERSION => {
            format!("answers, schema version {v} is NEWER than this gateway's {SCHEMA_VERSION}")
        }
        Ok(Some(v)) => format!(
            "answers, schema version {v} (the gateway migrates it to {SCHEMA_VERSION} at start)"
        ),
        Ok(None) => "answers, no schema yet (the gateway creates it at start)".into(),
        Err(e) => format!("DOES NOT ANSWER ({e})"),
    };
    format!(
        "conversation log: postgres {target}: {state}; spool {} (max {} bytes), retention {}\n",
        settings.spool_dir.display(),
        settings.spool_max_bytes,
        whole_days(settings.retention)
    )
}

/// `90d` rather than humantime's `2months 29days 2h 52m 48s`.
fn whole_days(d: Duration) -> String {
    let secs = d.as_secs();
    if secs % 86_400 == 0 && d.subsec_nanos() == 0 {
        format!("{}d", secs / 86_400)
    } else {
        humantime::format_duration(d).to_string()
    }
}
