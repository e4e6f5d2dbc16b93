//! Webhook set-up shared by the webhook e2e tests and the webhook benchmark: install the claim CRD, start
//! in-process replicas with a serving certificate the apiserver trusts, and
//! register webhook configurations scoped to labelled namespaces.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{ControlPlane, TestNamespace, wait::eventually};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ValidatingWebhook,
    ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::ObjectMeta;
use kube::{Client, CustomResourceExt};
use svcplane_webhook::repair::{RepairPlan, repair_once};
use svcplane_webhook::usage_alerts::UsageAlerts;
use svcplane_webhook::{AllocationClaim, Value, WebhookArgs, WebhookServer};

/// Label that scopes a test's webhook configurations to its namespaces.
pub const SCOPE_LABEL: &str = "svcplane.dev/webhook-test";

/// Installs the AllocationClaim CRD and waits until it is served.
pub async fn install_crd(client: &Client) {
    apply_crd::<AllocationClaim>(client).await;
}

/// Installs the ServiceIPPool CRD and waits until it is served.
pub async fn install_pool_crd(client: &Client) {
    apply_crd::<svcplane_webhook::service_ip_pools::ServiceIPPool>(client).await;
}

async fn apply_crd<K>(client: &Client)
where
    K: CustomResourceExt
        + kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = K::crd();
    let name = crd.metadata.name.clone().expect("crd name");
    crds.patch(&name, &PatchParams::apply("svcplane-e2e").force(), &Patch::Apply(&crd))
        .await
        .expect("apply CRD");
    let objects: Api<K> = Api::all(client.clone());
    eventually(&format!("{name} served"), Duration::from_secs(30), || async {
        objects.list(&ListParams::default().limit(1)).await.map(|_| ())
    })
    .await;
}

/// Writes a serving certificate for 127.0.0.1 signed by the test CA.
pub fn serving_cert(cp: &ControlPlane) -> (tempfile::TempDir, WebhookArgs) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pair = cp.ca.server(&["127.0.0.1"]).expect("serving cert");
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, pair.cert_pem).expect("write cert");
    std::fs::write(&key, pair.key_pem).expect("write key");
    let args = WebhookArgs {
        bind_address: "127.0.0.1:0".parse().expect("addr"),
        tls_cert_file: Some(cert),
        tls_key_file: Some(key),
        repair_grace: Duration::from_secs(3),
        repair_interval: Duration::from_millis(500),
        // Values are released as soon as their Service is deleted, as the
        // tests written before sticky values expect; webhook_sticky.rs sets
        // its own window.
        retention: Duration::ZERO,
        ..WebhookArgs::default()
    };
    (dir, args)
}

/// Starts one replica and waits until its index is built.
pub async fn start_replica(args: &WebhookArgs, client: &Client) -> WebhookServer {
    let server = WebhookServer::start(args, client.clone()).await.expect("start webhook");
    server.wait_ready(Duration::from_secs(30)).await.expect("webhook ready");
    server
}

/// Creates a namespace labelled for `scope`.
pub async fn scoped_namespace(client: &Client, prefix: &str, scope: &str) -> TestNamespace {
    let ns = TestNamespace::new(client, prefix).await;
    let patch = serde_json::json!({"metadata": {"labels": {SCOPE_LABEL: scope}}});
    Api::<Namespace>::all(client.clone())
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("label namespace");
    ns
}

/// Registers mutating + validating configurations named `name` calling the
/// replica at `addr` for namespaces labelled `scope`.
pub async fn register(
    client: &Client,
    cp: &ControlPlane,
    name: &str,
    addr: std::net::SocketAddr,
    scope: &str,
) {
    let selector = LabelSelector {
        match_labels: Some(BTreeMap::from([(SCOPE_LABEL.to_owned(), scope.to_owned())])),
        ..Default::default()
    };
    let rules = vec![RuleWithOperations {
        api_groups: Some(vec![String::new()]),
        api_versions: Some(vec!["v1".into()]),
        operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
        resources: Some(vec!["services".into()]),
        scope: Some("Namespaced".into()),
    }];
    let config = |path: &str| WebhookClientConfig {
        url: Some(format!("https://{addr}/{path}")),
        ca_bundle: Some(ByteString(cp.ca_pem().into_bytes())),
        service: None,
    };
    let mutating = MutatingWebhookConfiguration {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        webhooks: Some(vec![MutatingWebhook {
            name: "allocate.svcplane.dev".into(),
            admission_review_versions: vec!["v1".into()],
            client_config: config("mutate"),
            side_effects: "NoneOnDryRun".into(),
            failure_policy: Some("Fail".into()),
            namespace_selector: Some(selector.clone()),
            rules: Some(rules.clone()),
            timeout_seconds: Some(10),
            ..Default::default()
        }]),
    };
    let validating = ValidatingWebhookConfiguration {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        webhooks: Some(vec![ValidatingWebhook {
            name: "claims.svcplane.dev".into(),
            admission_review_versions: vec!["v1".into()],
            client_config: config("validate"),
            side_effects: "NoneOnDryRun".into(),
            failure_policy: Some("Fail".into()),
            namespace_selector: Some(selector),
            rules: Some(rules),
            timeout_seconds: Some(10),
            ..Default::default()
        }]),
    };
    let pp = PatchParams::apply("svcplane-e2e").force();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(name, &pp, &Patch::Apply(&mutating))
        .await
        .expect("apply mutating configuration");
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(name, &pp, &Patch::Apply(&validating))
        .await
        .expect("apply validating configuration");
}

