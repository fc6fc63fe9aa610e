//! `chatgate users ...`: user administration against the configured
//! credential store. Passwords come on standard input, never as arguments
//! (arguments show up in `ps` and shell history).

use std::io::Read;
use std::sync::Arc;

use clap::Subcommand;

use super::ConfigArg;
use crate::auth::open_store;
use crate::auth::password::Passwords;
use crate::auth::store::{validate_username, CredentialStore};
use crate::config::{Config, SecretsPolicy};

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
        | UsersCommand::List { config } => config.config.clone(),
    };
    let config = match Config::load_with(&config_path, SecretsPolicy::Skip) {
        Ok(c) => c,
        Err(e) => return super::fail(&e.to_string()),
    };
    let store = match open_store(&config.auth.credentials) {
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
    match runtime.block_on(execute(command, &config, store)) {
        Ok(message) => {
            if !message.is_empty() {
                println!("{message}");
            }
            0
        }
        Err(message) => super::fail(&message),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
            Ok(format!("user {name} disabled"))
        }
        UsersCommand::Enable { name, .. } => {
            store.set_disabled(&name, false).await.map_err(store_err)?;
            Ok(format!("user {name} enabled"))
        }
        UsersCommand::Revoke { name, .. } => {
            // Tokens carry whole seconds: one issued earlier in this same
            // second must die too, so the cut-off is the next second.
            store
                .revoke_tokens(&name, now_secs() + 1)
                .await
                .map_err(store_err)?;
            Ok(format!("tokens of {name} issued until now are revoked"))
        }
        UsersCommand::Remove { name, .. } => {
            store.remove_user(&name).await.map_err(store_err)?;
            Ok(format!("user {name} removed"))
        }
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
