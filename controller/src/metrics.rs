//! Prometheus metrics of the endpoint controllers: svcplane's own
//! (`svcplane_*`, per controller) and, beside them, kube-controller-manager's
//! names ([`crate::upstream_metrics`]) that operators' dashboards already chart.

use std::sync::Arc;
use std::time::Instant;

use crate::plan::{EndpointCounts, Key};
use crate::run::queue::QueueMetrics;
use crate::upstream_metrics::{ServiceTotals, UpstreamMetrics};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Which controller a sample is from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ControllerKind {
    /// EndpointSlices from Pods.
    endpointslice,
    /// Legacy Endpoints from Pods.
    endpoints,
    /// EndpointSlices mirrored from hand-written Endpoints.
    mirroring,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: ControllerKind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    controller: ControllerKind,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShadowLabels {
    controller: ControllerKind,
    agreement: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabels {
    controller: ControllerKind,
    operation: &'static str,
}

/// The `operation` label values of `changes`.
const OPERATIONS: [&str; 3] = ["create", "update", "delete"];

/// The `result` label values of `syncs` ([`SyncTimer`]'s default and setters).
const SYNC_RESULTS: [&str; 3] = ["success", "error", "stale"];

/// The controllers' metrics; cheap to clone (shared cells).
#[derive(Clone)]
pub struct Metrics {
    syncs: Family<SyncLabels, Counter>,
    sync_duration: Family<ControllerLabels, Histogram>,
    endpoints_added: Family<ControllerLabels, Histogram>,
    endpoints_removed: Family<ControllerLabels, Histogram>,
    changes: Family<ChangeLabels, Counter>,
    queue_depth: Family<ControllerLabels, Gauge>,
    stale_skips: Family<ControllerLabels, Counter>,
    shadow_services: Family<ShadowLabels, Gauge>,
    takeover_blocked: Gauge,
    upstream: Arc<UpstreamMetrics>,
}

fn sizes() -> Histogram {
    Histogram::new([0.0, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0])
}

fn seconds() -> Histogram {
    Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0])
}

impl Metrics {
    /// Registers svcplane's metrics under `svcplane_` and upstream's names at the
    /// top of `registry`.
    pub fn register(root: &mut Registry) -> Self {
        let upstream = Arc::new(UpstreamMetrics::register(root));
        let registry = root.sub_registry_with_prefix("svcplane");
        let m = Metrics {
            syncs: Family::default(),
            sync_duration: Family::new_with_constructor(seconds),
            endpoints_added: Family::new_with_constructor(sizes),
            endpoints_removed: Family::new_with_constructor(sizes),
            changes: Family::default(),
            queue_depth: Family::default(),
            stale_skips: Family::default(),
            shadow_services: Family::default(),
            takeover_blocked: Gauge::default(),
            upstream,
        };
        registry.register("syncs", "Reconciles of one Service, by result", m.syncs.clone());
        registry.register("sync_duration_seconds", "Duration of one reconcile", m.sync_duration.clone());
        registry.register(
            "endpoints_added_per_sync",
            "Endpoints added by one reconcile",
            m.endpoints_added.clone(),
        );
        registry.register(
            "endpoints_removed_per_sync",
            "Endpoints removed by one reconcile",
            m.endpoints_removed.clone(),
        );
        registry.register("changes", "Objects written, by operation", m.changes.clone());
        registry.register("queue_depth", "Services waiting for a reconcile", m.queue_depth.clone());
        registry.register(
            "stale_cache_skips",
            "Reconciles postponed because the cache had not seen svcplane's own writes",
            m.stale_skips.clone(),
        );
        registry.register(
            "shadow_services",
            "Services whose endpoints svcplane agrees (or not) with kube-controller-manager on, in shadow mode",
            m.shadow_services.clone(),
        );
        registry.register(
            "takeover_blocked",
            "1 when a take-over stopped because kube-controller-manager still runs its endpoint controllers",
            m.takeover_blocked.clone(),
        );
        m
    }

    /// Sets the shadow-mode counts of `controller`.
    pub fn set_shadow(&self, controller: ControllerKind, agrees: usize, differs: usize) {
        for (agreement, n) in [("agrees", agrees), ("differs", differs)] {
            let labels = ShadowLabels { controller: controller.clone(), agreement };
            self.shadow_services.get_or_create(&labels).set(n as i64);
        }
    }

