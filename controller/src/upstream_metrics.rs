//! The metrics kube-controller-manager's endpoint controllers expose, under
//! their names, labels and meaning (v1.37.2: `k8s.io/endpointslice/metrics`,
//! `pkg/controller/endpointslicemirroring/metrics`, client-go's workqueue
//! metrics), so dashboards and alerts written for them keep working.
//!
//! Upstream's counters carry no `_total` suffix (`endpoint_slice_controller_syncs`);
//! prometheus-client adds one to every counter, so those are exposed as
//! untyped samples ([`Untyped`]), which PromQL's `rate()` reads the same way.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{
        MetricType, TypedMetric, counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
    },
    registry::Registry,
};

use crate::metrics::ControllerKind;
use crate::plan::Key;
use crate::run::queue::QueueMetrics;

/// A counter exposed without the `_total` suffix, as upstream names it.
#[derive(Clone, Debug, Default)]
pub struct Untyped(Counter);

impl Untyped {
    fn inc_by(&self, n: u64) {
        self.0.inc_by(n);
    }
}

impl TypedMetric for Untyped {
    const TYPE: MetricType = MetricType::Unknown;
}

impl EncodeMetric for Untyped {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&(self.0.get() as i64))
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Operation {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncResult {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Topology {
    topology: &'static str,
    traffic_distribution: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueName {
    name: &'static str,
}

/// `ExponentialBuckets(2, 2, 15)`, upstream's per-sync histograms.
fn per_sync() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(2.0, 2.0, 15))
}

/// One controller's slice metrics (`endpoint_slice_controller_*` or
/// `endpoint_slice_mirroring_controller_*`).
#[derive(Clone, Debug)]
struct SliceMetrics {
    added: Histogram,
    updated: Histogram,
    removed: Histogram,
    endpoints_desired: Gauge,
    num_slices: Gauge,
    desired_slices: Gauge,
    changes: Family<Operation, Untyped>,
}

impl SliceMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = SliceMetrics {
            added: per_sync(),
            updated: per_sync(),
            removed: per_sync(),
            endpoints_desired: Gauge::default(),
            num_slices: Gauge::default(),
            desired_slices: Gauge::default(),
            changes: Family::default(),
        };
        registry.register(
            "endpoints_added_per_sync",
            "Number of endpoints added on each Service sync",
            m.added.clone(),
        );
        registry.register(
            "endpoints_updated_per_sync",
            "Number of endpoints updated on each Service sync",
            m.updated.clone(),
        );
        registry.register(
            "endpoints_removed_per_sync",
            "Number of endpoints removed on each Service sync",
            m.removed.clone(),
        );
        registry.register("endpoints_desired", "Number of endpoints desired", m.endpoints_desired.clone());
        registry.register("num_endpoint_slices", "Number of EndpointSlices", m.num_slices.clone());
        registry.register(
            "desired_endpoint_slices",
            "Number of EndpointSlices that would exist with perfect endpoint allocation",
            m.desired_slices.clone(),
        );
        registry.register("changes", "Number of EndpointSlice changes", m.changes.clone());
        for operation in ["create", "update", "delete"] {
            m.changes.get_or_create(&Operation { operation }).inc_by(0);
        }
        m
    }
}

/// One Service's share of the slice gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceTotals {
    /// Endpoints desired.
    pub endpoints: usize,
    /// Slices that exist once the plan is applied.
    pub slices: usize,
    /// Slices with perfect packing (upstream `numDesiredSlices` per port set).
    pub desired_slices: usize,
}

/// The upstream-named metrics.
#[derive(Debug)]
pub struct UpstreamMetrics {
    slices: SliceMetrics,
    mirroring: SliceMetrics,
    syncs: Family<SyncResult, Untyped>,
    changed_per_sync: Family<Topology, Histogram>,
    addresses_skipped: Histogram,
    mirroring_sync_duration: Histogram,
    queue_depth: Family<QueueName, Gauge>,
    queue_adds: Family<QueueName, Counter>,
    queue_retries: Family<QueueName, Counter>,
    totals: Mutex<HashMap<(ControllerKind, Key), ServiceTotals>>,
}

