//! The Node index: the Nodes as the EndpointSlice planner reads them, the CPU
//! share per zone kept up to date, and which Pods run on which Node, so that a
//! Node event reaches the Services of exactly the Pods on it. Pure data
//! structure, no client.
//!
//! Upstream re-syncs no Service when a Node changes, except those whose
//! topology hints overload a zone; a Node relabelled to another zone, or deleted
//! and created again under running Pods, leaves stale endpoints
//! (kubernetes#123401, #114215, #122437). svcplane follows those changes at a
//! cost proportional to the Pods on the Node.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::endpointslice::{NodeInfo, NodeLookup, ZoneCpu, ZoneShares};

type PodKey = (String, String);

/// Nodes, their Pods, and the CPU share per zone.
#[derive(Debug, Default)]
pub struct NodeIndex {
    /// Node name → what the planner reads of it.
    nodes: HashMap<String, NodeInfo>,
    /// The sums behind `shares`.
    zone_cpu: ZoneCpu,
    /// CPU share per zone as of the last Node change.
    shares: Option<Arc<ZoneShares>>,
    /// Node name → (namespace, Pod name) of the Pods bound to it.
    pods_by_node: HashMap<Arc<str>, BTreeSet<PodKey>>,
    /// (namespace, Pod name) → its Node: the key of `pods_by_node`, shared, not
    /// a copy of the name per Pod.
    node_of_pod: HashMap<PodKey, Arc<str>>,
}

/// What a Node event means for the planners.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NodeChange {
    /// The Pods on the Node, (namespace, name), when what their endpoints read
    /// of it changed: it appeared, disappeared, or changed zone.
    pub pods: Vec<PodKey>,
    /// The CPU share per zone changed: every `topology-mode: Auto` Service
    /// must be planned again.
    pub shares_changed: bool,
}

impl NodeIndex {
    /// Records the Node a Pod is bound to (`None`: not scheduled yet).
    pub fn upsert_pod(&mut self, namespace: &str, name: &str, node: Option<&str>) {
        let key = (namespace.to_owned(), name.to_owned());
        let node = node.filter(|n| !n.is_empty());
        if self.node_of_pod.get(&key).map(AsRef::as_ref) == node {
            return;
        }
        self.remove_pod(namespace, name);
        if let Some(node) = node {
            let node = match self.pods_by_node.get_key_value(node) {
                Some((shared, _)) => Arc::clone(shared),
                None => Arc::from(node),
            };
            self.pods_by_node.entry(Arc::clone(&node)).or_default().insert(key.clone());
            self.node_of_pod.insert(key, node);
        }
    }

    /// Forgets a Pod.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(node) = self.node_of_pod.remove(&key) else { return };
        if let Some(pods) = self.pods_by_node.get_mut(&node) {
            pods.remove(&key);
            if pods.is_empty() {
                self.pods_by_node.remove(&node);
            }
        }
    }

    /// Records a Node created or changed. A change the planners do not read (a
    /// status heartbeat, another label) reports nothing.
    pub fn upsert_node(&mut self, name: &str, info: NodeInfo) -> NodeChange {
        let old = self.nodes.insert(name.to_owned(), info.clone());
        let pods_changed = old.as_ref().is_none_or(|old| old.zone != info.zone);
        if let Some(old) = &old {
            self.zone_cpu.remove(old);
        }
        self.zone_cpu.add(&info);
        self.change(name, pods_changed)
    }

    /// Forgets a deleted Node.
    pub fn remove_node(&mut self, name: &str) -> NodeChange {
        let Some(old) = self.nodes.remove(name) else { return NodeChange::default() };
        self.zone_cpu.remove(&old);
        self.change(name, true)
    }

    fn change(&mut self, name: &str, pods_changed: bool) -> NodeChange {
        let shares = self.zone_cpu.shares().map(Arc::new);
        let shares_changed = shares != self.shares;
        self.shares = shares;
        let pods = if pods_changed {
            self.pods_by_node.get(name).map(|pods| pods.iter().cloned().collect()).unwrap_or_default()
        } else {
            Vec::new()
        };
        NodeChange { pods, shares_changed }
    }
}

impl NodeLookup for NodeIndex {
    fn node(&self, name: &str) -> Option<NodeInfo> {
        self.nodes.get(name).cloned()
    }