    /// Marks the take-over blocked.
    pub fn set_takeover_blocked(&self, blocked: bool) {
        self.takeover_blocked.set(i64::from(blocked));
    }

    /// Creates the series of a controller that runs in this process at 0 (its
    /// writes by operation, queue depth, stale-cache skips and reconciles by
    /// result): a standby that never writes exposes `svcplane_changes_total` 0
    /// rather than nothing, so dashboards, `rate()` and tests can tell "no writes"
    /// from "not scraped" (prometheus-client omits a family without series).
    pub fn declare(&self, controller: ControllerKind) {
        for operation in OPERATIONS {
            self.changes.get_or_create(&ChangeLabels { controller: controller.clone(), operation }).inc_by(0);
        }
        for result in SYNC_RESULTS {
            self.syncs.get_or_create(&SyncLabels { controller: controller.clone(), result }).inc_by(0);
        }
        self.upstream.declare(&controller);
        let l = ControllerLabels { controller };
        self.queue_depth.get_or_create(&l).set(0);
        self.stale_skips.get_or_create(&l).inc_by(0);
    }

    /// What `controller`'s work queue reports into: svcplane_queue_depth (keys
    /// ready or delayed) and upstream's workqueue series.
    pub fn queue(&self, controller: ControllerKind) -> QueueMetrics {
        let pending =
            self.queue_depth.get_or_create(&ControllerLabels { controller: controller.clone() }).clone();
        self.upstream.queue(&controller, pending)
    }

    /// Starts timing one reconcile; the guard records duration and result when dropped.
    pub fn sync(&self, controller: ControllerKind) -> SyncTimer<'_> {
        SyncTimer { metrics: self, controller, start: Instant::now(), result: "error" }
    }

    /// Counts a write.
    pub fn changed(&self, controller: ControllerKind, operation: &'static str) {
        self.upstream.changed(&controller, operation);
        self.changes.get_or_create(&ChangeLabels { controller, operation }).inc();
    }

    /// Records one applied plan of `key`: its endpoint churn, how many objects
    /// it wrote, and the Service's slice totals afterwards (`None`: none left).
    pub fn applied(
        &self,
        controller: ControllerKind,
        key: &Key,
        counts: &EndpointCounts,
        writes: usize,
        totals: Option<ServiceTotals>,
    ) {
        self.upstream.applied(&controller, key, counts, writes, None, totals);
        let l = ControllerLabels { controller };
        self.endpoints_added.get_or_create(&l).observe(counts.added as f64);
        self.endpoints_removed.get_or_create(&l).observe(counts.removed as f64);
    }

    /// Counts a postponed stale reconcile.
    pub fn stale_skip(&self, controller: ControllerKind) {
        self.stale_skips.get_or_create(&ControllerLabels { controller }).inc();
    }
}

/// Drop guard timing one reconcile.
pub struct SyncTimer<'a> {
    metrics: &'a Metrics,
    controller: ControllerKind,
    start: Instant,
    result: &'static str,
}

impl SyncTimer<'_> {
    /// Marks the reconcile as successful (default: error).
    pub fn success(&mut self) {
        self.result = "success";
    }

    /// Marks the reconcile with a named result (e.g. "stale").
    pub fn result(&mut self, result: &'static str) {
        self.result = result;
    }
}

impl Drop for SyncTimer<'_> {
    fn drop(&mut self) {
        let controller = self.controller.clone();
        let seconds = self.start.elapsed().as_secs_f64();
        self.metrics.upstream.synced(&controller, self.result, seconds);
        self.metrics
            .syncs
            .get_or_create(&SyncLabels { controller: controller.clone(), result: self.result })
            .inc();
        self.metrics.sync_duration.get_or_create(&ControllerLabels { controller }).observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_controller_exposes_its_counters_at_zero_before_any_write() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.declare(ControllerKind::endpointslice);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "svcplane_changes_total{controller=\"endpointslice\",operation=\"create\"} 0",
            "svcplane_changes_total{controller=\"endpointslice\",operation=\"update\"} 0",
            "svcplane_changes_total{controller=\"endpointslice\",operation=\"delete\"} 0",
            "svcplane_syncs_total{controller=\"endpointslice\",result=\"success\"} 0",
            "svcplane_queue_depth{controller=\"endpointslice\"} 0",
            "svcplane_stale_cache_skips_total{controller=\"endpointslice\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        // Only the controllers that run.
        assert!(!text.contains("controller=\"mirroring\""), "{text}");
    }
}
