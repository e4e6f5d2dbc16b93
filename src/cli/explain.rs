//! `svcplane explain svc/NAME`: for every Pod in the Service's namespace, whether
//! it is an endpoint and, if not, why; then the Service's EndpointSlices.
//!
//! Reads the Service, the namespace's Pods, the Pods' Nodes and the Service's
//! EndpointSlices (any managed-by); writes nothing. The reasons come from
//! [`svcplane_controller::eligibility`], the functions the planners build
//! endpoints from, asked once per consumer: EndpointSlices and legacy Endpoints
//! differ on terminating Pods, missing Nodes, ports and families.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, api::ListParams};
use serde::Serialize;
use svcplane_controller::{
    eligibility::{self, Exclusion, Standing},
    labels, selector,
    stored_pod::StoredPod,
};

use super::{CommonArgs, emit, fetch_service, table::Table};

/// `svcplane explain` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct ExplainArgs {
    /// The Service: svc/NAME.
    pub service: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// What `explain` found.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ExplainReport {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// `spec.type` (`ClusterIP` when unset).
    #[serde(rename = "type")]
    pub type_: String,
    /// `spec.selector`; `None` for a selectorless Service (absent or empty).
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.publishNotReadyAddresses`.
    pub publish_not_ready_addresses: bool,
    /// Every Pod of the namespace, by name.
    pub pods: Vec<PodReport>,
    /// The Service's EndpointSlices, whoever manages them.
    pub slices: Vec<SliceReport>,
}

/// One Pod's standing with the Service.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct PodReport {
    /// Pod name.
    pub name: String,
    /// `status.podIPs`.
    pub ips: Vec<String>,
    /// `spec.nodeName`.
    pub node: String,
    /// Standing in the Service's EndpointSlices.
    pub endpoint_slices: Standing,
    /// Standing in the Service's legacy Endpoints object.
    pub endpoints: Standing,
    /// Every reason, once, with the consumers it applies to.
    pub reasons: Vec<Reason>,
}

/// One reason a Pod is not (fully) an endpoint.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct Reason {
    /// A fixed name for scripts, e.g. `SelectorMismatch`.
    pub reason: &'static str,
    /// The sentence a human reads.
    pub message: String,
    /// `EndpointSlices`, `Endpoints` or both.
    pub applies_to: Vec<&'static str>,
    /// For a selector mismatch: the label key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// For a selector mismatch: the value the selector wants.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// For a selector mismatch: the Pod's value (absent when the label is missing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual: Option<String>,
}

/// One EndpointSlice of the Service.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct SliceReport {
    /// Slice name.
    pub name: String,
    /// `endpointslice.kubernetes.io/managed-by`.
    pub managed_by: String,
    /// `addressType`.
    pub address_type: String,
    /// Endpoints whose `ready` condition is not false.
    pub ready: usize,
    /// All endpoints.
    pub endpoints: usize,
    /// `name:port/protocol` of each port.
    pub ports: Vec<String>,
}

/// Builds one Pod's report from each consumer's exclusions (pure).
pub fn build_pod_report(svc: &Service, pod: &StoredPod, node_found: bool) -> PodReport {
    let for_slices = eligibility::for_slices(svc, pod, node_found);
    let for_endpoints = eligibility::for_endpoints(svc, pod);
    // Union in first-seen order; a reason both consumers give is listed once.
    let mut reasons: Vec<(Exclusion, Vec<&'static str>)> = Vec::new();
    for (consumer, verdict) in [("EndpointSlices", &for_slices), ("Endpoints", &for_endpoints)] {
        for exclusion in &verdict.reasons {
            match reasons.iter_mut().find(|(e, _)| e == exclusion) {
                Some((_, consumers)) => consumers.push(consumer),
                None => reasons.push((exclusion.clone(), vec![consumer])),
            }
        }
    }
    let status = pod.status.as_ref();
    PodReport {
        name: pod.metadata.name.clone().unwrap_or_default(),
        ips: status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().map(|ip| ip.ip.clone()).collect(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        endpoint_slices: for_slices.standing(),
        endpoints: for_endpoints.standing(),
        reasons: reasons
            .into_iter()
            .map(|(exclusion, applies_to)| {
                let (key, expected, actual) = match &exclusion {
                    Exclusion::SelectorMismatch { key, expected, actual } => {
                        (Some(key.clone()), Some(expected.clone()), actual.clone())
                    }
                    _ => (None, None, None),
                };
                Reason {
                    reason: exclusion.name(),
                    message: exclusion.to_string(),
                    applies_to,
                    key,
                    expected,
                    actual,
                }
            })
            .collect(),
    }
}

/// Summarises one EndpointSlice (pure).
pub fn build_slice_report(slice: &EndpointSlice) -> SliceReport {
    let slice_labels = slice.metadata.labels.as_ref();
    SliceReport {
        name: slice.metadata.name.clone().unwrap_or_default(),
        managed_by: slice_labels.and_then(|l| l.get(labels::MANAGED_BY)).cloned().unwrap_or_default(),
        address_type: slice.address_type.clone(),
        // A missing `ready` means ready (the discovery/v1 API contract).
        ready: slice
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .count(),
        endpoints: slice.endpoints.as_ref().map_or(0, Vec::len),
        ports: slice
            .ports
            .iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}:{}/{}",
                    p.name.as_deref().unwrap_or_default(),
                    p.port.map(|n| n.to_string()).unwrap_or_else(|| "*".into()),
                    p.protocol.as_deref().unwrap_or("TCP")
                )
            })
            .collect(),
    }
}

/// Runs `svcplane explain`.
pub async fn run(args: ExplainArgs, client: kube::Client) -> anyhow::Result<()> {
    let (namespace, svc) = fetch_service(&client, &args.common, &args.service).await?;
    let name = svc.metadata.name.clone().unwrap_or_default();
    // Pods as the controllers' store keeps them, so the rules see the same fields.
    let mut pods = Api::<StoredPod>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing Pods in {namespace}"))?
        .items;
    pods.iter_mut().for_each(StoredPod::trim);
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    // Ask for each Node by name, as the controller's store lookup does, rather than
    // listing them all: the report needs only "does it exist".
    let node_names: BTreeSet<String> =
        pods.iter().filter_map(|p| p.spec.as_ref()?.node_name.clone()).filter(|n| !n.is_empty()).collect();
    let nodes = Api::<Node>::all(client.clone());
    let mut existing = BTreeSet::new();
    for node in node_names {
        if nodes.get_opt(&node).await.with_context(|| format!("getting Node {node}"))?.is_some() {
            existing.insert(node);
        }
    }
    let node_found = |pod: &StoredPod| {
        pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some_and(|n| existing.contains(n))
    };

    let selector = format!("{}={name}", labels::SERVICE_NAME);
    let mut slices = Api::<EndpointSlice>::namespaced(client, &namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .with_context(|| format!("listing EndpointSlices of {namespace}/{name}"))?
        .items;
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    let spec = svc.spec.as_ref();
    let report = ExplainReport {
        namespace,
        service: name,
        type_: spec.and_then(|s| s.type_.clone()).unwrap_or_else(|| "ClusterIP".into()),
        selector: selector::service_selector(&svc).cloned(),
        publish_not_ready_addresses: spec.and_then(|s| s.publish_not_ready_addresses).unwrap_or(false),
        pods: pods.iter().map(|pod| build_pod_report(&svc, pod, node_found(pod))).collect(),
        slices: slices.iter().map(build_slice_report).collect(),
    };
    emit(args.common.output, &report, render)
}

/// The human form: a header, the Pods table, the slices table.
pub fn render(report: &ExplainReport) -> String {
    let selector = match &report.selector {
        None => "<none> (selectorless: endpoints are written by hand)".to_owned(),
        Some(s) => selector::display(s),
    };
    let mut out = format!(
        "Service:                  {}/{}\nType:                     {}\nSelector:                 {}\nPublishNotReadyAddresses: {}\n\n",
        report.namespace, report.service, report.type_, selector, report.publish_not_ready_addresses
    );
    if report.pods.is_empty() {
        out.push_str(&format!("No Pods in namespace {}.\n", report.namespace));
    } else {
        let mut pods = Table::new(&["POD", "IPS", "NODE", "ENDPOINTSLICES", "ENDPOINTS", "REASONS"]);
        for pod in &report.pods {
            let reasons = pod
                .reasons
                .iter()
                .map(|r| {
                    if r.applies_to.len() == 1 {
                        format!("{} [{} only]", r.message, r.applies_to.join(""))
                    } else {
                        r.message.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join("; ");
            pods.row(vec![
                pod.name.clone(),
                pod.ips.join(","),
                pod.node.clone(),
                pod.endpoint_slices.as_str().to_owned(),
                pod.endpoints.as_str().to_owned(),
                reasons,
            ]);
        }
        out.push_str(&pods.render());
    }
    out.push('\n');
    if report.slices.is_empty() {
        out.push_str("No EndpointSlices.\n");
    } else {
        let mut slices = Table::new(&["ENDPOINTSLICE", "MANAGED-BY", "ADDRESSTYPE", "READY", "PORTS"]);
        for slice in &report.slices {
            slices.row(vec![
                slice.name.clone(),
                slice.managed_by.clone(),
                slice.address_type.clone(),
                format!("{}/{}", slice.ready, slice.endpoints),
                slice.ports.join(","),
            ]);
        }
        out.push_str(&slices.render());
    }
    out
}
