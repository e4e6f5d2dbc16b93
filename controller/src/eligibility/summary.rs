//! The note of the `NoReadyEndpoints` Event: how many Pods a Service's selector
//! matches and why none is a ready endpoint, in [`super::for_slices`]'s words.
//! Pure.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;

use super::{Eligibility, Exclusion, for_slices, pod_node};
use crate::endpointslice::NodeLookup;
use crate::pod::PortError;
use crate::selector;
use crate::stored_pod::StoredPod;

/// Most distinct reasons a note names; the rest are counted together.
const MAX_REASONS: usize = 5;

/// The apiserver refuses an Event note longer than this (`NoteLengthLimit`).
const NOTE_LIMIT: usize = 1024;

/// A Service's ready endpoints and, for the others, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadySummary {
    /// Pods that are ready endpoints on some port ([`Eligibility::serves`]).
    pub ready: usize,
    /// E.g. `selector app=web matches 3 Pods: 2 not ready, 1 has no container
    /// port named "http"`; the ready Pods are not listed.
    pub note: String,
}

/// Summarises the EndpointSlice view of `svc` over `pods` (those of another
/// namespace or not matched are ignored). `None` for a Service without selector
/// or of type ExternalName: it has no Pod endpoints to miss.
pub fn summarize(svc: &Service, pods: &[Arc<StoredPod>], nodes: &impl NodeLookup) -> Option<ReadySummary> {
    let selector = selector::service_selector(svc).filter(|_| selector::is_selected(svc))?;
    let matched = selector::selected_pods(svc, pods);
    let mut ready = 0;
    // (phrase for one Pod, for several, count), in first-seen order.
    let mut why: Vec<(String, String, usize)> = Vec::new();
    for pod in &matched {
        let verdict = for_slices(svc, pod, pod_node(pod, nodes).is_some());
        if verdict.serves() {
            ready += 1;
            continue;
        }
        let (one, many) = phrase(&verdict);
        match why.iter_mut().find(|(o, _, _)| *o == one) {
            Some(entry) => entry.2 += 1,
            None => why.push((one, many, 1)),
        }
    }
    why.sort_by_key(|entry| std::cmp::Reverse(entry.2));
    let selector = selector::display(selector);
    let mut note = match matched.len() {
        0 => format!("selector {selector} matches no Pods"),
        n => {
            let others: usize = why.iter().skip(MAX_REASONS).map(|(_, _, count)| count).sum();
            let mut reasons: Vec<String> = why
                .into_iter()
                .take(MAX_REASONS)
                .map(|(one, many, count)| format!("{count} {}", if count == 1 { one } else { many }))
                .collect();
            if others > 0 {
                reasons.push(format!("{others} for other reasons"));
            }
            let pods = if n == 1 { "Pod" } else { "Pods" };
            format!("selector {selector} matches {n} {pods}: {}", reasons.join(", "))
        }
    };
    if note.len() > NOTE_LIMIT {
        let mut end = NOTE_LIMIT - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    Some(ReadySummary { ready, note })
}

/// Why a Pod is not a ready endpoint, for one Pod and for several: the first
/// reason that drops it, else not ready (or terminating), else its first port.
fn phrase(verdict: &Eligibility) -> (String, String) {
    let reasons = &verdict.reasons;
    let reason = reasons
        .iter()
        .find(|r| r.drops_pod())
        .or_else(|| reasons.iter().find(|r| **r == Exclusion::NotReady))
        .or_else(|| reasons.iter().find(|r| matches!(r, Exclusion::PortNotFound { .. })));
    let verb = |is: bool, what: String| {
        let (one, many) = if is { ("is", "are") } else { ("has", "have") };
        (format!("{one} {what}"), format!("{many} {what}"))
    };
    match reason {
        Some(Exclusion::NotReady) if verdict.conditions.terminating => {
            ("terminating".into(), "terminating".into())
        }
        None | Some(Exclusion::NotReady) => ("not ready".into(), "not ready".into()),
        Some(Exclusion::Terminal { phase }) => verb(true, phase.clone()),
        Some(Exclusion::NoIp) => verb(false, "no IP".into()),
        Some(Exclusion::NodeMissing { node }) if node.is_empty() => verb(true, "not scheduled".into()),
        Some(Exclusion::NodeMissing { node }) => verb(true, format!("on missing Node {node:?}")),
        Some(Exclusion::PortNotFound { error: PortError::NamedPortNotFound { name, .. }, .. }) => {
            verb(false, format!("no container port named {name:?}"))
        }
        Some(Exclusion::NoUsableIp) => verb(false, "no IP of the Service's families".into()),
        // Selection reasons: not reached for matched Pods.
        Some(other) => (other.to_string(), other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::*;
    use crate::endpointslice::NodeInfo;
    use crate::test_pods::{web_pod, web_service};

    fn note(svc: &Service, pods: Vec<StoredPod>) -> ReadySummary {
        let nodes = BTreeMap::from([("node-1".to_owned(), NodeInfo::default())]);
        let pods: Vec<Arc<StoredPod>> = pods.into_iter().map(Arc::new).collect();
        summarize(svc, &pods, &nodes).expect("a selector Service")
    }

    fn not_ready(name: &str) -> StoredPod {
        let mut pod = web_pod(name, &["10.0.0.1"]);
        pod.status.as_mut().unwrap().conditions = None;
        pod
    }

    #[test]
    fn no_matching_pods() {
        let svc = web_service(IntOrString::String("http".into()), "TCP");
        let mut other = web_pod("db", &["10.0.0.9"]);
        other.metadata.labels = Some(BTreeMap::from([("app".into(), "db".into())]));
        let got = note(&svc, vec![other]);
        assert_eq!((got.ready, got.note.as_str()), (0, "selector app=web matches no Pods"));
    }

    #[test]
    fn reasons_are_counted_most_common_first() {
        let svc = web_service(IntOrString::String("http".into()), "TCP");
        let mut no_port = web_pod("c", &["10.0.0.3"]);
        no_port.spec.as_mut().unwrap().containers[0].ports = None;
        let got = note(&svc, vec![no_port, not_ready("a"), not_ready("b")]);
        assert_eq!(got.ready, 0);
        assert_eq!(
            got.note,
            r#"selector app=web matches 3 Pods: 2 not ready, 1 has no container port named "http""#
        );
    }

    #[test]
    fn several_pods_have_and_are() {
        let svc = web_service(IntOrString::Int(8080), "TCP");
        let (mut failed, mut gone) = (web_pod("a", &["10.0.0.1"]), web_pod("b", &["10.0.0.2"]));
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        gone.spec.as_mut().unwrap().node_name = Some("node-9".into());
        let mut terminating = web_pod("c", &["10.0.0.3"]);
        terminating.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let ipless = [web_pod("d", &[]), web_pod("e", &[])];
        let pods =
            [vec![failed, gone, terminating, web_pod("f", &["fd00::1"]), not_ready("g")], ipless.to_vec()];
        assert_eq!(
            note(&svc, pods.concat()).note,
            "selector app=web matches 7 Pods: 2 have no IP, 1 is Failed, 1 is on missing Node \"node-9\", \
             1 terminating, 1 has no IP of the Service's families, 1 for other reasons"
        );
    }

    #[test]
    fn a_long_note_is_cut_to_what_the_apiserver_accepts() {
        let mut svc = web_service(IntOrString::Int(8080), "TCP");
        let long = "v".repeat(60);
        let selector = (0..20).map(|i| (format!("k{i}"), long.clone())).collect::<BTreeMap<_, _>>();
        svc.spec.as_mut().unwrap().selector = Some(selector);
        let got = summarize(&svc, &[], &BTreeMap::<String, NodeInfo>::new()).unwrap();
        assert_eq!(got.note.len(), NOTE_LIMIT);
        assert!(got.note.ends_with("..."));
    }

    #[test]
    fn ready_pods_are_counted_and_selectorless_services_have_no_summary() {
        let mut svc = web_service(IntOrString::Int(8080), "TCP");
        let got = note(&svc, vec![web_pod("a", &["10.0.0.1"]), not_ready("b")]);
        assert_eq!((got.ready, got.note.as_str()), (1, "selector app=web matches 2 Pods: 1 not ready"));
        svc.spec.as_mut().unwrap().selector = None;
        assert_eq!(summarize(&svc, &[], &BTreeMap::<String, NodeInfo>::new()), None);
    }
}
