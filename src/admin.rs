//! The admin endpoints: `/metrics` (Prometheus text, every role's metrics from the
//! one registry) on one address, `/healthz` and `/readyz` on another, as
//! controller-runtime lays them out.
//!
//! `/readyz` is 200 only when every role of this process can serve: the
//! controllers' caches have synced, the webhook's allocation index is built, and
//! shutdown has not begun. Otherwise it is 503 and the body names what is not ready.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, http::StatusCode, routing::get};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// What `/readyz` checks.
pub struct Readiness {
    /// Controller role: true once the watch caches synced; `None` without the role.
    controller: Option<Arc<AtomicBool>>,
    /// Webhook role: true once the allocation index is built; `None` without the role.
    webhook: Option<watch::Receiver<bool>>,
    /// Set when shutdown begins, so the kubelet stops routing to this replica.
    stopping: AtomicBool,
}

impl Readiness {
    /// Readiness of the roles given (`None`: the process does not run it).
    pub fn new(controller: Option<Arc<AtomicBool>>, webhook: Option<watch::Receiver<bool>>) -> Self {
        Self { controller, webhook, stopping: AtomicBool::new(false) }
    }

    /// Marks this process as stopping: `/readyz` answers 503 from now on.
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// What is not ready now; empty when ready.
    pub fn not_ready(&self) -> Vec<&'static str> {
        not_ready(
            self.stopping.load(Ordering::Acquire),
            self.controller.as_ref().map(|synced| synced.load(Ordering::Acquire)),
            self.webhook.as_ref().map(|built| *built.borrow()),
        )
    }
}

/// The reasons a process is not ready: `None` for a role it does not run.
fn not_ready(
    stopping: bool,
    controller_synced: Option<bool>,
    index_built: Option<bool>,
) -> Vec<&'static str> {
    let mut reasons = Vec::new();
    if stopping {
        reasons.push("shutting down");
    }
    if controller_synced == Some(false) {
        reasons.push("controller: caches not synced");
    }
    if index_built == Some(false) {
        reasons.push("webhook: allocation index not built");
    }
    reasons
}

/// Starts both servers; the returned task ends when `shutdown` resolves.
pub async fn serve(
    metrics_addr: &str,
    health_addr: &str,
    registry: Registry,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let registry = Arc::new(registry);
    let metrics = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (StatusCode::OK, body),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
        }),
    );
    let health = Router::new().route("/healthz", get(|| async { "ok" })).route(
        "/readyz",
        get(move || {
            let reasons = readiness.not_ready();
            async move {
                if reasons.is_empty() {
                    (StatusCode::OK, "ok".to_owned())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", reasons.join("\n")))
                }
            }
        }),
    );
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr).await?;
    let health_listener = tokio::net::TcpListener::bind(health_addr).await?;
    tracing::info!(metrics = %metrics_listener.local_addr()?, health = %health_listener.local_addr()?, "admin endpoints");
    Ok(tokio::spawn(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let a = axum::serve(metrics_listener, metrics).with_graceful_shutdown(wait(rx.clone()));
        let b = axum::serve(health_listener, health).with_graceful_shutdown(wait(rx));
        tokio::spawn(async move {
            shutdown.await;
            let _ = tx.send(true);
        });
        let _ = tokio::join!(a, b);
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_role_of_the_process_is_ready() {
        assert!(not_ready(false, None, None).is_empty(), "no roles to wait for");
        assert!(not_ready(false, Some(true), Some(true)).is_empty());
        assert_eq!(not_ready(false, Some(true), Some(false)), ["webhook: allocation index not built"]);
        assert_eq!(not_ready(false, Some(false), None), ["controller: caches not synced"]);
        assert_eq!(
            not_ready(false, Some(false), Some(false)),
            ["controller: caches not synced", "webhook: allocation index not built"]
        );
    }

    #[test]
    fn a_stopping_process_is_not_ready_even_with_every_role_ready() {
        assert_eq!(not_ready(true, Some(true), Some(true)), ["shutting down"]);
    }

    #[test]
    fn readiness_follows_the_roles_signals() {
        let synced = Arc::new(AtomicBool::new(false));
        let (built_tx, built) = watch::channel(false);
        let readiness = Readiness::new(Some(synced.clone()), Some(built));
        assert_eq!(readiness.not_ready().len(), 2);
        synced.store(true, Ordering::Release);
        built_tx.send_replace(true);
        assert!(readiness.not_ready().is_empty());
        readiness.begin_shutdown();
        assert_eq!(readiness.not_ready(), ["shutting down"]);
    }
}
