//! How two endpoint controllers' results are compared (svcplane's and
//! kube-controller-manager's): the differential suite and shadow mode use these.
//! Names, order, generation, managed-by and the trigger-time annotation are
//! ignored, and so is how endpoints are spread across the slices of one (address
//! type, port set), which upstream does not make deterministic either. Pure.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{EndpointSubset, Endpoints};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::labels;

/// One controller's slices of one Service, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Normalized {
    /// `"<addressType> <ports> | <endpoint>"`, sorted.
    pub endpoints: Vec<String>,
    /// `"<addressType> <ports> | labels k=v,..."`, deduplicated.
    pub labels: BTreeSet<String>,
    /// Slices per group.
    pub slices_per_group: BTreeMap<String, usize>,
}

impl Normalized {
    /// Number of endpoints.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// The first line one side has and the other has not, endpoints before
    /// labels; `None` when both hold the same endpoints and labels (slice counts
    /// are not compared).
    pub fn first_difference(
        &self,
        theirs: &Normalized,
        ours_name: &str,
        theirs_name: &str,
    ) -> Option<String> {
        let (ours_labels, their_labels): (Vec<String>, Vec<String>) =
            (self.labels.iter().cloned().collect(), theirs.labels.iter().cloned().collect());
        first_line_difference(&self.endpoints, &theirs.endpoints, ours_name, theirs_name)
            .or_else(|| first_line_difference(&ours_labels, &their_labels, ours_name, theirs_name))
    }
}

fn group(slice: &EndpointSlice) -> String {
    let mut ports: Vec<String> = slice
        .ports
        .iter()
        .flatten()
        .map(|p| {
            format!(
                "{}:{}/{}{}",
                p.name.clone().unwrap_or_default(),
                p.port.map(|p| p.to_string()).unwrap_or_default(),
                p.protocol.clone().unwrap_or_default(),
                p.app_protocol.as_ref().map(|a| format!("({a})")).unwrap_or_default()
            )
        })
        .collect();
    ports.sort();
    format!("{} [{}]", slice.address_type, ports.join(","))
}

/// Normalises slices (of one controller, one Service).
pub fn normalize<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Normalized {
    let mut n = Normalized::default();
    for slice in slices {
        let g = group(slice);
        *n.slices_per_group.entry(g.clone()).or_default() += 1;
        let mut slice_labels: Vec<String> = slice
            .metadata
            .labels
            .iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != labels::MANAGED_BY)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        slice_labels.sort();
        n.labels.insert(format!("{g} | labels {}", slice_labels.join(",")));
        for ep in slice.endpoints.iter().flatten() {
            let mut addrs = ep.addresses.clone();
            addrs.sort();
            let c = ep.conditions.clone().unwrap_or_default();
            let b = |v: Option<bool>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            let hints = ep
                .hints
                .as_ref()
                .map(|h| {
                    let zones: Vec<String> = h.for_zones.iter().flatten().map(|z| z.name.clone()).collect();
                    let nodes: Vec<String> = h.for_nodes.iter().flatten().map(|z| z.name.clone()).collect();
                    format!("zones={} nodes={}", zones.join("+"), nodes.join("+"))
                })
                .unwrap_or_else(|| "-".into());
            let target = ep.target_ref.as_ref().map(|t| {
                format!("{}/{}", t.kind.clone().unwrap_or_default(), t.name.clone().unwrap_or_default())
            });
            n.endpoints.push(format!(
                "{g} | {} ready={} serving={} terminating={} host={} node={} zone={} target={} hints={}",
                addrs.join(","),
                b(c.ready),
                b(c.serving),
                b(c.terminating),
                ep.hostname.clone().unwrap_or_else(|| "-".into()),
                ep.node_name.clone().unwrap_or_else(|| "-".into()),
                ep.zone.clone().unwrap_or_else(|| "-".into()),
                target.unwrap_or_else(|| "-".into()),
                hints,
            ));
        }
    }
    n.endpoints.sort();
    n
}

/// Endpoints as sorted lines: labels, the over-capacity annotation, and one line
/// per (subset ports, address, readiness); `<none>` when absent.
pub fn normalize_endpoints(ep: Option<&Endpoints>) -> Vec<String> {
    let Some(ep) = ep else { return vec!["<none>".into()] };
    let mut lines = Vec::new();
    for (k, v) in ep.metadata.labels.iter().flatten() {
        lines.push(format!("label {k}={v}"));
    }
    if let Some(v) = ep.metadata.annotations.as_ref().and_then(|a| a.get(labels::OVER_CAPACITY)) {
        lines.push(format!("over-capacity {v}"));
    }
    for subset in ep.subsets.iter().flatten() {
        let ports = subset_ports(subset);
        for (kind, list) in [("ready", &subset.addresses), ("notready", &subset.not_ready_addresses)] {
            for a in list.iter().flatten() {
                lines.push(format!(
                    "{ports} {kind} {} host={} node={} target={}",
                    a.ip,
                    a.hostname.clone().unwrap_or_default(),
                    a.node_name.clone().unwrap_or_default(),
                    a.target_ref.as_ref().and_then(|t| t.name.clone()).unwrap_or_default()
                ));
            }
        }
    }
    lines.sort();
    lines
}

/// The first line of `ours` not in `theirs` or the reverse, named by side.
pub fn first_line_difference(
    ours: &[String],
    theirs: &[String],
    ours_name: &str,
    theirs_name: &str,
) -> Option<String> {
    let only = |a: &[String], b: &[String]| a.iter().find(|x| !b.contains(x)).cloned();
    only(ours, theirs)
        .map(|line| format!("only {ours_name}: {line}"))
        .or_else(|| only(theirs, ours).map(|line| format!("only {theirs_name}: {line}")))
}

fn subset_ports(subset: &EndpointSubset) -> String {
    let mut ports: Vec<String> = subset
        .ports
        .iter()
        .flatten()
        .map(|p| {
            format!(
                "{}:{}/{}",
                p.name.clone().unwrap_or_default(),
                p.port,
                p.protocol.clone().unwrap_or_default()
            )
        })
        .collect();
    ports.sort();
    format!("[{}]", ports.join(","))
}
