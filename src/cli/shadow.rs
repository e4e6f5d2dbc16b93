//! `svcplane shadow report [-n NAMESPACE | -A]`: per Service and endpoint
//! controller, whether what svcplane would write agrees with what
//! kube-controller-manager wrote, and the first difference when it does not.
//!
//! Reads Services, Pods, Nodes, kube-controller-manager's EndpointSlices and
//! the Endpoints of one namespace (or all); writes nothing. The verdicts come
//! from what `svcplane run --migration=shadow` calls on its stores: the
//! planners from no slices (`plan_slices`, `plan_mirrored_slices`), the
//! Endpoints planner against kube-controller-manager's object
//! (`desired_endpoints`), then [`migration::slices_agreement`] and
//! [`migration::endpoints_agreement`]. Objects are trimmed as the controllers'
//! stores trim them. Services neither manager writes endpoints for (a
//! selectorless Service for the EndpointSlice controller, for instance) get no
//! verdict. The exit status is 0 whether or not they agree: it is a report.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, ResourceExt, api::ListParams};
use serde::Serialize;
use svcplane_controller::{
    endpoints::desired_endpoints,
    endpointslice::{NodeInfo, SliceConfig, plan_slices},
    labels,
    metrics::ControllerKind,
    migration,
    mirroring::{MirroringConfig, plan_mirrored_slices},
    plan::Key,
    run::ControllerArgs,
    stored_pod::StoredPod,
    trim,
};

use super::{CommonArgs, OutputFormat, emit, table::Table};

/// `svcplane shadow` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct ShadowArgs {
    #[command(subcommand)]
    pub command: ShadowCommand,
}

/// `svcplane shadow` subcommands.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum ShadowCommand {
    /// Per Service and controller: does svcplane agree with kube-controller-manager?
    /// Exits 0 either way.
    Report(ReportArgs),
}

/// `svcplane shadow report` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct ReportArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Every namespace.
    #[arg(short = 'A', long = "all-namespaces", conflicts_with = "namespace")]
    pub all_namespaces: bool,
}

/// One Service's verdict for one controller.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ServiceVerdict {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// `endpointslice`, `endpoints` or `mirroring`, as the metric label.
    pub controller: &'static str,
    /// Whether svcplane would write what kube-controller-manager holds.
    pub agrees: bool,
    /// The first difference, named by side (`only svcplane: ...`); `None` when it agrees.
    pub difference: Option<String>,
}

/// What the report is computed from: the objects as the controllers store them.
#[derive(Debug, Default)]
pub struct Objects {
    /// Services.
    pub services: Vec<Service>,
    /// Pods (trimmed, as the controllers' store keeps them).
    pub pods: Vec<StoredPod>,
    /// Every Node, by name.
    pub nodes: BTreeMap<String, NodeInfo>,
    /// kube-controller-manager's EndpointSlices (either managed-by value).
    pub slices: Vec<EndpointSlice>,
    /// Endpoints.
    pub endpoints: Vec<Endpoints>,
}

/// The metric label of a controller.
fn controller_name(kind: &ControllerKind) -> &'static str {
    match kind {
        ControllerKind::endpointslice => "endpointslice",
        ControllerKind::endpoints => "endpoints",
        ControllerKind::mirroring => "mirroring",
    }
}

/// The controllers' configuration with `svcplane run`'s defaults, as `run` builds it.
fn configs() -> (SliceConfig, MirroringConfig) {
    let args = ControllerArgs::default();
    let slices = SliceConfig {
        max_endpoints_per_slice: args.max_endpoints_per_slice.into(),
        delete_when_unselected: true,
        ..SliceConfig::default()
    };
    let mirroring = MirroringConfig {
        max_endpoints_per_subset: args.mirroring_max_endpoints_per_subset.into(),
        ..MirroringConfig::default()
    };
    (slices, mirroring)
}

