//! What the EndpointSlice planner reads from Nodes: each Pod's Node (existence and
//! zone), and for `topology-mode: Auto` the share of allocatable CPU per zone.
//! Pure.
//!
//! Upstream: the Node lister of `reconciler.go`, and `TopologyCache.SetNodes` in
//! `k8s.io/endpointslice/topologycache`. [`ZoneCpu`] keeps SetNodes' sums
//! incrementally, so a Node event costs O(zones), not a walk over every Node.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;

use crate::quantity::milli_value;

/// `topology.kubernetes.io/zone`.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Node role labels whose Nodes the topology cache ignores (upstream `hasExcludedLabels`).
pub const EXCLUDED_ROLE_LABELS: [&str; 2] =
    ["node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master"];

/// What the planner needs to know about a Node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The `topology.kubernetes.io/zone` label, if set.
    pub zone: Option<String>,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// `status.allocatable.cpu` in millicores (0 when absent).
    pub allocatable_milli_cpu: u64,
    /// Carries a control-plane role label: left out of the CPU shares.
    pub control_plane: bool,
}

impl NodeInfo {
    /// Reads a Node (trimmed by [`crate::trim::trim_node`] or not).
    pub fn of(node: &Node) -> Self {
        let labels = node.metadata.labels.as_ref();
        let status = node.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let allocatable_milli_cpu = status
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get("cpu"))
            .and_then(|q| milli_value(&q.0))
            .unwrap_or(0);
        NodeInfo {
            zone: labels.and_then(|l| l.get(ZONE_LABEL)).cloned(),
            ready,
            allocatable_milli_cpu,
            control_plane: labels.is_some_and(|l| EXCLUDED_ROLE_LABELS.iter().any(|k| l.contains_key(*k))),
        }
    }

    /// Upstream `SetNodes` reads only ready Nodes without an excluded role label.
    fn counts_for_topology(&self) -> bool {
        self.ready && !self.control_plane
    }
}

/// Share of the cluster's allocatable CPU per zone, over the Nodes that count
/// (values sum to 1).
pub type ZoneShares = BTreeMap<String, f64>;

/// Looks Nodes up by name; `None` means the Node does not exist (NotFound).
pub trait NodeLookup {
    /// The Node called `name`, if it exists.
    fn node(&self, name: &str) -> Option<NodeInfo>;

    /// CPU share per zone for topology hints; `None` when upstream's topology
    /// cache would have insufficient Node information.
    fn zone_shares(&self) -> Option<Arc<ZoneShares>>;
}

impl NodeLookup for BTreeMap<String, NodeInfo> {
    fn node(&self, name: &str) -> Option<NodeInfo> {
        self.get(name).cloned()
    }

    fn zone_shares(&self) -> Option<Arc<ZoneShares>> {
        let mut cpu = ZoneCpu::default();
        self.values().for_each(|node| cpu.add(node));
        cpu.shares().map(Arc::new)
    }
}

/// Upstream `SetNodes`' sums, kept as Nodes come and go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneCpu {
    /// Millicores of counting Nodes, per zone (zones with a Node only).
    by_zone: BTreeMap<String, (u64, usize)>,
    /// Counting Nodes without a zone or without CPU: any one of them makes the
    /// information insufficient.
    incomplete: usize,
}

impl ZoneCpu {
    /// Adds a Node.
    pub fn add(&mut self, node: &NodeInfo) {
        match Self::contribution(node) {
            None => {}
            Some(None) => self.incomplete += 1,
            Some(Some((zone, cpu))) => {
                let entry = self.by_zone.entry(zone.to_owned()).or_default();
                entry.0 = entry.0.saturating_add(cpu);
                entry.1 += 1;
            }
        }
    }

