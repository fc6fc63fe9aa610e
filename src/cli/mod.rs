//! The command line: `serve`, `check`, `users ...`, `conversations export`, `demo`
//! and `simulate`.
//! Each subcommand is a thin shell over the library; exit codes are 0 for
//! success, 1 for an operator error (bad config, unknown user), 2 for usage.

mod conversations;
mod demo;
mod users;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, RouteKind};
use crate::logs::LogFormat;
use crate::server::{self, ProcessFlags};
use crate::simulator::{SimOptions, SimTls};

/// chatgate — an LLM API gateway on Pingora.
#[derive(Debug, Parser)]
#[command(name = "chatgate", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the config file is.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path of the YAML config file.
    #[arg(
        short,
        long,
        env = "CHATGATE_CONFIG",
        default_value = "conf/chatgate.yaml"
    )]
    pub config: PathBuf,
}

/// How the log lines look (for the subcommands that run a server).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct LogArgs {
    /// Log line format: text for a person, one JSON object a line, or auto (text when stderr
    /// is a terminal, JSON otherwise).
    #[arg(long, value_enum, default_value_t = LogFormat::Auto, env = "CHATGATE_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Take over the listening sockets of a running chatgate (send it SIGQUIT afterwards).
        #[arg(short, long)]
        upgrade: bool,
        /// Run in the background.
        #[arg(short, long)]
        daemon: bool,
        /// Check that the server can start with this config, then exit.
        #[arg(short, long)]
        test: bool,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Load and validate the config, print a summary; exit 1 on error.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Manage users in the configured credential store.
    Users {
        #[command(subcommand)]
        action: users::UsersCommand,
    },
    /// Read the conversation record (PostgreSQL).
    Conversations {
        #[command(subcommand)]
        action: conversations::ConversationsCommand,
    },
    /// Try chatgate out: built-in users and simulator, no config, no Redis.
    Demo(demo::DemoArgs),
    /// Run the built-in OpenAI-compatible simulator (for tests and benchmarks).
    Simulate {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: String,
        #[command(flatten)]
        options: Box<SimOptions>,
        #[command(flatten)]
        tls: SimTls,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    // Held until the command returns: dropping it writes the queued lines.
    let _logs = init_logging(&cli.command);
    match cli.command {
        Command::Serve {
            config,
            upgrade,
            daemon,
            test,
            log: _,
        } => {
            let config = match Config::load(&config.config) {
                Ok(c) => c,
                Err(e) => return fail(&e.to_string()),
            };
            match server::run(
                config,
                ProcessFlags {
                    upgrade,
                    daemon,
                    test,
                },
                server::Extras::default(),
            ) {
                Ok(()) => 0,
                Err(e) => fail(&e),
            }
        }
        Command::Check { config } => match Config::load(&config.config) {
            Ok(c) => {
                print!("{}", summary(&c));
                if let Some(log) = &c.conversation_log {
                    print!("{}", conversations::check_line(log));
                }
                0
            }
            Err(e) => fail(&e.to_string()),
        },
        Command::Users { action } => users::run(action),
        Command::Conversations { action } => conversations::run(action),
        Command::Demo(args) => demo::run(args),
        Command::Simulate {
            listen,
            options,
            tls,
        } => match crate::simulator::run_standalone(&listen, *options, &tls) {
            Ok(never) => match never {},
            Err(e) => fail(&format!("simulator on {listen}: {e}")),
        },
    }
}

fn fail(message: &str) -> i32 {
    eprintln!("chatgate: {message}");
    1
}

/// Log lines on stderr in the format the command asks for; `RUST_LOG` picks
/// the level (default `info`). Only a server that returns from its run loop
/// gets the background writer: `--daemon` forks after this (the writer
/// thread would stay behind in the parent) and `--test` exits from inside
/// Pingora, as does the simulator.
fn init_logging(command: &Command) -> crate::logs::LogGuard {
    let (format, background) = match command {
        Command::Serve {
            daemon, test, log, ..
        } => (log.log_format, !daemon && !test),
        Command::Demo(args) => (args.log.log_format, true),
        _ => (LogFormat::Auto, false),
    };
    crate::logs::init(format, background)
}

/// What `chatgate check` prints.
pub fn summary(c: &Config) -> String {
    let mut out = format!("config {} is valid\n", c.source);
    let listen: Vec<String> = c.listen.iter().map(|l| l.to_string()).collect();
    out += &format!("listen: {}\n", listen.join(", "));
    out += &format!(
        "admin listen: {}\n",
        c.admin_listen.as_deref().unwrap_or("(none)")
    );
    out += &format!("credentials: {}\n", c.auth.credentials.describe());
    out += &format!(
        "tokens: {:?}, lifetime {}, {} previous secret(s)\n",
        c.auth.algorithm,
        humantime::format_duration(c.auth.token_ttl),
        c.auth.previous_secrets.len()
    );
    let r = &c.rate_limits;
    let n = |v: Option<u64>| v.map_or("unlimited".to_string(), |n| n.to_string());
    let logins =
        |v: Option<crate::limits::Rate>| v.map_or("unlimited".to_string(), |r| r.limit.to_string());
    out += &format!(
        "rate limits per user: {} requests/min, {} tokens/min, {} tokens/day; failed logins: {} per name, {} per address per {}; Redis down: {}\n",
        n(r.chat.requests_per_minute),
        n(r.chat.tokens_per_minute),
        n(r.chat.tokens_per_day),
        logins(r.login_per_username),
        logins(r.login_per_ip),
        humantime::format_duration(
            r.login_per_username
                .or(r.login_per_ip)
                .map_or(crate::limits::DEFAULT_LOGIN_WINDOW, |r| r.period)
        ),
        match r.on_store_error {
            crate::limits::OnStoreError::Allow => "allow (local limits)",
            crate::limits::OnStoreError::Deny => "deny",
        }
    );
    for u in &c.upstreams {
        let endpoints: Vec<String> = u.endpoints.iter().map(|e| e.label()).collect();
        out += &format!(
            "upstream {}: {} ({}{}, {} key(s), retries {})\n",
            u.name,
            endpoints.join(", "),
            if u.tls { "https" } else { "http" },
            u.base_path,
            u.api_keys.len(),
            u.retries
        );
    }
    for r in &c.routes {
        let kind = match r.kind {
            RouteKind::Chat => "chat",
            RouteKind::ChatStream => "chat_stream",
            RouteKind::Openai => "openai",
        };
        let model = if r.allowed_models.is_empty() {
            r.model.clone()
        } else {
            format!("one of {}", r.allowed_models.join(", "))
        };
        out += &format!(
            "route POST {} ({kind}) -> {} model {}\n",
            r.path, c.upstreams[r.upstream].name, model
        );
    }
    out
}
