//! The webhook's Prometheus metrics: one registry with the `svcplane_webhook`
//! prefix; pool usage is read from the index at scrape time.
//!
//! No API calls.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::index::Index;
use crate::store::lock;

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
    /// `leak`, `adopted`, `duplicate`, `outOfRange`, `error`.
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
    registry: Mutex<Registry>,
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
    /// Repair findings by type.
    pub repairs: Family<RepairLabels, Counter>,
    used: Family<PoolLabels, Gauge>,
    free: Family<PoolLabels, Gauge>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("svcplane_webhook");
        let metrics = Self {
            registry: Mutex::new(Registry::default()),
            admissions: Family::default(),
            admission_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            allocations: Counter::default(),
            claim_conflicts: Counter::default(),
            dry_runs: Counter::default(),
            repairs: Family::default(),
            used: Family::default(),
            free: Family::default(),
        };
        registry.register(
            "admission_requests",
            "Admission calls by webhook and result",
            metrics.admissions.clone(),
        );
        registry.register(
            "admission_duration_seconds",
            "Server-side admission latency",
            metrics.admission_seconds.clone(),
        );
        registry.register("allocations", "Claims created", metrics.allocations.clone());
        registry.register("claim_conflicts", "Picks that lost a claim race", metrics.claim_conflicts.clone());
        registry.register(
            "dry_runs",
            "Dry-run requests answered without reserving",
            metrics.dry_runs.clone(),
        );
        registry.register("repair_findings", "Repair findings by type", metrics.repairs.clone());
        registry.register("pool_allocated", "Values taken in each pool", metrics.used.clone());
        registry.register("pool_available", "Values free in each pool", metrics.free.clone());
        if let Ok(mut slot) = metrics.registry.lock() {
            *slot = registry;
        }
        metrics
    }

    /// Counts a repair finding.
    pub fn repair(&self, kind: &str) {
        self.repairs.get_or_create(&RepairLabels { r#type: kind.to_owned() }).inc();
    }

    /// The text exposition, with pool gauges read from `index` now.
    pub fn encode(&self, index: Option<&Arc<Mutex<Index>>>) -> String {
        if let Some(index) = index {
            for usage in lock(index).usage() {
                let labels = PoolLabels { pool: usage.pool };
                self.used.get_or_create(&labels).set(usage.used as i64);
                self.free.get_or_create(&labels).set(usage.free as i64);
            }
        }
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