/// Waits until a dry-run create in `ns` reaches the replica (its dry-run
/// counter moves): the apiserver has picked up the configuration.
pub async fn wait_webhook_active(ns: &TestNamespace, server: &WebhookServer) {
    wait_dry_runs_counted(ns, || async { server.metrics.dry_runs.get() as f64 }).await;
}

/// Like [`wait_webhook_active`] for a replica running as a `svcplane run` process,
/// whose dry-run counter is read from its /metrics.
pub async fn wait_process_webhook_active(ns: &TestNamespace, process: &crate::svcplane::Svcplane) {
    wait_dry_runs_counted(ns, || process.metric_sum("svcplane_webhook_dry_runs_total", &[])).await;
}

/// Dry-run creates a marker in `ns` until `dry_runs` grows.
async fn wait_dry_runs_counted<F, Fut>(ns: &TestNamespace, dry_runs: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let before = dry_runs().await;
    let api: Api<Service> = ns.api();
    eventually("webhook called for a dry-run marker", Duration::from_secs(30), || async {
        let marker = mk_service("marker", "ClusterIP", &[(80, None)]);
        api.create(&PostParams { dry_run: true, ..Default::default() }, &marker)
            .await
            .map_err(|e| e.to_string())?;
        if dry_runs().await > before { Ok(()) } else { Err("not called yet".to_owned()) }
    })
    .await;
}

