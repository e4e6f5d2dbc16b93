//! The imperative shell: watches, queues, workers and writes. Everything that talks
//! to the API lives here; the planners it calls are pure.
//!
//! One process runs any of three controllers over shared watches:
//! - `endpointslice`: Service + Pods → svcplane's EndpointSlices;
//! - `endpoints`: Service + Pods → the legacy Endpoints object;
//! - `mirroring`: selectorless Service + hand-written Endpoints → mirrored slices.

mod apply;
mod events;
mod no_ready;
pub mod queue;
pub mod state;
mod sync;

use std::{future::Future, sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Service;
use kube::{Client, runtime::events::Reporter};
use tokio::sync::watch;

use crate::{
    endpointslice::SliceConfig,
    metrics::{ControllerKind, Metrics},
    migration::{Migration, ShadowBook, TakeOverGuard},
    mirroring::MirroringConfig,
    tracker::WriteTracker,
};
pub use state::{Indexes, Queues, Stores};

/// Flags of the controller role (flattened into `svcplane run`).
#[derive(clap::Args, Clone, Debug)]
pub struct ControllerArgs {
    /// Controllers to run: any of endpointslice, endpoints, mirroring.
    #[arg(long, value_delimiter = ',', default_value = "endpointslice,endpoints,mirroring")]
    pub controllers: Vec<String>,
    /// Most endpoints in one EndpointSlice (upstream --max-endpoints-per-slice).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_endpoints_per_slice: u16,
    /// Most addresses of one Endpoints subset mirrored (upstream --mirroring-max-endpoints-per-subset).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub mirroring_max_endpoints_per_subset: u16,
    /// Services reconciled at once, per controller (upstream --concurrent-service-endpoint-syncs).
    #[arg(long, default_value_t = 5)]
    pub concurrency: usize,
    /// Average writes per second of each controller (0: unlimited), as
    /// kube-controller-manager's --kube-api-qps, which also applies per controller.
    #[arg(long, default_value_t = 50)]
    pub kube_api_qps: u32,
    /// Writes each controller may send at once after idling (--kube-api-burst).
    #[arg(long, default_value_t = 100)]
    pub kube_api_burst: u32,
    /// A Service synced less than this long ago waits until then (while a burst
    /// lasts, or always with --burst-batch-delay=0s): a burst of changes to one
    /// Service costs at most one more write per interval (0s: off). 250ms halves
    /// the bytes every slice watcher receives in a rollout of Services of 250
    /// endpoints against 100ms, at about 150 ms more p99 latency during the burst
    /// (`make bench`, scenarios C and deployment).
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub min_sync_interval: Duration,
    /// While Services are queued faster than 100 per second, a Service waits this
    /// long before its sync, so Pods changing together are written once; a quiet
    /// cluster never waits (0s: off).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub burst_batch_delay: Duration,
    /// Moving endpoints between kube-controller-manager and svcplane: off (never
    /// touch its slices), shadow (write nothing, compare), take-over (delete its
    /// slices once svcplane's are written), hand-back (delete svcplane's once
    /// its agree). See the README's "Migrating from kube-controller-manager".
    #[arg(long, value_enum, default_value = "off")]
    pub migration: Migration,
    /// A Service whose selector has had no ready endpoint this long gets a Warning
    /// `NoReadyEndpoints` Event saying why, and a Normal `ReadyEndpoints` when it
    /// recovers; with the endpointslice controller only (0s: off).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub no_ready_endpoints_grace: Duration,
}

impl Default for ControllerArgs {
    fn default() -> Self {
        Self {
            controllers: vec!["endpointslice".into(), "endpoints".into(), "mirroring".into()],
            max_endpoints_per_slice: 100,
            mirroring_max_endpoints_per_subset: 1000,
            concurrency: 5,
            kube_api_qps: 50,
            kube_api_burst: 100,
            min_sync_interval: Duration::from_millis(250),
            burst_batch_delay: Duration::from_millis(50),
            migration: Migration::Off,
            no_ready_endpoints_grace: Duration::from_secs(60),
        }
    }
}

pub use crate::plan::Key;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A write was refused or failed.
    #[error("failed to {verb} {kind} {namespace}/{name}: {source}")]
    Write {
        verb: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// The store has not caught up with svcplane's own writes yet.
    #[error("cache for {0} is behind svcplane's own writes")]
    Stale(Key),
    /// The writes went out but the plan is incomplete (Pods on Nodes that do not
    /// exist yet): upstream fails such a sync so it is retried with backoff.
    #[error("{0}")]
    Retry(String),
}

/// Everything a reconcile needs: built once.
pub struct Context {
    /// API client (the only writer is `apply`).
    pub client: Client,
    /// Reflector stores.
    pub stores: Stores,
    /// Selector and slice-owner indexes.
    pub indexes: Arc<Indexes>,
    /// Metrics.
    pub metrics: Metrics,
    /// Events on Services and Endpoints.
    pub events: events::Events,
    /// Slice planner settings.
    pub slice_config: SliceConfig,
    /// Mirroring planner settings.
    pub mirroring_config: MirroringConfig,
    /// svcplane's own writes not yet seen in the store (shared with the router,
    /// which reports observed deletions).
    pub tracker: Arc<WriteTracker>,
    /// Trigger times (last-change-trigger-time annotation), per controller.
    pub slice_trigger_times: state::TriggerTimes,
    /// Same, for the Endpoints controller (upstream keeps one per controller).
    pub endpoints_trigger_times: state::TriggerTimes,
    /// Write rate limit of each controller (a token bucket, as client-go's).
    pub limits: WriteLimits,
    /// What svcplane does about kube-controller-manager's endpoint objects.
    pub migration: Migration,
    /// Shadow mode's verdicts.
    pub shadow: ShadowBook,
    /// Take-over's watch for a kube-controller-manager still writing.
    pub takeover_guard: TakeOverGuard,
    /// The failure Events' rate bound.
    pub failure_events: apply::FailureEvents,
    /// Services the endpointslice controller synced since the `NoReadyEndpoints`
    /// sweep last looked.
    pub synced_since_sweep: no_ready::SyncedSinceSweep,
}

/// One token bucket per controller, as kube-controller-manager gives each
/// controller its own client; `None` when unlimited.
pub struct WriteLimits {
    slices: Option<governor::DefaultDirectRateLimiter>,
    endpoints: Option<governor::DefaultDirectRateLimiter>,
    mirroring: Option<governor::DefaultDirectRateLimiter>,
}

impl WriteLimits {
    fn new(qps: u32, burst: u32) -> Self {
        let bucket = || {
            let qps = std::num::NonZeroU32::new(qps)?;
            let burst = std::num::NonZeroU32::new(burst).unwrap_or(qps);
            Some(governor::RateLimiter::direct(governor::Quota::per_second(qps).allow_burst(burst)))
        };
        Self { slices: bucket(), endpoints: bucket(), mirroring: bucket() }
    }

    /// Waits until `controller` may send one more write.
    pub async fn until_ready(&self, controller: &ControllerKind) {
        let bucket = match controller {
            ControllerKind::endpointslice => &self.slices,
            ControllerKind::endpoints => &self.endpoints,
            ControllerKind::mirroring => &self.mirroring,
        };
        let Some(bucket) = bucket else { return };
        // governor's own `until_ready` sleeps on futures-timer's global timer
        // thread: a thread wake-up per throttled write, about a tenth of the
        // controller's CPU at QPS 20 in `make bench` scenario B. tokio's timer
        // wheel waits without one.
        while let Err(not_until) = bucket.check() {
            let now = governor::clock::Clock::now(bucket.clock());
            tokio::time::sleep(not_until.wait_time_from(now)).await;
        }
    }
}

/// Field manager of every write.
pub const FIELD_MANAGER: &str = "svcplane";

/// Runs the chosen controllers until `shutdown` resolves.
///
/// Watches start at once (a standby replica keeps warm caches); workers start when
/// `leader` turns true. If `leader` turns false again, `run` returns: the process
/// must exit rather than keep writing without the lease.
pub async fn run(
    args: ControllerArgs,
    client: Client,
    metrics: Metrics,
    mut leader: watch::Receiver<bool>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let wants = |c: &str| args.controllers.iter().any(|x| x == c);
    for c in &args.controllers {
        if !["endpointslice", "endpoints", "mirroring"].contains(&c.as_str()) {
            return Err(RunError::UnknownController(c.clone()));
        }
    }
    for (name, kind) in [
        ("endpointslice", ControllerKind::endpointslice),
        ("endpoints", ControllerKind::endpoints),
        ("mirroring", ControllerKind::mirroring),
    ] {
        if wants(name) {
            metrics.declare(kind.clone());
            if args.migration == Migration::Shadow {
                metrics.set_shadow(kind, 0, 0);
            }
        }
    }
    if args.migration == Migration::TakeOver {
        metrics.set_takeover_blocked(false);
    }
    let (interval, burst) = (args.min_sync_interval, args.burst_batch_delay);
    let new_queue = |kind| queue::WorkQueue::with_metrics(interval, burst, metrics.queue(kind));
    let queues = Queues {
        slices: wants("endpointslice").then(|| new_queue(ControllerKind::endpointslice)),
        endpoints: wants("endpoints").then(|| new_queue(ControllerKind::endpoints)),
        mirroring: wants("mirroring").then(|| new_queue(ControllerKind::mirroring)),
    };
    let tracker = Arc::new(WriteTracker::default());
    let (stores, indexes, mut synced, watch_tasks) =
        state::start_watches(&client, queues.clone(), tracker.clone(), args.migration);
    let ctx = Arc::new(Context {
        events: events::Events::new(client.clone(), reporter()),
        client,
        stores,
        indexes,
        metrics,
        slice_config: SliceConfig {
            max_endpoints_per_slice: args.max_endpoints_per_slice.into(),
            // Issue #4: a Service that loses its selector or becomes ExternalName
            // loses its stale slices. Upstream leaves them (kubernetes#91072).
            delete_when_unselected: true,
            ..SliceConfig::default()
        },
        mirroring_config: MirroringConfig {
            max_endpoints_per_subset: args.mirroring_max_endpoints_per_subset.into(),
            ..MirroringConfig::default()
        },
        tracker,
        slice_trigger_times: Default::default(),
        endpoints_trigger_times: Default::default(),
        limits: WriteLimits::new(args.kube_api_qps, args.kube_api_burst),
        migration: args.migration,
        shadow: ShadowBook::default(),
        takeover_guard: TakeOverGuard::default(),
        failure_events: Default::default(),
        synced_since_sweep: Default::default(),
    });

    let mut shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        _ = synced.wait_for(|s| *s) => {}
        _ = &mut shutdown => { stop(&queues, watch_tasks); return Ok(()); }
    }
    tracing::info!("caches synced");
    ready.store(true, std::sync::atomic::Ordering::Release);
    tokio::select! {
        r = leader.wait_for(|l| *l) => { if r.is_err() { stop(&queues, watch_tasks); return Err(RunError::LostLease); } }
        _ = &mut shutdown => { stop(&queues, watch_tasks); return Ok(()); }
    }
    tracing::info!(controllers = ?args.controllers, "leading: starting workers");
    // Everything was queued by the initial lists; queue again whatever the stores
    // hold that has no live Service (orphans from while no leader ran).
    queue_orphans(&ctx, &queues);

    let mut workers = Vec::new();
    for (q, kind) in [
        (&queues.slices, ControllerKind::endpointslice),
        (&queues.endpoints, ControllerKind::endpoints),
        (&queues.mirroring, ControllerKind::mirroring),
    ] {
        let Some(q) = q else { continue };
        for _ in 0..args.concurrency.max(1) {
            workers.push(tokio::spawn(worker(q.clone(), ctx.clone(), kind.clone())));
        }
    }

    let grace = args.no_ready_endpoints_grace;
    let no_ready =
        (wants("endpointslice") && !grace.is_zero()).then(|| tokio::spawn(no_ready::run(ctx.clone(), grace)));

    let result = tokio::select! {
        _ = &mut shutdown => Ok(()),
        _ = leader.wait_for(|l| !*l) => Err(RunError::LostLease),
    };
    stop(&queues, watch_tasks);
    if let Some(task) = no_ready {
        task.abort();
    }
    // Let in-flight reconciles finish their writes (graceful shutdown).
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    result
}

