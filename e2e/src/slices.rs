//! Reading EndpointSlices back and normalising them so two controllers' results
//! compare: names, order, generation and managed-by are ignored, and so is how
//! endpoints are distributed across slices of one (address type, port set), which
//! upstream does not make deterministic either.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Api, api::ListParams};

/// `endpointslice.kubernetes.io/managed-by` of svcplane's slice controller.
pub const SVCPLANE: &str = "endpointslice-controller.svcplane.io";
/// Of kube-controller-manager's slice controller.
pub const UPSTREAM: &str = "endpointslice-controller.k8s.io";
/// Of svcplane's mirroring controller.
pub const SVCPLANE_MIRROR: &str = "endpointslicemirroring-controller.svcplane.io";
/// Of kube-controller-manager's mirroring controller.
pub const UPSTREAM_MIRROR: &str = "endpointslicemirroring-controller.k8s.io";

/// Slices of `service` in the API's namespace written by `managed_by`.
pub async fn slices_of(api: &Api<EndpointSlice>, service: &str, managed_by: &str) -> Vec<EndpointSlice> {
    let lp = ListParams::default().labels(&format!(
        "kubernetes.io/service-name={service},endpointslice.kubernetes.io/managed-by={managed_by}"
    ));
    api.list(&lp).await.map(|l| l.items).unwrap_or_else(|e| panic!("list slices of {service}: {e}"))
}

/// A normalised view: one line per endpoint (with its group), one per group's
/// labels, and the number of slices per group.
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
pub fn normalize(slices: &[EndpointSlice]) -> Normalized {
    let mut n = Normalized::default();
    for slice in slices {
        let g = group(slice);
        *n.slices_per_group.entry(g.clone()).or_default() += 1;
        let mut labels: Vec<String> = slice
            .metadata
            .labels
            .iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != "endpointslice.kubernetes.io/managed-by")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        labels.sort();
        n.labels.insert(format!("{g} | labels {}", labels.join(",")));
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
            n.endpoints.push(format!(
                "{g} | {} ready={} serving={} terminating={} host={} node={} zone={} target={} hints={}",
                addrs.join(","),
                b(c.ready),
                b(c.serving),
                b(c.terminating),
                ep.hostname.clone().unwrap_or_else(|| "-".into()),
                ep.node_name.clone().unwrap_or_else(|| "-".into()),
                ep.zone.clone().unwrap_or_else(|| "-".into()),
                ep.target_ref
                    .as_ref()
                    .map(|t| format!(
                        "{}/{}",
                        t.kind.clone().unwrap_or_default(),
                        t.name.clone().unwrap_or_default()
                    ))
                    .unwrap_or_else(|| "-".into()),
                hints,
            ));
        }
    }
    n.endpoints.sort();
    n
}
