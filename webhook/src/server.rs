//! The HTTPS server: axum over rustls, `/mutate`, `/validate`, `/healthz`,
//! `/readyz`, `/metrics` (standalone only), and the watches that keep the index
//! current.
//!
//! Health routes sit outside the trace layer so probes do not flood the log.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, middleware};
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::{limit::RequestBodyLimitLayer, trace::TraceLayer};
use tracing::info;

use crate::allocator::Allocator;
use crate::block_keeper::{return_all_blocks, run_block_keeper};
use crate::handler::{AppState, mutate, validate};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::pool_watches::run_pool_watches;
use crate::watches::run_watches;
use crate::{Error, WebhookArgs, tls};

/// A running webhook replica: the server and its watch tasks.
pub struct WebhookServer {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    /// The allocator, for tests that inspect the index.
    pub allocator: Allocator,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    handle: Handle<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl WebhookServer {
    /// Binds, starts serving and starts the watches; returns at once (the
    /// replica answers 503 denials until [`Self::wait_ready`]). The metrics
    /// have a registry of their own, served on this server's `/metrics`.
    pub async fn start(args: &WebhookArgs, client: Client) -> Result<Self, Error> {
        Self::start_with_metrics(args, client, Arc::new(Metrics::new())).await
    }

    /// Like [`Self::start`], counting in `metrics` (registered in the process's
    /// registry by `svcplane run`, which serves them on its metrics address).
    pub async fn start_with_metrics(
        args: &WebhookArgs,
        client: Client,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        let pools = args.pool_config()?;
        // Certificates first: a replica that cannot serve TLS starts nothing.
        let (rustls, reload) = match (&args.tls_cert_file, &args.tls_key_file) {
            (Some(cert), Some(key)) => {
                let pair = tls::read_pair(cert, key).await?;
                let config = RustlsConfig::from_config(tls::server_config(&pair.0, &pair.1)?);
                let reload = tls::reload_loop(
                    config.clone(),
                    cert.clone(),
                    key.clone(),
                    args.cert_reload_interval,
                    pair,
                );
                (config, Some(reload))
            }
            _ if args.self_signed => {
                let (ca, serving) = tls::self_signed_from_shared_ca(
                    &client,
                    args.ca_secret_namespace(),
                    &args.ca_secret,
                    &args.self_signed_names,
                )
                .await?;
                tls::set_ca_bundle(
                    &client,
                    args.mutating_configuration.as_deref(),
                    args.validating_configuration.as_deref(),
                    &ca.cert_pem,
                )
                .await?;
                let config = tls::server_config(serving.cert_pem.as_bytes(), serving.key_pem.as_bytes())?;
                (RustlsConfig::from_config(config), None)
            }
            _ => {
                return Err(Error::Tls(
                    "need --webhook-tls-cert-file and --webhook-tls-key-file, or --webhook-self-signed"
                        .into(),
                ));
            }
        };

        let listener =
            std::net::TcpListener::bind(args.bind_address).map_err(|e| Error::Bind(args.bind_address, e))?;
        listener.set_nonblocking(true).map_err(|e| Error::Bind(args.bind_address, e))?;
        let addr = listener.local_addr().map_err(|e| Error::Bind(args.bind_address, e))?;
        let handle = Handle::new();
        let server = axum_server::from_tcp_rustls(listener, rustls)
            .map_err(|e| Error::Bind(addr, e))?
            .handle(handle.clone());

        let index = Arc::new(Mutex::new(Index::new(pools.clone()).map_err(Error::Pools)?));
        metrics.observe_pools(index.clone());
        let (ready_tx, ready_rx) = watch::channel(false);
        let allocator = Allocator::new(client.clone(), index.clone(), metrics.clone(), ready_rx)
            .with_blocks(args.block_size);
        let mut tasks = vec![tokio::spawn(run_block_keeper(allocator.clone()))];
        let (release, grace, retention) = (args.release_on_delete, args.unconfirmed_grace, args.retention);
        let (cluster_tx, cluster_rx) = watch::channel(false);
        let (pools_tx, pools_rx) = watch::channel(false);
        let watches =
            run_watches(client.clone(), index.clone(), pools, cluster_tx, release, grace, retention);
        tasks.push(tokio::spawn(watches));
        tasks.push(tokio::spawn(run_pool_watches(client.clone(), index.clone(), pools_tx)));
        tasks.push(tokio::spawn(all_ready([cluster_rx, pools_rx], ready_tx)));
        if let Some(reload) = reload {
            tasks.push(tokio::spawn(reload));
        }

        let state = AppState { allocator: allocator.clone(), metrics: metrics.clone() };
        let app = router(state, args.max_body_bytes);
        tasks.push(tokio::spawn(async move {
            if let Err(error) = server.serve(app.into_make_service()).await {
                tracing::error!(%error, "webhook server stopped");
            }
        }));
        info!(%addr, "webhook serving");
        Ok(Self { addr, allocator, metrics, handle, tasks })
    }

    /// Waits until the index has been rebuilt from the cluster.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), Error> {
        let mut ready = self.allocator.ready_signal();
        match tokio::time::timeout(timeout, ready.wait_for(|ready| *ready)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::NotReady),
        }
    }

    /// Stops hard, as a crash would: open connections are cut and the
    /// watches abort mid-flight.
    pub fn kill(self) {
        self.handle.shutdown();
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Stops accepting, lets in-flight reviews finish (up to 10 s), then
    /// stops the watches.
    pub async fn shutdown(self) {
        self.handle.graceful_shutdown(Some(Duration::from_secs(10)));
        let mut tasks = self.tasks;
        if let Some(server) = tasks.pop() {
            let _ = server.await;
        }
        for task in tasks {
            task.abort();
        }
        return_all_blocks(&self.allocator).await;
    }
}

