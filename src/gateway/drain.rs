//! Connection draining for graceful upgrades and stops: once Pingora starts
//! handing the listeners over (SIGQUIT) or stopping (SIGTERM), every reply
//! says `Connection: close`, so clients move their pooled connections to the
//! new process while the old one still serves, instead of racing a request
//! against the close of an idle connection at shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::sync::broadcast;

/// Set once the process is being replaced or stopped.
#[derive(Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    /// Whether replies should close their connections.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Background service that watches Pingora's execution phase and sets [`Draining`].
pub struct DrainWatch {
    phases: Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
    draining: Draining,
}

impl DrainWatch {
    /// Watches `phases` (from `Server::watch_execution_phase`) for `draining`.
    pub fn new(phases: broadcast::Receiver<ExecutionPhase>, draining: Draining) -> Self {
        DrainWatch {
            phases: Mutex::new(Some(phases)),
            draining,
        }
    }
}

#[async_trait]
impl BackgroundService for DrainWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let taken = self.phases.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut phases) = taken else {
            return;
        };
        loop {
            let phase = tokio::select! {
                _ = shutdown.changed() => break,
                phase = phases.recv() => phase,
            };
            match phase {
                Ok(
                    ExecutionPhase::GracefulUpgradeTransferringFds
                    | ExecutionPhase::GracefulUpgradeCloseTimeout
                    | ExecutionPhase::GracefulTerminate
                    | ExecutionPhase::ShutdownStarted,
                ) => break,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
        self.draining.0.store(true, Ordering::Relaxed);
        tracing::info!("draining: replies now close their connections");
    }
}