/// The verdicts of every Service, sorted by namespace and name, controllers in
/// `endpointslice, endpoints, mirroring` order (pure).
pub fn build_report(objects: &Objects) -> Vec<ServiceVerdict> {
    let (slice_config, mirroring_config) = configs();
    let mut pods: BTreeMap<String, Vec<Arc<StoredPod>>> = BTreeMap::new();
    for pod in &objects.pods {
        pods.entry(pod.namespace().unwrap_or_default()).or_default().push(Arc::new(pod.clone()));
    }
    let mut slices: BTreeMap<(String, String, String), Vec<Arc<EndpointSlice>>> = BTreeMap::new();
    for slice in &objects.slices {
        let slice_labels = slice.labels();
        let (Some(service), Some(managed_by)) =
            (slice_labels.get(labels::SERVICE_NAME), slice_labels.get(labels::MANAGED_BY))
        else {
            continue;
        };
        let owner = (slice.namespace().unwrap_or_default(), service.clone(), managed_by.clone());
        slices.entry(owner).or_default().push(Arc::new(slice.clone()));
    }
    let endpoints: BTreeMap<(String, String), &Endpoints> = objects
        .endpoints
        .iter()
        .map(|ep| ((ep.namespace().unwrap_or_default(), ep.name_any()), ep))
        .collect();

    let mut services: Vec<&Service> = objects.services.iter().collect();
    services.sort_by_key(|svc| (svc.namespace(), svc.name_any()));
    let mut report = Vec::new();
    for svc in services {
        let key = Key::of(svc);
        let pods = pods.get(&key.namespace).map(Vec::as_slice).unwrap_or_default();
        let theirs = |kind: &ControllerKind| -> &[Arc<EndpointSlice>] {
            let Some(managed_by) = migration::upstream_manager(kind) else { return &[] };
            let owner = (key.namespace.clone(), key.name.clone(), managed_by.to_owned());
            slices.get(&owner).map(Vec::as_slice).unwrap_or_default()
        };
        let existing = endpoints.get(&(key.namespace.clone(), key.name.clone())).copied();

        let kind = ControllerKind::endpointslice;
        let desired = plan_slices(Some(svc), pods, &objects.nodes, &[], None, &slice_config).create;
        let slices_verdict = migration::slices_agreement(&desired, theirs(&kind));
        let plan = desired_endpoints(&key, Some(svc), pods, None, existing);
        let endpoints_verdict = migration::endpoints_agreement(true, &plan, existing);
        let desired = plan_mirrored_slices(Some(svc), existing, &[], &mirroring_config).create;
        let mirroring_verdict = migration::slices_agreement(&desired, theirs(&ControllerKind::mirroring));

        for (kind, verdict) in [
            (kind, slices_verdict),
            (ControllerKind::endpoints, endpoints_verdict),
            (ControllerKind::mirroring, mirroring_verdict),
        ] {
            let Some(verdict) = verdict else { continue };
            report.push(ServiceVerdict {
                namespace: key.namespace.clone(),
                service: key.name.clone(),
                controller: controller_name(&kind),
                agrees: verdict.is_ok(),
                difference: verdict.err(),
            });
        }
    }
    report
}

/// `N agree, M differ` (with the verb agreeing with its count).
pub fn summary(report: &[ServiceVerdict]) -> String {
    let agree = report.iter().filter(|v| v.agrees).count();
    let differ = report.len() - agree;
    let verb = |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!("{}, {}", verb(agree, "agrees", "agree"), verb(differ, "differs", "differ"))
}

/// The human form: one row per Service and controller, then the summary.
pub fn render(report: &[ServiceVerdict]) -> String {
    let mut out = String::new();
    if report.is_empty() {
        out.push_str("No Services with endpoints from kube-controller-manager or svcplane.\n");
    } else {
        let mut table = Table::new(&["NAMESPACE", "SERVICE", "CONTROLLER", "AGREES", "DIFFERENCE"]);
        for v in report {
            table.row(vec![
                v.namespace.clone(),
                v.service.clone(),
                v.controller.to_owned(),
                if v.agrees { "yes" } else { "no" }.to_owned(),
                v.difference.clone().unwrap_or_default(),
            ]);
        }
        out.push_str(&table.render());
    }
    out.push('\n');
    out.push_str(&summary(report));
    out.push('\n');
    out
}

/// Every `K` in `namespace` (everywhere when `None`) matching `params`.
async fn list<K>(
    client: &kube::Client,
    namespace: Option<&str>,
    params: &ListParams,
    what: &str,
) -> anyhow::Result<Vec<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let api = match namespace {
        Some(ns) => Api::<K>::namespaced(client.clone(), ns),
        None => Api::<K>::all(client.clone()),
    };
    let scope = namespace.map_or_else(|| "all namespaces".to_owned(), |ns| format!("namespace {ns}"));
    Ok(api.list(params).await.with_context(|| format!("listing {what} in {scope}"))?.items)
}

