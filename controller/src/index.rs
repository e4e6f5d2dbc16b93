//! The selector index: which Services select which Pods, kept up to date from
//! watch events. Pure data structure, no client.
//!
//! Upstream matches every Pod event against every Service selector in the namespace
//! and scans the namespace's Pods on every Service sync, so its cost grows with the
//! namespace. Here each Service is indexed under ONE of its selector's label pairs
//! (the one with the fewest Services so far), and each Pod under all of its label
//! pairs, so:
//! - a Pod event costs the Services indexed under the Pod's own pairs, then a full
//!   selector check on each;
//! - a Service's members are kept as a set, so a sync reads exactly its Pods.
//!
//! The index remembers each Pod's last matches, so a Pod whose labels change is
//! reported to the Services it left as well as those it joined.
//!
//! The Service and Pod stores keep their objects packed (`crate::packed`), so
//! the index keeps copies of each Service's selector and each Pod's labels, as
//! sorted lists in one allocation each: a copied map of one or two labels would
//! cost a BTreeMap node of eleven entries, ~600 bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use crate::{name_set::NameSet, selector, stored_pod::StoredPod};

type Namespace = String;
type Name = String;
type Pair = (String, String);

/// Service ↔ Pod membership by label selector, per namespace.
#[derive(Debug, Default)]
pub struct SelectorIndex {
    namespaces: HashMap<Namespace, NamespaceIndex>,
}

#[derive(Debug, Default)]
struct NamespaceIndex {
    /// Service name → its selector (never empty) and the pair it is indexed under.
    services: HashMap<Name, (Labels, Pair)>,
    /// Label pair → Services indexed under it.
    services_by_pair: HashMap<Pair, HashSet<Name>>,
    /// Pod name → its labels.
    pods: HashMap<Name, Labels>,
    /// Label pair → Pods carrying it.
    pods_by_pair: HashMap<Pair, HashSet<Name>>,
    /// Service name → Pods it selects.
    members: HashMap<Name, NameSet>,
    /// Pod name → Services that select it.
    memberships: HashMap<Name, NameSet>,
}

fn labels_of(pod: &StoredPod) -> &BTreeMap<String, String> {
    static NONE: BTreeMap<String, String> = BTreeMap::new();
    pod.metadata.labels.as_ref().unwrap_or(&NONE)
}

/// A Pod's labels or a Service's selector as the index keeps them: pairs sorted
/// by key, in one allocation.
#[derive(Debug, Default, PartialEq, Eq)]
struct Labels(Box<[Pair]>);

impl Labels {
    fn of(labels: &BTreeMap<String, String>) -> Self {
        Labels(labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        let at = self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)).ok()?;
        Some(self.0[at].1.as_str())
    }

    fn is(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.len() == labels.len() && self.0.iter().zip(labels).all(|((k, v), (k2, v2))| k == k2 && v == v2)
    }

    fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// As a selector: whether it selects these Pod labels.
    fn selects(&self, labels: &Labels) -> bool {
        selector::matches_by(self.pairs(), |key| labels.get(key))
    }

    /// As a selector: whether it selects labels kept as a map.
    fn selects_map(&self, labels: &BTreeMap<String, String>) -> bool {
        selector::matches_by(self.pairs(), |key| labels.get(key).map(String::as_str))
    }
}

impl SelectorIndex {
    /// Records a Service's selector as [`selector::service_selector`] reads it
    /// (absent or empty: selects nothing). Returns nothing: the caller triggers the
    /// Service itself.
    pub fn upsert_service(&mut self, svc: &Service) {
        let (namespace, name) = (svc.metadata.namespace.as_deref().unwrap_or_default(), svc.name_any());
        let name = name.as_str();
        let ns = self.namespaces.entry(namespace.to_string()).or_default();
        let selector = selector::service_selector(svc);
        if let Some((old, _)) = ns.services.get(name)
            && selector.is_some_and(|selector| old.is(selector))
        {
            return;
        }
        ns.remove_service(name);
        let Some(selector) = selector else { return };
        let selector = Labels::of(selector);
        let pair = selector
            .0
            .iter()
            .min_by_key(|p| ns.services_by_pair.get(*p).map_or(0, HashSet::len))
            .cloned()
            .unwrap_or_default();
        ns.services_by_pair.entry(pair.clone()).or_default().insert(name.to_string());
        let members: NameSet = ns
            .pods_by_pair
            .get(&pair)
            .into_iter()
            .flatten()
            .filter(|pod| ns.pods.get(*pod).is_some_and(|labels| selector.selects(labels)))
            .cloned()
            .collect();
        for pod in &members {
            ns.memberships.entry(pod.clone()).or_default().insert(name);
        }
        ns.members.insert(name.to_string(), members);
        ns.services.insert(name.to_string(), (selector, pair));
    }