/// A Service with `ports` as `(port, nodePort)`.
pub fn mk_service(name: &str, kind: &str, ports: &[(i32, Option<i32>)]) -> Service {
    Service {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: Some(ServiceSpec {
            type_: Some(kind.into()),
            selector: Some(BTreeMap::from([("app".to_owned(), name.to_owned())])),
            ports: Some(
                ports
                    .iter()
                    .map(|(port, node_port)| ServicePort {
                        name: Some(format!("p{port}")),
                        port: *port,
                        node_port: *node_port,
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A ClusterIP Service asking for `ip`.
pub fn with_cluster_ip(name: &str, ip: &str) -> Service {
    let mut svc = mk_service(name, "ClusterIP", &[(80, None)]);
    svc.spec.as_mut().expect("spec").cluster_ip = Some(ip.to_owned());
    svc
}

/// A replica serving `args`, registered for a namespace of its own (`wh-<scope>`),
/// once its effect shows there.
pub async fn replica_for_scope(
    cp: &ControlPlane,
    client: &Client,
    args: &WebhookArgs,
    scope: &str,
) -> (WebhookServer, TestNamespace) {
    let server = start_replica(args, client).await;
    let ns = scoped_namespace(client, &format!("wh-{scope}"), scope).await;
    register(client, cp, &format!("svcplane-{scope}"), server.addr, scope).await;
    wait_webhook_active(&ns, &server).await;
    (server, ns)
}

/// Each ClusterIP and NodePort `services` hold, with its holder (`namespace/name`);
/// panics naming both holders of a value held twice.
pub fn holders_of_values(services: &[Service]) -> BTreeMap<Value, String> {
    let mut holders = BTreeMap::new();
    for svc in services {
        let owner = svcplane_webhook::admit::service_owner(svc).to_string();
        for value in svcplane_webhook::admit::service_values(svc) {
            if let Some(other) = holders.insert(value, owner.clone()) {
                panic!("{value} held by both {other} and {owner}");
            }
        }
    }
    holders
}

/// The ClusterIPs and NodePorts that two or more of `services` hold, each with its
/// holders (`namespace/name`): the counting form of [`holders_of_values`], for a
/// benchmark that reports duplicates instead of stopping at the first.
pub fn values_held_twice(services: &[Service]) -> BTreeMap<Value, Vec<String>> {
    let mut holders: BTreeMap<Value, Vec<String>> = BTreeMap::new();
    for svc in services {
        let owner = svcplane_webhook::admit::service_owner(svc).to_string();
        for value in svcplane_webhook::admit::service_values(svc) {
            holders.entry(value).or_default().push(owner.clone());
        }
    }
    holders.retain(|_, owners| owners.len() > 1);
    holders
}

/// The claim names that exist now.
pub async fn claim_names(client: &Client) -> Vec<String> {
    claim_names_where(client, |_| true).await
}

/// The names of the claims whose holder is in `namespace`. Claims are cluster-scoped
/// and the other tests of a binary make and release their own meanwhile: a test that
/// counts claims counts its own namespace's.
pub async fn claim_names_in(client: &Client, namespace: &str) -> Vec<String> {
    claim_names_where(client, |c| c.spec.namespace == namespace).await
}

async fn claim_names_where(client: &Client, keep: impl Fn(&AllocationClaim) -> bool) -> Vec<String> {
    Api::<AllocationClaim>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list claims")
        .items
        .into_iter()
        .filter(|c| keep(c))
        .filter_map(|c| c.metadata.name)
        .collect()
}

/// A free loopback address for a replica that must know its URL before it starts.
pub fn free_loopback_addr() -> std::net::SocketAddr {
    let port = crate::ports::free_port().expect("free port");
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts a webhook replica as a real `svcplane run --roles=<roles>` process (so a
/// test can SIGKILL it; `roles` include webhook) serving `args`' certificate on a
/// free loopback port; returns the process and its webhook address.
pub async fn spawn_replica_process(
    cp: &ControlPlane,
    name: &str,
    args: &WebhookArgs,
    roles: &str,
) -> (crate::svcplane::Svcplane, std::net::SocketAddr) {
    spawn_replica_process_with(cp, name, args, roles, &[]).await
}

/// Like [`spawn_replica_process`], with `extra_flags` after the address and TLS
/// flags (e.g. `--webhook-block-size=32`, `--webhook-retention=0s`): only the
/// address and the certificate are taken from `args`.
pub async fn spawn_replica_process_with(
    cp: &ControlPlane,
    name: &str,
    args: &WebhookArgs,
    roles: &str,
    extra_flags: &[&str],
) -> (crate::svcplane::Svcplane, std::net::SocketAddr) {
    let addr = free_loopback_addr();
    let flag = |name: &str, path: &Option<std::path::PathBuf>| {
        format!("--{name}={}", path.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
    };
    let (roles, bind, cert, key) = (
        format!("--roles={roles}"),
        format!("--webhook-bind-address={addr}"),
        flag("webhook-tls-cert-file", &args.tls_cert_file),
        flag("webhook-tls-key-file", &args.tls_key_file),
    );
    let mut flags = vec![roles.as_str(), bind.as_str(), cert.as_str(), key.as_str()];
    flags.extend_from_slice(extra_flags);
    let process = cp.svcplane(name, &flags).await;
    (process, addr)
}

/// Waits until the webhook registered for `ns` answers, observed through the API
/// alone: a dry-run create asking for `held_ip` (claimed by `holder`, a Service the
/// webhook knows) is denied in the webhook's own words, naming the holder.
pub async fn wait_webhook_denies_held_ip(ns: &TestNamespace, held_ip: &str, holder: &str) {
    let api: Api<Service> = ns.api();
    eventually("webhook answering for the namespace", Duration::from_secs(30), || async {
        let mut marker = mk_service("marker", "ClusterIP", &[(80, None)]);
        marker.spec.as_mut().expect("spec").cluster_ip = Some(held_ip.to_owned());
        match api.create(&PostParams { dry_run: true, ..Default::default() }, &marker).await {
            Err(kube::Error::Api(s)) if s.message.contains(&format!("allocated to {holder}")) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// One repair pass with `args`' pools and grace, as the leader runs it;
/// `alerts` carries the pools' usage levels from pass to pass (a fresh
/// `args.usage_alerts()` when the test does not look at them).
pub async fn repair_pass(
    client: &Client,
    args: &WebhookArgs,
    alerts: &mut UsageAlerts,
) -> Result<RepairPlan, String> {
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter { controller: "e2e".into(), instance: None },
    );
    let pools = args.pool_config().map_err(|e| e.to_string())?;
    let metrics = svcplane_webhook::metrics::Metrics::new();
    repair_once(client, &pools, args.repair_grace, &metrics, &recorder, alerts)
        .await
        .map_err(|e| e.to_string())
}

/// `(kind/name of the object, reason, note, times)` of every pool usage Event so
/// far; `times` counts repeats recorded as a series of one Event.
pub async fn usage_events(client: &kube::Client) -> Vec<(String, String, String, i32)> {
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await;
    let mut found: Vec<_> = events
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref().is_some_and(|r| r.starts_with("PoolUsage")))
        .map(|e| {
            let regarding = e.regarding.unwrap_or_default();
            let object =
                format!("{}/{}", regarding.kind.unwrap_or_default(), regarding.name.unwrap_or_default());
            let times = e.series.map_or(1, |series| series.count);
            (object, e.reason.unwrap_or_default(), e.note.unwrap_or_default(), times)
        })
        .collect();
    found.sort();
    found
}