impl UpstreamMetrics {
    /// Registers them at the top of `registry` (no prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let slices = SliceMetrics::register(registry.sub_registry_with_prefix("endpoint_slice_controller"));
        let mirroring =
            SliceMetrics::register(registry.sub_registry_with_prefix("endpoint_slice_mirroring_controller"));
        let m = UpstreamMetrics {
            slices,
            mirroring,
            syncs: Family::default(),
            changed_per_sync: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 10))
            }),
            addresses_skipped: per_sync(),
            mirroring_sync_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
            queue_depth: Family::default(),
            queue_adds: Family::default(),
            queue_retries: Family::default(),
            totals: Mutex::default(),
        };
        let slice_registry = registry.sub_registry_with_prefix("endpoint_slice_controller");
        slice_registry.register("syncs", "Number of EndpointSlice syncs", m.syncs.clone());
        slice_registry.register(
            "endpointslices_changed_per_sync",
            "Number of EndpointSlices changed on each Service sync",
            m.changed_per_sync.clone(),
        );
        let mirror_registry = registry.sub_registry_with_prefix("endpoint_slice_mirroring_controller");
        mirror_registry.register(
            "addresses_skipped_per_sync",
            "Number of addresses skipped on each Endpoints sync due to being invalid or exceeding MaxEndpointsPerSubset",
            m.addresses_skipped.clone(),
        );
        mirror_registry.register(
            "endpoints_sync_duration",
            "Duration of syncEndpoints() in seconds",
            m.mirroring_sync_duration.clone(),
        );
        let queue_registry = registry.sub_registry_with_prefix("workqueue");
        queue_registry.register("depth", "Current depth of workqueue", m.queue_depth.clone());
        queue_registry.register("adds", "Total number of adds handled by workqueue", m.queue_adds.clone());
        queue_registry.register(
            "retries",
            "Total number of retries handled by workqueue",
            m.queue_retries.clone(),
        );
        m
    }

    /// The workqueue series of `controller` (`name` as upstream's queues are
    /// named), with `pending` as svcplane's own depth gauge.
    pub fn queue(&self, controller: &ControllerKind, pending: Gauge) -> QueueMetrics {
        let name = QueueName { name: queue_name(controller) };
        QueueMetrics {
            ready: self.queue_depth.get_or_create(&name).clone(),
            pending,
            adds: self.queue_adds.get_or_create(&name).clone(),
            retries: self.queue_retries.get_or_create(&name).clone(),
        }
    }

    /// Declares the sync results at 0 for a controller that runs.
    pub fn declare(&self, controller: &ControllerKind) {
        if *controller == ControllerKind::endpointslice {
            for result in ["success", "error", "stale"] {
                self.syncs.get_or_create(&SyncResult { result }).inc_by(0);
            }
        }
    }

    fn of(&self, controller: &ControllerKind) -> Option<&SliceMetrics> {
        match controller {
            ControllerKind::endpointslice => Some(&self.slices),
            ControllerKind::mirroring => Some(&self.mirroring),
            ControllerKind::endpoints => None,
        }
    }

    /// One sync ended with `result` after `seconds`.
    pub fn synced(&self, controller: &ControllerKind, result: &'static str, seconds: f64) {
        match controller {
            ControllerKind::endpointslice => self.syncs.get_or_create(&SyncResult { result }).inc_by(1),
            ControllerKind::mirroring => self.mirroring_sync_duration.observe(seconds),
            ControllerKind::endpoints => {}
        }
    }

    /// One object written.
    pub fn changed(&self, controller: &ControllerKind, operation: &'static str) {
        if let Some(m) = self.of(controller) {
            m.changes.get_or_create(&Operation { operation }).inc_by(1);
        }
    }

    /// The endpoint churn and slice writes of one applied plan, and the
    /// Service's share of the gauges afterwards (`None`: the Service is gone).
    #[allow(clippy::too_many_arguments)]
    pub fn applied(
        &self,
        controller: &ControllerKind,
        key: &Key,
        counts: &crate::plan::EndpointCounts,
        writes: usize,
        traffic_distribution: Option<&str>,
        totals: Option<ServiceTotals>,
    ) {
        let Some(m) = self.of(controller) else { return };
        m.added.observe(counts.added as f64);
        m.updated.observe(counts.updated as f64);
        m.removed.observe(counts.removed as f64);
        match controller {
            ControllerKind::endpointslice => {
                let labels = Topology {
                    topology: "Disabled",
                    traffic_distribution: traffic_distribution.unwrap_or_default().to_owned(),
                };
                self.changed_per_sync.get_or_create(&labels).observe(writes as f64);
            }
            _ => self.addresses_skipped.observe(counts.skipped as f64),
        }
        // The gauges move by this Service's change: no walk over every Service
        // on each sync.
        let mut all = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let id = (controller.clone(), key.clone());
        let before = match totals {
            Some(t) => all.insert(id, t),
            None => all.remove(&id),
        }
        .unwrap_or_default();
        let after = totals.unwrap_or_default();
        let delta = |new: usize, old: usize| new as i64 - old as i64;
        m.endpoints_desired.inc_by(delta(after.endpoints, before.endpoints));
        m.num_slices.inc_by(delta(after.slices, before.slices));
        m.desired_slices.inc_by(delta(after.desired_slices, before.desired_slices));
    }
}