    /// Forgets a Service.
    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        if let Some(ns) = self.namespaces.get_mut(namespace) {
            ns.remove_service(name);
        }
    }

    /// Records a Pod (its labels); returns every Service whose membership the Pod
    /// was or is in (left, joined or stayed: a stayed Service must re-sync because
    /// the Pod's status may have changed).
    pub fn upsert_pod(&mut self, namespace: &str, name: &str, pod: &StoredPod) -> BTreeSet<String> {
        let labels = labels_of(pod);
        let ns = self.namespaces.entry(namespace.to_string()).or_default();
        let mut affected: BTreeSet<String> =
            ns.memberships.get(name).into_iter().flatten().cloned().collect();
        if !ns.pods.get(name).is_some_and(|old| old.is(labels)) {
            ns.remove_pod(name);
            for pair in labels.iter() {
                ns.pods_by_pair.entry((pair.0.clone(), pair.1.clone())).or_default().insert(name.to_string());
            }
            let mut joined = BTreeSet::new();
            for pair in labels.iter() {
                let Some(candidates) = ns.services_by_pair.get(&(pair.0.clone(), pair.1.clone())) else {
                    continue;
                };
                for svc in candidates {
                    if ns.services.get(svc).is_some_and(|(selector, _)| selector.selects_map(labels)) {
                        joined.insert(svc.clone());
                    }
                }
            }
            for svc in &joined {
                ns.members.entry(svc.clone()).or_default().insert(name);
            }
            ns.pods.insert(name.to_string(), Labels::of(labels));
            affected.extend(joined.iter().cloned());
            if !joined.is_empty() {
                ns.memberships.insert(name.to_string(), joined.into_iter().collect());
            }
        }
        affected
    }

    /// Forgets a Pod; returns the Services it was a member of.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> BTreeSet<String> {
        let Some(ns) = self.namespaces.get_mut(namespace) else { return BTreeSet::new() };
        let affected = ns.memberships.get(name).into_iter().flatten().cloned().collect();
        ns.remove_pod(name);
        affected
    }

    /// The Pods a Service selects, by name.
    pub fn members(&self, namespace: &str, service: &str) -> Vec<String> {
        self.namespaces
            .get(namespace)
            .and_then(|ns| ns.members.get(service))
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The Services that select a Pod, by name.
    pub fn services_of_pod(&self, namespace: &str, pod: &str) -> Vec<String> {
        self.namespaces
            .get(namespace)
            .and_then(|ns| ns.memberships.get(pod))
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl NamespaceIndex {
    fn remove_service(&mut self, name: &str) {
        if let Some((_, pair)) = self.services.remove(name)
            && let Some(set) = self.services_by_pair.get_mut(&pair)
        {
            set.remove(name);
            if set.is_empty() {
                self.services_by_pair.remove(&pair);
            }
        }
        for pod in self.members.remove(name).unwrap_or_default() {
            if let Some(set) = self.memberships.get_mut(&pod) {
                set.remove(name);
                if set.is_empty() {
                    self.memberships.remove(&pod);
                }
            }
        }
    }

    fn remove_pod(&mut self, name: &str) {
        if let Some(labels) = self.pods.remove(name) {
            for pair in labels.0.iter() {
                if let Some(set) = self.pods_by_pair.get_mut(pair) {
                    set.remove(name);
                    if set.is_empty() {
                        self.pods_by_pair.remove(pair);
                    }
                }
            }
        }
        for svc in self.memberships.remove(name).unwrap_or_default() {
            if let Some(set) = self.members.get_mut(&svc) {
                set.remove(name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
        selector::matches(selector, Some(labels))
    }

    fn mk_service(namespace: &str, name: &str, selector: Option<&BTreeMap<String, String>>) -> Arc<Service> {
        let mut svc = Service::default();
        svc.metadata.namespace = Some(namespace.to_owned());
        svc.metadata.name = Some(name.to_owned());
        svc.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            selector: selector.cloned(),
            ..Default::default()
        });
        Arc::new(svc)
    }

    fn l(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn pod(labels: Option<&BTreeMap<String, String>>) -> Arc<StoredPod> {
        let mut pod = StoredPod::default();
        pod.metadata.labels = labels.cloned();
        Arc::new(pod)
    }

    #[test]
    fn pod_joins_matching_service_and_leaves_on_label_change() {
        let mut idx = SelectorIndex::default();
        idx.upsert_service(&mk_service("ns", "web", Some(&l(&[("app", "web")]))));
        let affected = idx.upsert_pod("ns", "p1", &pod(Some(&l(&[("app", "web"), ("tier", "fe")]))));
        assert_eq!(affected, BTreeSet::from(["web".to_string()]));
        assert_eq!(idx.members("ns", "web"), vec!["p1"]);
        let affected = idx.upsert_pod("ns", "p1", &pod(Some(&l(&[("app", "db")]))));
        assert_eq!(affected, BTreeSet::from(["web".to_string()]), "the Service it left is reported");
        assert!(idx.members("ns", "web").is_empty());
    }

    #[test]
    fn service_added_after_pods_finds_them_and_other_namespaces_are_ignored() {
        let mut idx = SelectorIndex::default();
        idx.upsert_pod("ns", "a", &pod(Some(&l(&[("app", "x"), ("v", "1")]))));
        idx.upsert_pod("ns", "b", &pod(Some(&l(&[("app", "x"), ("v", "2")]))));
        idx.upsert_pod("other", "c", &pod(Some(&l(&[("app", "x"), ("v", "1")]))));
        idx.upsert_service(&mk_service("ns", "svc", Some(&l(&[("app", "x"), ("v", "1")]))));
        assert_eq!(idx.members("ns", "svc"), vec!["a"]);
        idx.upsert_service(&mk_service("ns", "svc", Some(&l(&[("app", "x")]))));
        assert_eq!(idx.members("ns", "svc"), vec!["a", "b"]);
        idx.upsert_service(&mk_service("ns", "svc", None));
        assert!(idx.members("ns", "svc").is_empty());
        assert!(idx.services_of_pod("ns", "a").is_empty());
    }

    #[test]
    fn empty_selector_selects_nothing() {
        let mut idx = SelectorIndex::default();
        idx.upsert_service(&mk_service("ns", "s", Some(&BTreeMap::new())));
        assert!(idx.upsert_pod("ns", "p", &pod(Some(&l(&[("a", "b")])))).is_empty());
        assert!(idx.members("ns", "s").is_empty());
    }

    #[test]
    fn deleted_pod_reports_its_services() {
        let mut idx = SelectorIndex::default();
        idx.upsert_service(&mk_service("ns", "s1", Some(&l(&[("app", "x")]))));
        idx.upsert_service(&mk_service("ns", "s2", Some(&l(&[("tier", "fe")]))));
        idx.upsert_pod("ns", "p", &pod(Some(&l(&[("app", "x"), ("tier", "fe")]))));
        assert_eq!(idx.remove_pod("ns", "p"), BTreeSet::from(["s1".to_string(), "s2".to_string()]));
        assert!(idx.members("ns", "s1").is_empty());
    }

    #[test]
    fn the_index_holds_copies_of_selectors_and_labels_only() {
        let mut idx = SelectorIndex::default();
        let svc = mk_service("ns", "web", Some(&l(&[("app", "web"), ("tier", "fe")])));
        let pod = pod(Some(&l(&[("app", "web"), ("tier", "fe"), ("v", "2")])));
        idx.upsert_service(&svc);
        idx.upsert_pod("ns", "p", &pod);
        assert_eq!((Arc::strong_count(&svc), Arc::strong_count(&pod)), (1, 1), "neither object held");
        let ns = &idx.namespaces["ns"];
        assert_eq!(ns.services["web"].0, Labels::of(&l(&[("app", "web"), ("tier", "fe")])));
        assert_eq!(ns.pods["p"], Labels::of(&l(&[("app", "web"), ("tier", "fe"), ("v", "2")])));
        idx.upsert_service(&mk_service("ns", "web", Some(&l(&[("app", "web")]))));
        assert_eq!(
            idx.namespaces["ns"].services["web"].0,
            Labels::of(&l(&[("app", "web")])),
            "the new selector"
        );
        idx.remove_service("ns", "web");
        assert!(idx.namespaces["ns"].services.is_empty(), "forgotten");
    }

    #[test]
    fn kept_labels_read_as_the_map_they_were_copied_from() {
        let map = l(&[("app", "web"), ("tier", "fe"), ("v", "2")]);
        let kept = Labels::of(&map);
        assert!(kept.is(&map));
        assert!(!kept.is(&l(&[("app", "web"), ("tier", "fe")])));
        assert!(!kept.is(&l(&[("app", "web"), ("tier", "be"), ("v", "2")])));
        assert_eq!((kept.get("tier"), kept.get("zone")), (Some("fe"), None));
        assert!(Labels::of(&l(&[("tier", "fe"), ("app", "web")])).selects(&kept));
        assert!(!Labels::of(&l(&[("tier", "fe"), ("zone", "a")])).selects(&kept));
        assert!(Labels::of(&l(&[("tier", "fe")])).selects_map(&map));
        assert!(!Labels::of(&l(&[("tier", "be")])).selects_map(&map));
    }

    fn arb_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map("[abc]", "[xy]", 0..3)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Svc(usize, Option<BTreeMap<String, String>>),
        Pod(usize, Option<BTreeMap<String, String>>),
    }

    proptest! {
        /// After any sequence of Service and Pod changes, membership equals a brute
        /// force match of every selector against every Pod.
        #[test]
        fn index_agrees_with_brute_force(ops in proptest::collection::vec(
            prop_oneof![
                (0usize..4, proptest::option::of(arb_labels())).prop_map(|(i, s)| Op::Svc(i, s)),
                (0usize..6, proptest::option::of(arb_labels())).prop_map(|(i, s)| Op::Pod(i, s)),
            ], 0..40)) {
            let mut idx = SelectorIndex::default();
            let mut svcs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
            let mut pods: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Svc(i, sel) => {
                        let name = format!("s{i}");
                        idx.upsert_service(&mk_service("ns", &name, sel.as_ref()));
                        match sel { Some(s) if !s.is_empty() => { svcs.insert(name, s); } _ => { svcs.remove(&name); } }
                    }
                    Op::Pod(i, Some(labels)) => {
                        let name = format!("p{i}");
                        let before: BTreeSet<String> = svcs.iter()
                            .filter(|(_, s)| pods.get(&name).is_some_and(|l| selects(s, l)))
                            .map(|(n, _)| n.clone()).collect();
                        let affected = idx.upsert_pod("ns", &name, &pod(Some(&labels)));
                        let after: BTreeSet<String> = svcs.iter()
                            .filter(|(_, s)| selects(s, &labels)).map(|(n, _)| n.clone()).collect();
                        prop_assert_eq!(affected, before.union(&after).cloned().collect::<BTreeSet<_>>());
                        pods.insert(name, labels);
                    }
                    Op::Pod(i, None) => {
                        let name = format!("p{i}");
                        idx.remove_pod("ns", &name);
                        pods.remove(&name);
                    }
                }
            }
            for (svc, sel) in &svcs {
                let expected: Vec<String> = pods.iter().filter(|(_, l)| selects(sel, l)).map(|(n, _)| n.clone()).collect();
                prop_assert_eq!(idx.members("ns", svc), expected);
            }
        }
    }
}
