//! `chatgate users ...`: user administration against the configured
//! credential store. Passwords come on standard input, never as arguments
//! (arguments show up in `ps` and shell history).

use std::io::Read;
use std::sync::Arc;

use clap::Subcommand;

use super::ConfigArg;
use crate::auth::password::Passwords;
use crate::auth::store::{validate_username, CredentialStore};
use crate::auth::{open_store_shared, revocation_time};
use crate::config::{Config, SecretsPolicy};
use crate::limits::usage::{day_name, UsageDelta};
use crate::redis_client::RedisClient;

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user; the password is read from standard input.
    Add {
        /// User name (letters, digits and . _ @ + -; at most 64).
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Set a user's password, read from standard input.
    Passwd {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Stop a user from logging in; their tokens stop working too.
    Disable {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Let a disabled user log in again.
    Enable {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Invalidate every token issued to a user until now.
    Revoke {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Delete a user.
    Remove {
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print a user's requests and tokens per UTC day (Redis backend only).
    Usage {
        name: String,
        /// How many days, ending today.
        #[arg(long, default_value_t = 7)]
        days: u32,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List users (id, name, state, creation time).
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Runs one users subcommand; returns the exit code.
pub fn run(command: UsersCommand) -> i32 {
    let config_path = match &command {
        UsersCommand::Add { config, .. }
        | UsersCommand::Passwd { config, .. }
        | UsersCommand::Disable { config, .. }
        | UsersCommand::Enable { config, .. }
        | UsersCommand::Revoke { config, .. }
        | UsersCommand::Remove { config, .. }
        | UsersCommand::Usage { config, .. }
        | UsersCommand::List { config } => config.config.clone(),
    };
    let config = match Config::load_with(&config_path, SecretsPolicy::Skip) {
        Ok(c) => c,
        Err(e) => return super::fail(&e.to_string()),
    };
    let (store, redis) = match open_store_shared(&config.auth.credentials) {
        Ok(s) => s,
        Err(e) => return super::fail(&format!("credential store: {e}")),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return super::fail(&format!("cannot start a runtime: {e}")),
    };
    let result = match command {
        UsersCommand::Usage { name, days, .. } => runtime.block_on(usage(redis, &name, days)),
        command => runtime.block_on(execute(command, &config, store)),
    };
    match result {
        Ok(message) => {
            if !message.is_empty() {
                println!("{message}");
            }
            0
        }
        Err(message) => super::fail(&message),
    }
}

/// Reads a password from standard input: the whole input minus one trailing
/// line break; empty is refused.
fn read_password() -> Result<String, String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
    let password = input
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&input);
    if password.is_empty() {
        return Err("refusing an empty password (pipe it on standard input, e.g. `printf '%s' \"$PW\" | chatgate users add NAME`)".into());
    }
    Ok(password.to_string())
}

async fn execute(
    command: UsersCommand,
    config: &Config,
    store: Arc<dyn CredentialStore>,
) -> Result<String, String> {
    let hasher = || Passwords::new(config.auth.password, 1).map_err(|e| e.to_string());
    let store_err = |e: crate::auth::store::StoreError| e.to_string();
    match command {
        UsersCommand::Add { name, .. } => {
            validate_username(&name)?;
            let password = read_password()?;
            let hash = hasher()?.hash(&password).await.map_err(|e| e.to_string())?;
            let user = store.create_user(&name, &hash).await.map_err(store_err)?;
            Ok(format!(
                "created user {} with id {}",
                user.username, user.id
            ))
        }
        UsersCommand::Passwd { name, .. } => {
            let password = read_password()?;
            let hash = hasher()?.hash(&password).await.map_err(|e| e.to_string())?;
            store
                .set_password_hash(&name, &hash)
                .await
                .map_err(store_err)?;
            Ok(format!("password of {name} changed"))
        }
        UsersCommand::Disable { name, .. } => {
            store.set_disabled(&name, true).await.map_err(store_err)?;
            // Enabling the user later must not bring the old tokens back.
            store
                .revoke_tokens(&name, revocation_time(crate::unix_time::unix_now()))
                .await
                .map_err(store_err)?;
            Ok(format!("user {name} disabled; their tokens are revoked"))
        }
        UsersCommand::Enable { name, .. } => {
            store.set_disabled(&name, false).await.map_err(store_err)?;
            Ok(format!("user {name} enabled"))
        }
        UsersCommand::Revoke { name, .. } => {
            // Tokens carry whole seconds: one issued earlier in this same
            // second must die too, so the cut-off is the next second.
            store
                .revoke_tokens(&name, revocation_time(crate::unix_time::unix_now()))
                .await
                .map_err(store_err)?;
            Ok(format!("tokens of {name} issued until now are revoked"))
        }
        UsersCommand::Remove { name, .. } => {
            // Tokens carry the user id and the store checks it; a user created again
            // under this name has new tokens_valid_after, so old tokens stay dead.
            store.remove_user(&name).await.map_err(store_err)?;
            Ok(format!("user {name} removed"))
        }
        UsersCommand::Usage { .. } => Err("usage is handled before".into()),
        UsersCommand::List { .. } => {
            let users = store.list_users().await.map_err(store_err)?;
            let mut out = format!("{:>6}  {:<24}  {:<8}  {}", "ID", "USER", "STATE", "CREATED");
            for u in users {
                let created = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u.created_at);
                out += &format!(
                    "\n{:>6}  {:<24}  {:<8}  {}",
                    u.id,
                    u.username,
                    if u.disabled { "disabled" } else { "enabled" },
                    humantime::format_rfc3339_seconds(created)
                );
            }
            Ok(out)
        }
    }
}

/// `users usage NAME --days N`: one line per day, oldest first, then the total.
async fn usage(redis: Option<Arc<RedisClient>>, name: &str, days: u32) -> Result<String, String> {
    let Some(redis) = redis else {
        return Err("usage accounting needs the Redis credential backend".into());
    };
    validate_username(name)?;
    let days = days.clamp(1, 3660);
    let today = crate::unix_time::unix_now();
    let names: Vec<String> = (0..u64::from(days))
        .rev()
        .map(|back| day_name(today.saturating_sub(back * 86_400)))
        .collect();
    let counts = crate::limits::redis::read_usage(&redis, name, &names)
        .await
        .map_err(|e| e.to_string())?;
    Ok(usage_table(&names, &counts))
}

/// The table `users usage` prints.
fn usage_table(days: &[String], counts: &[UsageDelta]) -> String {
    let line = |label: &str, u: &UsageDelta| {
        format!(
            "{label:<10}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}",
            u.requests,
            u.prompt_tokens,
            u.completion_tokens,
            u.prompt_tokens.saturating_add(u.completion_tokens),
            u.estimated_tokens
        )
    };
    let mut out = format!(
        "{:<10}  {:>8}  {:>12}  {:>12}  {:>12}  {:>12}",
        "DAY", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL", "ESTIMATED"
    );
    let mut total = UsageDelta::default();
    for (day, u) in days.iter().zip(counts) {
        out += "\n";
        out += &line(day, u);
        total.requests += u.requests;
        total.prompt_tokens += u.prompt_tokens;
        total.completion_tokens += u.completion_tokens;
        total.estimated_tokens += u.estimated_tokens;
    }
    out += "\n";
    out += &line("total", &total);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_table_layout() {
        let days = vec!["2025-01-01".to_string(), "2025-01-02".to_string()];
        let counts = vec![
            UsageDelta::default(),
            UsageDelta {
                prompt_tokens: 10,
                completion_tokens: 5,
                requests: 2,
                estimated_tokens: 15,
            },
        ];
        let table = usage_table(&days, &counts);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("DAY"));
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["2025-01-02", "2", "10", "5", "15", "15"]
        );
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["total", "2", "10", "5", "15", "15"]
        );
    }
}
