//! chatgate: an LLM API gateway on Pingora. It logs users in against Redis (or
//! a users file), issues and checks JWTs, rewrites the seed API's message
//! arrays into OpenAI chat-completions calls and streams the answers back as
//! the documented Server-Sent Events.

pub mod auth;
pub mod breaker;
pub mod chat;
pub mod cli;
pub mod config;
pub mod connections;
pub mod conversations;
pub mod error;
pub mod gateway;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod redact;
pub mod redis_client;
pub mod server;
pub mod simulator;
mod stream_wrap;
pub mod tls;
pub mod traces;
pub mod unix_time;
pub mod upstream;

#[cfg(test)]
mod test_ports;
#[cfg(test)]
mod test_redis;
