//! The admin endpoints: `/metrics` (Prometheus text) on one address, `/healthz` and
//! `/readyz` on another, as controller-runtime lays them out.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, http::StatusCode, routing::get};
use prometheus_client::registry::Registry;

/// Starts both servers; the returned task ends when `shutdown` resolves.
pub async fn serve(
    metrics_addr: &str,
    health_addr: &str,
    registry: Registry,
    ready: Arc<AtomicBool>,
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
            let ready = ready.load(Ordering::Acquire);
            async move {
                if ready {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
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
