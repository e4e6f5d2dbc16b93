//! The webhook's Prometheus metrics, under the `svcplane_webhook` prefix; pool
//! usage is read from the index at scrape time by a `Collector`.
//!
//! `svcplane run` registers them into its one registry ([`Metrics::register`]),
//! served on `--metrics-bind-address`; [`Metrics::new`] keeps a registry of its
//! own for a standalone server (tests, benchmarks). No API calls.

use std::fmt;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::index::{Index, lock};

/// Prefix of every webhook metric.
pub const PREFIX: &str = "svcplane_webhook";

/// Labels of an admission outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `mutate` or `validate`.
    pub webhook: String,
    /// `allowed`, `denied`, `invalid`.
    pub result: String,
    /// The denial reason (`AlreadyAllocated`, `Full`, …) or empty.
    pub reason: String,
}

/// Labels of a repair finding.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabels {
    /// `leak`, `adopted`, `duplicate`, `outOfRange`, `expiredBlock`, `error`.
    pub r#type: String,
}

/// Labels of a pool gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// The pool: a CIDR or a port range.
    pub pool: String,
}

/// Every metric the webhook exports.
pub struct Metrics {
    /// The registry of [`Metrics::new`]; `None` when registered into the caller's.
    registry: Option<Mutex<Registry>>,
    /// Admission calls by outcome.
    pub admissions: Family<AdmissionLabels, Counter>,
    /// Server-side admission latency.
    pub admission_seconds: Histogram,
    /// Claims created.
    pub allocations: Counter,
    /// Dynamic picks that lost a claim race and tried another value.
    pub claim_conflicts: Counter,
    /// Dry-run requests answered without reserving.
    pub dry_runs: Counter,
    /// Dynamic values handed out from this replica's blocks (claim written
    /// after the answer).
    pub block_handouts: Counter,
    /// Values handed out from a block whose claim another request had
    /// already made: the apiserver refuses one of the two Services.
    pub block_conflicts: Counter,
    /// Repair findings by type.
    pub repairs: Family<RepairLabels, Counter>,
    pools: Arc<PoolUsage>,
}

impl Metrics {
    /// The metrics in a registry of their own, encoded by [`Metrics::encode`].
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let mut metrics = Self::register(&mut registry);
        metrics.registry = Some(Mutex::new(registry));
        metrics
    }

    /// Registers every metric in `registry`; pass a sub-registry with the
    /// [`PREFIX`] prefix to keep their names.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            registry: None,
            admissions: Family::default(),
            admission_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            allocations: Counter::default(),
            claim_conflicts: Counter::default(),
            dry_runs: Counter::default(),
            block_handouts: Counter::default(),
            block_conflicts: Counter::default(),
            repairs: Family::default(),
            pools: Arc::default(),
        };
        let m = &metrics;
        registry.register(
            "admission_requests",
            "Admission calls by webhook and result",
            m.admissions.clone(),
        );
        registry.register(
            "admission_duration_seconds",
            "Server-side admission latency",
            m.admission_seconds.clone(),
        );
        registry.register("allocations", "Claims created", m.allocations.clone());
        registry.register("claim_conflicts", "Picks that lost a claim race", m.claim_conflicts.clone());
        registry.register("dry_runs", "Dry-run requests answered without reserving", m.dry_runs.clone());
        registry.register(
            "block_handouts",
            "Dynamic values handed out from this replica's blocks, claimed after the answer",
            m.block_handouts.clone(),
        );
        registry.register(
            "block_conflicts",
            "Values handed out from a block that another request had claimed",
            m.block_conflicts.clone(),
        );
        registry.register("repair_findings", "Repair findings by type", m.repairs.clone());
        registry.register_collector(Box::new(m.pools.clone()));
        metrics
    }

    /// Counts an admission call of `webhook` (`mutate`, `validate`) by outcome.
    pub fn admission(&self, webhook: &str, result: &str, reason: &str) {
        let labels =
            AdmissionLabels { webhook: webhook.into(), result: result.into(), reason: reason.into() };
        self.admissions.get_or_create(&labels).inc();
    }

    /// Counts a repair finding.
    pub fn repair(&self, kind: &str) {
        self.repairs.get_or_create(&RepairLabels { r#type: kind.to_owned() }).inc();
    }

    /// Reports the pool usage of `index` at every scrape from now on.
    pub fn observe_pools(&self, index: Arc<Mutex<Index>>) {
        *self.pools.index.lock().unwrap_or_else(|p| p.into_inner()) = Some(index);
    }

    /// Whether these metrics have their own registry ([`Metrics::new`]).
    pub fn has_own_registry(&self) -> bool {
        self.registry.is_some()
    }

    /// The text exposition of the own registry (empty for metrics registered
    /// elsewhere: that registry's owner serves them).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Some(registry) = &self.registry {
            let registry = registry.lock().unwrap_or_else(|p| p.into_inner());
            // Writing to a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        }
        text
    }
}

/// `pool_allocated` and `pool_available`, read from the index at scrape time so
/// a pool that goes away stops being reported.
#[derive(Default)]
struct PoolUsage {
    index: Mutex<Option<Arc<Mutex<Index>>>>,
}

impl fmt::Debug for PoolUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolUsage").finish_non_exhaustive()
    }
}

impl Collector for PoolUsage {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let index = self.index.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(index) = index else { return Ok(()) };
        let used = Family::<PoolLabels, Gauge>::default();
        let free = Family::<PoolLabels, Gauge>::default();
        for usage in lock(&index).usage() {
            let labels = PoolLabels { pool: usage.pool };
            used.get_or_create(&labels).set(i64::try_from(usage.used).unwrap_or(i64::MAX));
            free.get_or_create(&labels).set(i64::try_from(usage.free).unwrap_or(i64::MAX));
        }
        for (name, help, family) in [
            ("pool_allocated", "Values taken in each pool", &used),
            ("pool_available", "Values free in each pool", &free),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, family.metric_type())?;
            family.encode(metric)?;
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_index() -> Arc<Mutex<Index>> {
        Arc::new(Mutex::new(crate::index::tests::mk_index("10.96.0.0/28", "30000-30009")))
    }

    #[test]
    fn metrics_registered_in_a_shared_registry_keep_their_names_and_pool_gauges() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(registry.sub_registry_with_prefix(PREFIX));
        metrics.allocations.inc();
        metrics.repair("leak");
        metrics.observe_pools(mk_index());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for name in [
            "svcplane_webhook_allocations_total 1",
            "svcplane_webhook_repair_findings_total{type=\"leak\"} 1",
            "svcplane_webhook_pool_allocated{pool=\"10.96.0.0/28\"}",
            "svcplane_webhook_pool_available{pool=\"30000-30009\"} 10",
            "# TYPE svcplane_webhook_pool_allocated gauge",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(!metrics.has_own_registry());
        assert_eq!(metrics.encode(), "", "the shared registry's owner serves them");
    }

    #[test]
    fn standalone_metrics_encode_their_own_registry() {
        let metrics = Metrics::new();
        metrics.dry_runs.inc();
        metrics.observe_pools(mk_index());
        let text = metrics.encode();
        assert!(text.contains("svcplane_webhook_dry_runs_total 1"), "{text}");
        assert!(text.contains("svcplane_webhook_pool_available{pool=\"30000-30009\"} 10"), "{text}");
    }
}
