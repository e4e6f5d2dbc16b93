//! Issue #19 items 1 and 5: ServiceIPPools on a real kube-apiserver. Two
//! tenants' namespaces draw from their pools and a third from the
//! ServiceCIDR outside them; a full pool's denial names it and its usage;
//! pools added and removed at runtime; the leader's `Ready` condition says
//! why a pool is not used.
//!
//! The cluster's ServiceCIDR is a /26 (62 addresses), so the default range
//! outside the pools fills quickly. Pools are cluster-wide, so the tests take
//! turns (`POOLS`) and each deletes its pools before the next.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use svcplane_e2e::webhook::*;
use svcplane_e2e::{ControlPlane, ControlPlaneOptions, TestNamespace, shared_with, wait::eventually};
use svcplane_webhook::service_ip_pools::{
    PoolLabelSelector, ServiceAllocation, ServiceIPPool, ServiceIPPoolSpec,
};

const CLUSTER_CIDR: &str = "10.99.0.0/26";
const POOL_A: &str = "10.99.0.16/28";
const POOL_B: &str = "10.99.0.32/28";
/// The webhook's pool and Namespace watches deliver a change within this.
const DEADLINE: Duration = Duration::from_secs(30);

/// The tests change the cluster-wide pools: one at a time.
static POOLS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn control_plane() -> &'static ControlPlane {
    shared_with(|| ControlPlaneOptions { service_cidrs: CLUSTER_CIDR.into(), ..Default::default() })
}

/// An IPv4 CIDR, to test addresses against.
struct Cidr(u32, u32);

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V4(v4) if u32::from(v4) & self.1 == self.0)
    }
}

fn net(cidr: &str) -> Cidr {
    let (ip, len) = cidr.split_once('/').expect("a CIDR");
    let mask = u32::MAX << (32 - len.parse::<u32>().expect("prefix length"));
    Cidr(u32::from(ip.parse::<std::net::Ipv4Addr>().expect("IPv4")) & mask, mask)
}

fn cluster_ip(svc: &Service) -> IpAddr {
    let ip = svc.spec.as_ref().and_then(|s| s.cluster_ip.clone()).expect("a ClusterIP");
    ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"))
}

/// A pool of `cidr` for the Services of the namespaces `namespaces`, or of
/// those labelled `tenant=<tenant_label>`.
async fn create_pool(client: &kube::Client, name: &str, cidr: &str, allocation: Option<ServiceAllocation>) {
    let spec = ServiceIPPoolSpec { cidrs: vec![cidr.into()], service_allocation: allocation };
    Api::<ServiceIPPool>::all(client.clone())
        .create(&PostParams::default(), &ServiceIPPool::new(name, spec))
        .await
        .unwrap_or_else(|e| panic!("create pool {name}: {e}"));
}

fn for_namespace(namespace: &str) -> Option<ServiceAllocation> {
    Some(ServiceAllocation { namespaces: vec![namespace.into()], ..Default::default() })
}

async fn delete_pools(client: &kube::Client, names: &[&str]) {
    for name in names {
        let _ = Api::<ServiceIPPool>::all(client.clone()).delete(name, &DeleteParams::default()).await;
    }
}

/// Dry-run creates a Service in `ns` asking for `ip`: the denial, or `Ok`.
async fn dry_run_static(ns: &TestNamespace, ip: &str) -> Result<(), String> {
    let params = PostParams { dry_run: true, ..Default::default() };
    let asked = ns.api::<Service>().create(&params, &with_cluster_ip("probe", ip)).await;
    asked.map(|_| ()).map_err(|e| e.to_string())
}