/// Who writes svcplane's Events: controller `svcplane`, instance the Pod's name.
fn reporter() -> Reporter {
    Reporter {
        controller: "svcplane".into(),
        instance: std::env::var("POD_NAME").ok().or_else(|| std::env::var("HOSTNAME").ok()),
    }
}

/// Why `run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The lease was lost: the process must exit.
    #[error("lost the leader lease")]
    LostLease,
    /// `--controllers` named something unknown.
    #[error("unknown controller {0:?} (expected endpointslice, endpoints or mirroring)")]
    UnknownController(String),
}

fn stop(queues: &Queues, watch_tasks: Vec<tokio::task::JoinHandle<()>>) {
    for q in [&queues.slices, &queues.endpoints, &queues.mirroring].into_iter().flatten() {
        q.shutdown();
    }
    for t in watch_tasks {
        t.abort();
    }
}

fn queue_orphans(ctx: &Context, queues: &Queues) {
    let owners: Vec<(String, String, String)> =
        state::read(&ctx.indexes.slices_by_owner).keys().cloned().collect();
    for (namespace, name, managed_by) in owners {
        let key = Key { namespace, name };
        let q = match managed_by.as_str() {
            crate::labels::SVCPLANE_SLICE_CONTROLLER => &queues.slices,
            _ => &queues.mirroring,
        };
        if let Some(q) = q {
            q.add(key);
        }
    }
    // Upstream's checkLeftoverEndpoints: every Endpoints is synced once at start, so
    // one whose Service is gone is deleted.
    if let Some(q) = &queues.endpoints {
        for packed in ctx.stores.endpoints.state() {
            let ep = packed.unpack();
            let leader_lock = ep
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(crate::labels::LEADER_ELECTION));
            if !leader_lock {
                q.add(Key::of(&ep));
            }
        }
    }
}

async fn worker(queue: Arc<queue::WorkQueue<Key>>, ctx: Arc<Context>, kind: ControllerKind) {
    while let Some(key) = queue.next().await {
        let result = match kind {
            ControllerKind::endpointslice => sync::slices(&key, &ctx).await,
            ControllerKind::endpoints => sync::endpoints(&key, &ctx).await,
            ControllerKind::mirroring => sync::mirrored_slices(&key, &ctx).await,
        };
        queue.done(&key);
        match result {
            Ok(()) => queue.forget(&key),
            Err(Error::Stale(_)) => {
                // The watch event of our own write re-queues the key; this is a fallback.
                ctx.metrics.stale_skip(kind.clone());
                queue.add_after(key, Duration::from_millis(500));
            }
            Err(e) => {
                let delay = queue.retry_after_failure(key.clone());
                tracing::warn!(controller = ?kind, %key, error = %e, retry_in = ?delay, "reconcile failed");
            }
        }
    }
}

/// The Service of `key` from the store.
pub(crate) fn service(ctx: &Context, key: &Key) -> Option<Arc<Service>> {
    ctx.stores.service(key)
}