    fn zone_shares(&self) -> Option<Arc<ZoneShares>> {
        self.shares.clone()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn node(zone: &str, ready: bool, milli_cpu: u64) -> NodeInfo {
        NodeInfo { zone: Some(zone.into()), ready, allocatable_milli_cpu: milli_cpu, control_plane: false }
    }

    fn pods(keys: &[(&str, &str)]) -> Vec<PodKey> {
        keys.iter().map(|(ns, n)| (ns.to_string(), n.to_string())).collect()
    }

    #[test]
    fn the_pods_of_a_node_share_one_copy_of_its_name() {
        let mut index = NodeIndex::default();
        index.upsert_pod("ns", "a", Some("node-1"));
        index.upsert_pod("ns", "b", Some("node-1"));
        let node_of = |pod: &str| Arc::clone(&index.node_of_pod[&("ns".to_string(), pod.to_string())]);
        assert!(Arc::ptr_eq(&node_of("a"), &node_of("b")));
        let (key, _) = index.pods_by_node.get_key_value("node-1").expect("node-1 indexed");
        assert!(Arc::ptr_eq(key, &node_of("a")));
    }

    #[test]
    fn a_zone_change_reports_exactly_the_pods_on_that_node() {
        let mut index = NodeIndex::default();
        index.upsert_node("n1", node("a", true, 1000));
        index.upsert_node("n2", node("b", true, 1000));
        index.upsert_pod("ns", "p1", Some("n1"));
        index.upsert_pod("other", "p2", Some("n1"));
        index.upsert_pod("ns", "p3", Some("n2"));
        index.upsert_pod("ns", "pending", None);
        let change = index.upsert_node("n1", node("c", true, 1000));
        assert_eq!(change.pods, pods(&[("ns", "p1"), ("other", "p2")]));
        assert!(change.shares_changed, "zone a gave way to zone c");
        assert_eq!(index.node("n1").and_then(|n| n.zone).as_deref(), Some("c"));
    }

    #[test]
    fn a_heartbeat_or_an_unread_change_reports_nothing() {
        let mut index = NodeIndex::default();
        index.upsert_node("n1", node("a", true, 1000));
        index.upsert_pod("ns", "p1", Some("n1"));
        assert_eq!(index.upsert_node("n1", node("a", true, 1000)), NodeChange::default());
    }

    #[test]
    fn deleting_and_creating_a_node_reports_its_pods_both_times() {
        let mut index = NodeIndex::default();
        index.upsert_node("n1", node("a", true, 1000));
        index.upsert_pod("ns", "p1", Some("n1"));
        assert_eq!(index.remove_node("n1").pods, pods(&[("ns", "p1")]));
        assert_eq!(index.node("n1"), None);
        assert_eq!(index.upsert_node("n1", node("a", true, 1000)).pods, pods(&[("ns", "p1")]));
        assert_eq!(index.remove_node("never"), NodeChange::default());
    }

    #[test]
    fn readiness_and_cpu_change_the_shares_but_not_the_pods() {
        let mut index = NodeIndex::default();
        index.upsert_node("n1", node("a", true, 1000));
        index.upsert_node("n2", node("b", true, 1000));
        index.upsert_pod("ns", "p1", Some("n1"));
        assert!(index.zone_shares().is_some());
        let change = index.upsert_node("n2", node("b", false, 1000));
        assert_eq!(change, NodeChange { pods: vec![], shares_changed: true });
        assert_eq!(index.zone_shares(), None, "one ready zone left");
        index.upsert_node("n2", node("b", true, 1000));
        let change = index.upsert_node("n2", node("b", true, 3000));
        assert_eq!(change, NodeChange { pods: vec![], shares_changed: true });
        assert_eq!(index.zone_shares().map(|s| s["b"]), Some(0.75));
    }

    #[test]
    fn a_pod_moves_between_nodes_and_is_forgotten() {
        let mut index = NodeIndex::default();
        index.upsert_node("n1", node("a", true, 1000));
        index.upsert_node("n2", node("a", true, 1000));
        index.upsert_pod("ns", "p", None);
        index.upsert_pod("ns", "p", Some("n1"));
        index.upsert_pod("ns", "p", Some("n2"));
        assert!(index.remove_node("n1").pods.is_empty());
        index.remove_pod("ns", "p");
        assert!(index.remove_node("n2").pods.is_empty());
    }

    proptest! {
        /// Incremental shares equal shares computed from scratch after any
        /// sequence of Node changes.
        #[test]
        fn shares_agree_with_a_full_recount(ops in proptest::collection::vec(
            (0usize..4, proptest::option::of((0usize..3, any::<bool>(), 0u64..3, any::<bool>()))), 0..30)) {
            let mut index = NodeIndex::default();
            let mut nodes = std::collections::BTreeMap::new();
            for (i, op) in ops {
                let name = format!("n{i}");
                match op {
                    Some((zone, ready, cpu, control_plane)) => {
                        let info = NodeInfo {
                            zone: (zone > 0).then(|| format!("z{zone}")),
                            ready,
                            allocatable_milli_cpu: cpu * 500,
                            control_plane,
                        };
                        index.upsert_node(&name, info.clone());
                        nodes.insert(name, info);
                    }
                    None => {
                        index.remove_node(&name);
                        nodes.remove(&name);
                    }
                }
            }
            prop_assert_eq!(index.zone_shares(), nodes.zone_shares());
        }
    }
}