/// Lists what the report needs, in `namespace` or everywhere (`None`), trimmed
/// as the controllers' stores trim it.
async fn list_objects(client: &kube::Client, namespace: Option<&str>) -> anyhow::Result<Objects> {
    let all = ListParams::default();
    let mut services: Vec<Service> = list(client, namespace, &all, "Services").await?;
    services.iter_mut().for_each(trim::trim_service);
    let mut pods: Vec<StoredPod> = list(client, namespace, &all, "Pods").await?;
    pods.iter_mut().for_each(StoredPod::trim);
    let upstream = ListParams::default().labels(&format!(
        "{} in ({},{})",
        labels::MANAGED_BY,
        labels::UPSTREAM_SLICE_CONTROLLER,
        labels::UPSTREAM_MIRRORING_CONTROLLER
    ));
    let what = "kube-controller-manager's EndpointSlices";
    let mut slices: Vec<EndpointSlice> = list(client, namespace, &upstream, what).await?;
    slices.iter_mut().for_each(trim::trim_slice);
    let mut endpoints: Vec<Endpoints> = list(client, namespace, &all, "Endpoints").await?;
    endpoints.iter_mut().for_each(trim::trim_endpoints);
    // Every Node: the planner needs each Pod's Node's existence and zone, and
    // the CPU per zone for topology-mode Auto.
    let node_list = Api::<Node>::all(client.clone()).list(&all).await.context("listing Nodes")?.items;
    let nodes = node_list.iter().map(|node| (node.name_any(), NodeInfo::of(node))).collect();
    Ok(Objects { services, pods, nodes, slices, endpoints })
}

/// Runs `svcplane shadow`.
pub async fn run(args: ShadowArgs, client: kube::Client) -> anyhow::Result<()> {
    let ShadowCommand::Report(args) = args.command;
    let namespace = (!args.all_namespaces).then(|| args.common.namespace(&client));
    let objects = list_objects(&client, namespace.as_deref()).await?;
    let report = build_report(&objects);
    emit(args.common.output, &report, |report| render(report))?;
    if args.common.output != OutputFormat::Table {
        // The data stays pure JSON/YAML; the summary is for the terminal.
        eprintln!("{}", summary(&report));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use kube::core::ObjectMeta;

    fn verdict(service: &str, controller: &'static str, difference: Option<&str>) -> ServiceVerdict {
        ServiceVerdict {
            namespace: "shop".into(),
            service: service.into(),
            controller,
            agrees: difference.is_none(),
            difference: difference.map(str::to_owned),
        }
    }

    #[test]
    fn the_table_says_yes_or_no_and_names_the_first_difference_then_the_summary() {
        let report = [
            verdict("web", "endpointslice", None),
            verdict("web", "endpoints", Some("only kube-controller-manager: [http:8080/TCP] ready 10.0.0.1")),
        ];
        assert_eq!(
            render(&report),
            "NAMESPACE   SERVICE   CONTROLLER      AGREES   DIFFERENCE\n\
             shop        web       endpointslice   yes      -\n\
             shop        web       endpoints       no       only kube-controller-manager: [http:8080/TCP] ready 10.0.0.1\n\
             \n\
             1 agrees, 1 differs\n"
        );
    }

    #[test]
    fn the_summary_counts_agreeing_and_differing_verdicts() {
        assert_eq!(summary(&[]), "0 agree, 0 differ");
        let many = [
            verdict("a", "endpointslice", None),
            verdict("b", "endpointslice", None),
            verdict("c", "endpointslice", Some("x")),
            verdict("d", "mirroring", Some("y")),
        ];
        assert_eq!(summary(&many), "2 agree, 2 differ");
        assert_eq!(
            render(&[]),
            "No Services with endpoints from kube-controller-manager or svcplane.\n\n0 agree, 0 differ\n"
        );
    }

    #[test]
    fn json_has_a_null_difference_when_it_agrees() {
        let json = serde_json::to_value([verdict("web", "endpoints", None)]).expect("json");
        assert_eq!(
            json,
            serde_json::json!([{
                "namespace": "shop", "service": "web", "controller": "endpoints",
                "agrees": true, "difference": null
            }])
        );
    }

    #[test]
    fn a_selected_service_without_any_manager_s_objects_differs_and_a_selectorless_one_is_skipped() {
        let service = |name: &str, selector: bool| Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: selector.then(|| BTreeMap::from([("app".to_owned(), name.to_owned())])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let objects =
            Objects { services: vec![service("web", true), service("db", false)], ..Default::default() };
        let report = build_report(&objects);
        // svcplane would write web's placeholder slice and Endpoints; nobody has.
        let got: Vec<(&str, &str, bool)> =
            report.iter().map(|v| (v.service.as_str(), v.controller, v.agrees)).collect();
        assert_eq!(got, [("web", "endpointslice", false), ("web", "endpoints", false)]);
        let difference = report[0].difference.as_deref().unwrap_or_default();
        assert!(difference.starts_with("only svcplane: "), "{difference}");
    }
}