fn router(state: AppState, max_body: usize) -> Router {
    let admission = Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        // The limit is checked against Content-Length before any of the body is
        // read: the 413 goes out at once and the client (which may be waiting on
        // `Expect: 100-continue`) never sends the rest. A body without a length is
        // counted as it streams in.
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(middleware::map_response_with_state((state.clone(), max_body), explain_too_large))
        .layer(TraceLayer::new_for_http())
        .with_state(state.clone());
    let metrics = state.metrics.clone();
    let health = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(move || async move { own_metrics(&metrics) }))
        .with_state(state);
    admission.merge(health)
}

/// The limit's 413 carries no body, and the apiserver then reports only "the
/// server responded with the status code 413 but did not return more
/// information". A Status body lets it name the flag to raise instead.
async fn explain_too_large(
    State((state, max_body)): State<(AppState, usize)>,
    uri: Uri,
    response: Response,
) -> Response {
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE {
        return response;
    }
    state.metrics.admission(uri.path().trim_start_matches('/'), "invalid", "RequestEntityTooLarge");
    let message = format!(
        "svcplane webhook: the AdmissionReview is larger than --webhook-max-body-bytes={max_body}; \
         raise the flag if Services this large are expected"
    );
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "RequestEntityTooLarge",
        "code": 413,
    });
    (StatusCode::PAYLOAD_TOO_LARGE, Json(status)).into_response()
}

/// The metrics of a standalone server. Inside `svcplane run` they are in the
/// process's registry, on its metrics address.
fn own_metrics(metrics: &Metrics) -> (StatusCode, String) {
    if metrics.has_own_registry() {
        (StatusCode::OK, metrics.encode())
    } else {
        (StatusCode::NOT_FOUND, "the webhook's metrics are served on --metrics-bind-address\n".to_owned())
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.allocator.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "index not built")
    }
}

/// Sets `ready` once every one of `parts` is true.
async fn all_ready<const N: usize>(parts: [watch::Receiver<bool>; N], ready: watch::Sender<bool>) {
    for mut part in parts {
        if part.wait_for(|ready| *ready).await.is_err() {
            return;
        }
    }
    let _ = ready.send(true);
}