    /// Removes a Node added before, as it was then.
    pub fn remove(&mut self, node: &NodeInfo) {
        match Self::contribution(node) {
            None => {}
            Some(None) => self.incomplete = self.incomplete.saturating_sub(1),
            Some(Some((zone, cpu))) => {
                if let Some(entry) = self.by_zone.get_mut(zone) {
                    entry.0 = entry.0.saturating_sub(cpu);
                    entry.1 = entry.1.saturating_sub(1);
                    if entry.1 == 0 {
                        self.by_zone.remove(zone);
                    }
                }
            }
        }
    }

    /// `None`: the Node does not count; `Some(None)`: it counts but lacks a zone
    /// or CPU; otherwise its zone and millicores.
    fn contribution(node: &NodeInfo) -> Option<Option<(&str, u64)>> {
        if !node.counts_for_topology() {
            return None;
        }
        let zone = node.zone.as_deref().filter(|z| !z.is_empty());
        Some(zone.filter(|_| node.allocatable_milli_cpu > 0).map(|z| (z, node.allocatable_milli_cpu)))
    }

    /// Upstream's `cpuRatiosByZone`: `None` (insufficient Node information) when
    /// a counting Node lacks a zone or CPU, when no CPU is known at all, or when
    /// fewer than two zones have some.
    pub fn shares(&self) -> Option<ZoneShares> {
        let total: u64 = self.by_zone.values().map(|(cpu, _)| cpu).sum();
        if self.incomplete > 0 || total == 0 || self.by_zone.len() < 2 {
            return None;
        }
        Some(self.by_zone.iter().map(|(zone, (cpu, _))| (zone.clone(), *cpu as f64 / total as f64)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(zone: Option<&str>, milli_cpu: u64) -> NodeInfo {
        NodeInfo {
            zone: zone.map(Into::into),
            ready: true,
            allocatable_milli_cpu: milli_cpu,
            control_plane: false,
        }
    }

    #[test]
    fn shares_are_allocatable_cpu_per_zone_over_ready_worker_nodes() {
        let mut cpu = ZoneCpu::default();
        cpu.add(&node(Some("a"), 3000));
        cpu.add(&node(Some("b"), 1000));
        cpu.add(&NodeInfo { ready: false, ..node(Some("b"), 4000) });
        cpu.add(&NodeInfo { control_plane: true, ..node(None, 0) });
        assert_eq!(cpu.shares(), Some(BTreeMap::from([("a".into(), 0.75), ("b".into(), 0.25)])));
    }

    #[test]
    fn one_ready_node_without_zone_or_cpu_makes_the_information_insufficient() {
        let mut cpu = ZoneCpu::default();
        cpu.add(&node(Some("a"), 1000));
        cpu.add(&node(Some("b"), 1000));
        for incomplete in [node(None, 1000), node(Some(""), 1000), node(Some("c"), 0)] {
            cpu.add(&incomplete);
            assert_eq!(cpu.shares(), None, "{incomplete:?}");
            cpu.remove(&incomplete);
            assert!(cpu.shares().is_some(), "removing {incomplete:?} restores the shares");
        }
    }

    #[test]
    fn one_zone_is_insufficient() {
        let mut cpu = ZoneCpu::default();
        let (a1, a2) = (node(Some("a"), 1000), node(Some("a"), 2000));
        cpu.add(&a1);
        cpu.add(&a2);
        assert_eq!(cpu.shares(), None);
        let b = node(Some("b"), 1000);
        cpu.add(&b);
        cpu.remove(&a1);
        assert_eq!(cpu.shares(), Some(BTreeMap::from([("a".into(), 2.0 / 3.0), ("b".into(), 1.0 / 3.0)])));
        cpu.remove(&b);
        assert_eq!(cpu.shares(), None);
    }

    #[test]
    fn a_node_reads_zone_readiness_cpu_and_role() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "labels": {ZONE_LABEL: "z", "node-role.kubernetes.io/control-plane": ""}},
            "status": {"allocatable": {"cpu": "3500m"}, "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        let info = NodeInfo::of(&node);
        assert_eq!(
            info,
            NodeInfo {
                zone: Some("z".into()),
                ready: true,
                allocatable_milli_cpu: 3500,
                control_plane: true
            }
        );
    }
}