/// Waits until the webhook holds `ip` for pool `pool` (a Service of `outsider`,
/// which the pool does not select, is denied it, naming the pool).
async fn wait_pool_reserves(outsider: &TestNamespace, ip: &str, pool: &str) {
    let wanted = format!("{ip} is in pool {pool}, which does not select this Service");
    eventually(&format!("the webhook reserving {ip} for {pool}"), DEADLINE, || async {
        match dry_run_static(outsider, ip).await {
            Err(e) if e.contains(&wanted) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Creates dynamic ClusterIP Services `<prefix>-<i>` in `ns` until a create
/// fails: their IPs and the failure.
async fn fill(ns: &TestNamespace, prefix: &str) -> (Vec<IpAddr>, String) {
    let mut ips = Vec::new();
    for i in 0..64 {
        let svc = mk_service(&format!("{prefix}-{i}"), "ClusterIP", &[(80, None)]);
        match ns.api::<Service>().create(&PostParams::default(), &svc).await {
            Ok(created) => ips.push(cluster_ip(&created)),
            Err(e) => return (ips, e.to_string()),
        }
    }
    panic!("{prefix}: 64 Services fit in a /26");
}

async fn delete_services(ns: &TestNamespace, prefix: &str, count: usize) {
    for i in 0..count {
        let _ = ns.api::<Service>().delete(&format!("{prefix}-{i}"), &DeleteParams::default()).await;
    }
}

/// One test's turn: the pools to itself, the CRDs installed, and a replica
/// serving `scope`'s namespaces (`ns`, the tenant, and `other`, a bystander).
struct Turn {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    _certs: tempfile::TempDir,
    client: kube::Client,
    server: svcplane_webhook::WebhookServer,
    ns: TestNamespace,
    other: TestNamespace,
}

async fn take_turn(scope: &str) -> Turn {
    let turn = POOLS.lock().await;
    let cp = control_plane();
    let client = cp.client().await;
    install_crd(&client).await;
    install_pool_crd(&client).await;
    let (certs, args) = serving_cert(cp);
    let (server, ns) = replica_for_scope(cp, &client, &args, scope).await;
    let other = scoped_namespace(&client, &format!("wh-{scope}-other"), scope).await;
    Turn { _turn: turn, _certs: certs, client, server, ns, other }
}

#[tokio::test]
async fn two_tenants_draw_from_their_pools_and_a_third_namespace_from_the_service_cidr_outside_them() {
    let turn = take_turn("tenants").await;
    let Turn { client, ns: ns_a, other: ns_c, .. } = &turn;
    let ns_b = scoped_namespace(client, "wh-tenant-b", "tenants").await;
    let labelled = serde_json::json!({"metadata": {"labels": {"tenant": "b"}}});
    Api::<Namespace>::all(client.clone())
        .patch(&ns_b.name, &PatchParams::default(), &Patch::Merge(&labelled))
        .await
        .expect("label tenant b");
    create_pool(client, "tenant-a", POOL_A, for_namespace(&ns_a.name)).await;
    let by_label =
        PoolLabelSelector { match_labels: [("tenant".into(), "b".into())].into(), ..Default::default() };
    let tenant_b = ServiceAllocation { namespace_selectors: vec![by_label], ..Default::default() };
    create_pool(client, "tenant-b", POOL_B, Some(tenant_b)).await;
    wait_pool_reserves(ns_c, "10.99.0.20", "tenant-a (10.99.0.16/28)").await;
    wait_pool_reserves(ns_c, "10.99.0.40", "tenant-b (10.99.0.32/28)").await;

    for (ns, pool) in [(ns_a, POOL_A), (&ns_b, POOL_B)] {
        for i in 0..3 {
            let created = ns.create(&mk_service(&format!("t-{i}"), "ClusterIP", &[(80, None)])).await;
            let ip = cluster_ip(&created);
            assert!(net(pool).contains(ip), "{}/t-{i} got {ip}, not from {pool}", ns.name);
        }
    }
    // The third namespace fills the ServiceCIDR outside the pools, never
    // taking a pool's address; the tenants still get theirs afterwards.
    let (ips, full) = fill(ns_c, "c").await;
    let in_pool: Vec<_> =
        ips.iter().filter(|ip| net(POOL_A).contains(**ip) || net(POOL_B).contains(**ip)).collect();
    assert_eq!(in_pool, Vec::<&IpAddr>::new(), "reserved for the tenants");
    assert!(ips.len() >= 20, "about 29 addresses lie outside the pools: {ips:?}");
    assert!(
        full.contains("spec.clusterIPs[0]: failed to allocate a ClusterIP: pool 10.99.0.0/26 is full"),
        "{full}"
    );
    let after = ns_a.create(&mk_service("t-late", "ClusterIP", &[(80, None)])).await;
    assert!(net(POOL_A).contains(cluster_ip(&after)), "{after:?}");

    delete_services(ns_c, "c", ips.len()).await;
    delete_pools(client, &["tenant-a", "tenant-b"]).await;
    turn.server.kill();
}

#[tokio::test]
async fn a_full_pool_is_denied_naming_the_pool_and_its_usage() {
    let turn = take_turn("full-pool").await;
    let Turn { client, ns: ns_a, other: ns_c, .. } = &turn;
    create_pool(client, "tenant-a", POOL_A, for_namespace(&ns_a.name)).await;
    wait_pool_reserves(ns_c, "10.99.0.20", "tenant-a (10.99.0.16/28)").await;

    let (ips, full) = fill(ns_a, "a").await;
    assert!(!ips.is_empty() && ips.iter().all(|ip| net(POOL_A).contains(*ip)), "{ips:?}");
    assert!(
        full.contains("spec.clusterIPs[0]: pool tenant-a (10.99.0.16/28) is full; 14 of 14 used"),
        "{full}"
    );
    // Not a full cluster: another namespace still gets an address.
    ns_c.create(&mk_service("outside", "ClusterIP", &[(80, None)])).await;
    // The repair leader warns on the ServiceIPPool itself (issue #19 item 3).
    let args = svcplane_webhook::WebhookArgs::default();
    repair_pass(client, &args, &mut args.usage_alerts().expect("thresholds")).await.expect("repair pass");
    let events = usage_events(client).await;
    let on_pool: Vec<_> = events.iter().filter(|e| e.0 == "ServiceIPPool/tenant-a").collect();
    assert_eq!(on_pool.len(), 1, "{events:?}");
    assert_eq!(
        (on_pool[0].1.as_str(), on_pool[0].2.split(':').next()),
        ("PoolUsageHigh", Some("pool tenant-a (10.99.0.16/28) is 100% used (14 of 14), over 95%")),
        "{events:?}"
    );
    // `svcplane ipam status` shows the pool, full, with what it selects.
    let (ok, stdout, stderr) =
        control_plane().run_cli(&svcplane_e2e::svcplane::svcplane_bin(), &["ipam", "status", "-o", "json"]);
    assert!(ok, "ipam status: {stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let row = rows.as_array().and_then(|rows| rows.iter().find(|r| r["source"] == "ServiceIPPool/tenant-a"));
    let row = row.unwrap_or_else(|| panic!("no row for the pool: {rows:#}"));
    assert_eq!(
        (&row["range"], &row["used"], &row["free"], &row["selects"]),
        (
            &serde_json::json!("10.99.0.16/28"),
            &serde_json::json!(14),
            &serde_json::json!(0),
            &serde_json::json!(format!("namespaces={}", ns_a.name))
        ),
        "{row:#}"
    );

    delete_services(ns_a, "a", ips.len()).await;
    delete_pools(client, &["tenant-a"]).await;
    turn.server.kill();
}

#[tokio::test]
async fn a_pool_added_at_runtime_is_used_and_one_removed_frees_its_range() {
    let turn = take_turn("runtime").await;
    let Turn { client, ns: ns_a, other: ns_c, .. } = &turn;
    dry_run_static(ns_c, "10.99.0.21").await.expect("no pool yet: anyone may ask for 10.99.0.21");

    create_pool(client, "tenant-a", POOL_A, for_namespace(&ns_a.name)).await;
    wait_pool_reserves(ns_c, "10.99.0.21", "tenant-a (10.99.0.16/28)").await;
    let created = ns_a.create(&mk_service("in-pool", "ClusterIP", &[(80, None)])).await;
    assert!(net(POOL_A).contains(cluster_ip(&created)), "{created:?}");
    // An address of the range that in-pool does not hold: it was given one at
    // random, 10.99.0.21 once in 14 (CI: "already allocated to .../in-pool").
    let free = if cluster_ip(&created).to_string() == "10.99.0.21" { "10.99.0.22" } else { "10.99.0.21" };

    delete_pools(client, &["tenant-a"]).await;
    eventually("the removed pool's range open to every Service", DEADLINE, || async {
        dry_run_static(ns_c, free).await
    })
    .await;
    turn.server.kill();
}

#[tokio::test]
async fn a_pool_outside_every_service_cidr_or_overlapping_another_gets_a_condition_saying_why() {
    let _turn = POOLS.lock().await;
    let cp = control_plane();
    let client = &cp.client().await;
    install_crd(client).await;
    install_pool_crd(client).await;
    let (_certs, args) = serving_cert(cp);
    create_pool(client, "p-ok", POOL_A, None).await;
    create_pool(client, "p-outside", "10.200.0.0/28", None).await;
    create_pool(client, "p-overlap", "10.99.0.20/30", None).await;
    // One pass of the leader's repair loop writes the conditions.
    repair_pass(client, &args, &mut args.usage_alerts().expect("thresholds")).await.expect("repair pass");

    let api: Api<ServiceIPPool> = Api::all(client.clone());
    let mut seen = Vec::new();
    for name in ["p-ok", "p-outside", "p-overlap"] {
        let pool = api.get(name).await.expect("get pool");
        let ready = pool.status.map(|s| s.conditions).unwrap_or_default();
        let ready = ready.into_iter().find(|c| c.type_ == "Ready").expect("a Ready condition");
        seen.push((name, ready.status, ready.reason, ready.message));
    }
    let expected = [
        ("p-ok", "True", "Allocating", "ClusterIPs are allocated from this pool".to_owned()),
        (
            "p-outside",
            "False",
            "OutsideServiceCIDR",
            format!("10.200.0.0/28 is not inside any ServiceCIDR ({CLUSTER_CIDR})"),
        ),
        ("p-overlap", "False", "Overlaps", "10.99.0.20/30 overlaps pool p-ok (10.99.0.16/28)".to_owned()),
    ];
    let expected: Vec<_> =
        expected.into_iter().map(|(n, s, r, m)| (n, s.to_owned(), r.to_owned(), m)).collect();
    assert_eq!(seen, expected);
    delete_pools(client, &["p-ok", "p-outside", "p-overlap"]).await;
}