/// Upstream's workqueue names.
fn queue_name(controller: &ControllerKind) -> &'static str {
    match controller {
        ControllerKind::endpointslice => "endpoint_slice",
        ControllerKind::endpoints => "endpoint",
        ControllerKind::mirroring => "endpoint_slice_mirroring",
    }
}

/// Upstream `numDesiredSlices`: slices one port set needs with perfect packing.
pub fn desired_slices(endpoints: usize, max_per_slice: usize) -> usize {
    match endpoints {
        0 => 0,
        n => n.div_ceil(max_per_slice.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::EndpointCounts;

    #[test]
    fn upstream_names_labels_and_untyped_counters_are_exposed() {
        let mut registry = Registry::default();
        let m = UpstreamMetrics::register(&mut registry);
        m.declare(&ControllerKind::endpointslice);
        m.synced(&ControllerKind::endpointslice, "success", 0.1);
        m.changed(&ControllerKind::endpointslice, "create");
        let key = Key { namespace: "ns".into(), name: "web".into() };
        let totals = ServiceTotals { endpoints: 150, slices: 2, desired_slices: 2 };
        let counts = EndpointCounts { added: 150, ..Default::default() };
        m.applied(&ControllerKind::endpointslice, &key, &counts, 2, None, Some(totals));
        let _ = m.queue(&ControllerKind::endpoints, Gauge::default()).adds.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            "endpoint_slice_controller_syncs{result=\"success\"} 1",
            "endpoint_slice_controller_syncs{result=\"stale\"} 0",
            "endpoint_slice_controller_changes{operation=\"create\"} 1",
            "endpoint_slice_controller_endpoints_desired 150",
            "endpoint_slice_controller_num_endpoint_slices 2",
            "endpoint_slice_controller_desired_endpoint_slices 2",
            "endpoint_slice_controller_endpointslices_changed_per_sync_count{topology=\"Disabled\",traffic_distribution=\"\"} 1",
            "endpoint_slice_controller_endpoints_added_per_sync_sum 150.0",
            "endpoint_slice_mirroring_controller_changes{operation=\"delete\"} 0",
            "workqueue_adds_total{name=\"endpoint\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        m.applied(&ControllerKind::endpointslice, &key, &counts, 0, None, None);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.lines().any(|l| l == "endpoint_slice_controller_num_endpoint_slices 0"), "{text}");
    }

    #[test]
    fn desired_slices_is_upstreams_perfect_packing() {
        assert_eq!([0, 1, 100, 101, 250].map(|n| desired_slices(n, 100)), [0, 1, 1, 2, 3]);
    }
}
