//! What a Service's `spec.selector` means, written once. Pure.
//!
//! kube-apiserver keeps `spec.selector` as a Go `map[string]string` tagged
//! `json:"selector,omitempty" protobuf:"bytes,2,rep"`. An empty map is omitted from
//! JSON, and in protobuf (k8s.io/api v0.37.2 `core/v1/generated.pb.go`)
//! `ServiceSpec.MarshalToSizedBuffer` writes entries only `if len(m.Selector) > 0`
//! while `Unmarshal` makes the map on the first entry: `selector: {}` is stored and
//! read back as nil (e2e `empty_selector_is_stored_as_no_selector`). The upstream
//! controllers therefore only ever see nil: `if service.Spec.Selector == nil` in
//! `endpointslice_controller.go` and `endpoints_controller.go` `syncService`, and
//! in `endpointslicemirroring_controller.go`. So absent and empty both mean "no
//! selector" here, for every consumer: the selector index, both planners,
//! mirroring, `explain` and the `NoReadyEndpoints` Event.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;

use crate::stored_pod::StoredPod;

/// The Service's selector, `None` when absent or empty (the two read the same
/// once stored, see the module doc).
pub fn service_selector(svc: &Service) -> Option<&BTreeMap<String, String>> {
    svc.spec.as_ref()?.selector.as_ref().filter(|selector| !selector.is_empty())
}

/// True for `type: ExternalName`: such a Service has no endpoints, selector or not.
pub fn is_external_name(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName")
}

/// True when the Service gets endpoints from Pods: it has a selector and is not
/// `ExternalName` (both upstream controllers' `syncService` return early otherwise).
pub fn is_selected(svc: &Service) -> bool {
    !is_external_name(svc) && service_selector(svc).is_some()
}

/// Each selector pair the labels do not satisfy: (key, wanted value, the label's
/// value or `None` when absent), in key order.
pub fn mismatches<'a>(
    selector: &'a BTreeMap<String, String>,
    labels: Option<&'a BTreeMap<String, String>>,
) -> impl Iterator<Item = (&'a str, &'a str, Option<&'a str>)> + 'a {
    selector.iter().filter_map(move |(key, wanted)| {
        let actual = labels.and_then(|l| l.get(key));
        (actual != Some(wanted)).then_some((key.as_str(), wanted.as_str(), actual.map(String::as_str)))
    })
}

/// Equality-based match (Go `labels.SelectorFromSet`): every pair is a label.
/// Callers pass [`service_selector`]'s result, so an empty selector never gets here.
pub fn matches(selector: &BTreeMap<String, String>, labels: Option<&BTreeMap<String, String>>) -> bool {
    let pairs = selector.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    matches_by(pairs, |key| labels.and_then(|l| l.get(key)).map(String::as_str))
}

/// [`matches`] for a selector and labels kept in other forms: the selector as
/// its (key, value) pairs, the labels read through `label` (a value by key).
pub fn matches_by<'s, 'l>(
    selector: impl IntoIterator<Item = (&'s str, &'s str)>,
    label: impl Fn(&str) -> Option<&'l str>,
) -> bool {
    selector.into_iter().all(|(key, wanted)| label(key) == Some(wanted))
}

/// The Pods this Service selects, deduplicated by namespace/name and sorted, so
/// the result does not depend on the order the shell passes them in.
pub fn selected_pods<'a>(svc: &Service, pods: &'a [Arc<StoredPod>]) -> Vec<&'a StoredPod> {
    let Some(selector) = service_selector(svc) else {
        return Vec::new();
    };
    let mut selected: Vec<&StoredPod> = pods
        .iter()
        .map(Arc::as_ref)
        .filter(|pod| pod.metadata.namespace == svc.metadata.namespace)
        .filter(|pod| matches(selector, pod.metadata.labels.as_ref()))
        .collect();
    selected.sort_by(|a, b| (&a.metadata.name, &a.metadata.uid).cmp(&(&b.metadata.name, &b.metadata.uid)));
    selected.dedup_by(|a, b| a.metadata.name == b.metadata.name);
    selected
}

/// `key=value` pairs joined by commas, as `kubectl get -o wide` shows a selector.
pub fn display(selector: &BTreeMap<String, String>) -> String {
    selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn svc(selector: Option<BTreeMap<String, String>>) -> Service {
        Service { spec: Some(ServiceSpec { selector, ..Default::default() }), ..Default::default() }
    }

    proptest::proptest! {
        /// `matches_by` reads the rule as `mismatches` does: a match is no mismatch.
        #[test]
        fn matching_through_a_lookup_agrees_with_the_mismatches(
            selector in proptest::collection::btree_map("[abc]", "[xy]", 1..3),
            labels in proptest::option::of(proptest::collection::btree_map("[abc]", "[xy]", 0..3)),
        ) {
            let pairs = selector.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            let by_lookup = matches_by(pairs, |k| labels.as_ref().and_then(|l| l.get(k)).map(String::as_str));
            proptest::prop_assert_eq!(by_lookup, mismatches(&selector, labels.as_ref()).next().is_none());
        }
    }

    #[test]
    fn an_absent_selector_is_no_selector() {
        // Upstream: Spec.Selector == nil, syncService returns early.
        assert_eq!(service_selector(&svc(None)), None);
        assert_eq!(service_selector(&Service::default()), None);
    }

    #[test]
    fn an_empty_selector_is_no_selector() {
        // Upstream never sees an empty map: it is stored and read back as nil.
        assert_eq!(service_selector(&svc(Some(BTreeMap::new()))), None);
    }

    #[test]
    fn one_pair_matches_a_pod_carrying_it_among_other_labels() {
        let selector = map(&[("app", "web")]);
        assert_eq!(service_selector(&svc(Some(selector.clone()))), Some(&selector));
        assert!(matches(&selector, Some(&map(&[("app", "web"), ("tier", "fe")]))));
    }

    #[test]
    fn several_pairs_all_must_match() {
        let selector = map(&[("app", "web"), ("tier", "fe")]);
        assert!(matches(&selector, Some(&map(&[("app", "web"), ("tier", "fe")]))));
        assert!(!matches(&selector, Some(&map(&[("app", "web")]))));
    }

    #[test]
    fn a_missing_label_does_not_match() {
        let selector = map(&[("app", "web")]);
        assert!(!matches(&selector, None));
        assert_eq!(
            mismatches(&selector, Some(&map(&[("x", "y")]))).collect::<Vec<_>>(),
            [("app", "web", None)]
        );
    }

    #[test]
    fn a_different_value_does_not_match() {
        let selector = map(&[("app", "web")]);
        let labels = map(&[("app", "db")]);
        assert!(!matches(&selector, Some(&labels)));
        assert_eq!(mismatches(&selector, Some(&labels)).collect::<Vec<_>>(), [("app", "web", Some("db"))]);
    }
}
