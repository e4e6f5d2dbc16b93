//! Issue 18 item 5: ServiceCIDRs that change while the webhook runs, on a
//! real kube-apiserver with kube-controller-manager's service-cidr-controller
//! (it adds and removes the `networking.k8s.io/service-cidr-finalizer`).
//!
//! The cluster's own ServiceCIDR is a /28, so it fills quickly. The pools are
//! cluster-wide, so the tests take turns (`POOLS`), and each deletes its
//! Services and ServiceCIDRs before the next one fills the pools again.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::{ServiceCIDR, ServiceCIDRSpec};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::ObjectMeta;
use svcplane_e2e::webhook::*;
use svcplane_e2e::{ControlPlane, ControlPlaneOptions, TestNamespace, shared_with, wait::eventually};
use svcplane_webhook::{AllocationClaim, Owner, WebhookArgs, WebhookServer};

/// The `kubernetes` ServiceCIDR: 14 addresses, the `kubernetes` Service holds one.
const CLUSTER_CIDR: &str = "10.98.0.0/28";
const FINALIZER: &str = "networking.k8s.io/service-cidr-finalizer";
/// Watches (the webhook's and the apiserver's) deliver a ServiceCIDR change
/// within this; kube-controller-manager removes a finalizer 10 s after the
/// deletion once nothing holds an IP in it.
const DEADLINE: Duration = Duration::from_secs(60);

/// The tests change the cluster-wide pools: one at a time.
static POOLS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn control_plane() -> &'static ControlPlane {
    shared_with(|| {
        ControlPlaneOptions { service_cidrs: CLUSTER_CIDR.into(), ..Default::default() }
            .with_controller_manager(&["service-cidr-controller"])
    })
}

fn cluster_ip(svc: &Service) -> Ipv4Addr {
    let ip = svc.spec.as_ref().and_then(|s| s.cluster_ip.clone()).expect("a ClusterIP");
    ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"))
}

/// Whether `ip` lies in `first..=last`.
fn between(ip: Ipv4Addr, first: &str, last: &str) -> bool {
    let n = |s: &str| u32::from(s.parse::<Ipv4Addr>().expect("ip"));
    (n(first)..=n(last)).contains(&u32::from(ip))
}

async fn add_service_cidr(client: &kube::Client, name: &str, cidr: &str) {
    let object = ServiceCIDR {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        spec: Some(ServiceCIDRSpec { cidrs: Some(vec![cidr.into()]) }),
        ..Default::default()
    };
    let api: Api<ServiceCIDR> = Api::all(client.clone());
    api.create(&PostParams::default(), &object).await.unwrap_or_else(|e| panic!("create {name}: {e}"));
    // Protected from here on, as in a cluster whose controller manager runs.
    eventually("the service-cidr-controller's finalizer", DEADLINE, || async {
        let got = api.get(name).await.map_err(|e| e.to_string())?;
        if got.metadata.finalizers.unwrap_or_default().iter().any(|f| f == FINALIZER) {
            Ok(())
        } else {
            Err("no finalizer yet".to_owned())
        }
    })
    .await;
}

async fn delete_service_cidr(client: &kube::Client, name: &str) {
    Api::<ServiceCIDR>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete ServiceCIDR {name}: {e}"));
}

/// Creates dynamic ClusterIP Services `<prefix>-<i>` until a create fails:
/// the Services created and the failure.
async fn fill(ns: &TestNamespace, prefix: &str) -> (Vec<Service>, String) {
    let api: Api<Service> = ns.api();
    let mut created = Vec::new();
    for i in 0..64 {
        let svc = mk_service(&format!("{prefix}-{i}"), "ClusterIP", &[(80, None)]);
        match api.create(&PostParams::default(), &svc).await {
            Ok(svc) => created.push(svc),
            Err(error) => return (created, error.to_string()),
        }
    }
    panic!("64 ClusterIPs and no pool full in {}", ns.name);
}

fn names(services: &[Service]) -> Vec<String> {
    services.iter().filter_map(|s| s.metadata.name.clone()).collect()
}

/// Deletes the Services `names` and waits until their claims are gone from
/// the cluster and from `server`'s index, so the next test finds the pools
/// as they were.
async fn delete_services(ns: &TestNamespace, names: &[String], server: &WebhookServer) {
    let api: Api<Service> = ns.api();
    for name in names {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => panic!("delete Service {name}: {e}"),
        }
    }
    let theirs = |namespace: &str, service: &str| namespace == ns.name && names.iter().any(|n| n == service);
    let claims: Api<AllocationClaim> = Api::all(ns.client.clone());
    eventually("the deleted Services' values released", DEADLINE, || async {
        let listed = claims.list(&ListParams::default()).await.map_err(|e| e.to_string())?.items;
        let in_cluster = listed.iter().filter(|c| theirs(&c.spec.namespace, &c.spec.service)).count();
        let index = server.allocator.index();
        let in_index = index.claims().filter(|(_, c)| theirs(&c.owner.namespace, &c.owner.name)).count();
        let held = names
            .iter()
            .filter(|name| {
                let owner = Owner { namespace: ns.name.clone(), name: (*name).clone() };
                !index.service_values(&owner).is_empty()
            })
            .count();
        if in_cluster + in_index + held == 0 {
            Ok(())
        } else {
            Err(format!("{in_cluster} claimed, {in_index} in the index, {held} Services held"))
        }
    })
    .await;
}

/// A dry-run create of `svc` in `ns` fails with a message containing `text`.
async fn dry_run_denied(ns: &TestNamespace, svc: &Service, text: &str) {
    let api: Api<Service> = ns.api();
    let what = format!("a dry-run create denied with {text:?}");
    eventually(&what, DEADLINE, || async {
        match api.create(&PostParams { dry_run: true, ..Default::default() }, svc).await {
            Err(error) if error.to_string().contains(text) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// A real create of `svc` in `ns` (no webhook there: kube-apiserver alone)
/// fails with a message containing `text`. A create that succeeds (the
/// apiserver had not yet seen the change) is deleted and tried again.
async fn apiserver_refuses(ns: &TestNamespace, svc: &Service, text: &str) -> String {
    let api: Api<Service> = ns.api();
    let name = svc.metadata.name.clone().expect("name");
    let what = format!("kube-apiserver alone refusing with {text:?}");
    eventually(&what, DEADLINE, || async {
        match api.create(&PostParams::default(), svc).await {
            Err(error) if error.to_string().contains(text) => Ok(error.to_string()),
            Ok(_) => {
                api.delete(&name, &DeleteParams::default()).await.map_err(|e| e.to_string())?;
                Err("created".to_owned())
            }
            Err(error) => Err(error.to_string()),
        }
    })
    .await
}

/// One test's turn with the pools: a replica registered for its namespace.
/// Bind `_pools` and `_certs` by name: they must live until the test ends.
struct Turn {
    _pools: tokio::sync::MutexGuard<'static, ()>,
    _certs: tempfile::TempDir,
    client: kube::Client,
    args: WebhookArgs,
    server: WebhookServer,
    ns: TestNamespace,
}

/// Waits for the other tests to finish with the pools, then starts a replica
/// for a namespace of `scope`.
async fn take_turn(scope: &str) -> Turn {
    let pools = POOLS.lock().await;
    let cp = control_plane();
    let client = cp.client().await;
    install_crd(&client).await;
    let (certs, args) = serving_cert(cp);
    let (server, ns) = replica_for_scope(cp, &client, &args, scope).await;
    Turn { _pools: pools, _certs: certs, client, args, server, ns }
}

/// Fills the cluster's ServiceCIDR (the only one that gives values) from `ns`.
async fn fill_cluster_cidr(ns: &TestNamespace) -> Vec<Service> {
    let (services, full) = fill(ns, "fill").await;
    assert!(full.contains(&format!("failed to allocate a ClusterIP: pool {CLUSTER_CIDR} is full")), "{full}");
    services
}

/// Creates `svc` in `ns`, retrying until a ServiceCIDR just added has
/// reached both the webhook and kube-apiserver.
async fn create_once_it_fits(ns: &TestNamespace, svc: &Service) -> Service {
    let api: Api<Service> = ns.api();
    eventually("a ClusterIP from the added ServiceCIDR", DEADLINE, || async {
        api.create(&PostParams::default(), svc).await.map_err(|e| e.to_string())
    })
    .await
}

#[tokio::test]
async fn a_service_cidr_added_at_runtime_is_used_at_once_when_the_others_are_full() {
    let Turn { _pools, _certs, client, server, ns, .. } = take_turn("cidr-added").await;
    let mut services = fill_cluster_cidr(&ns).await;

    add_service_cidr(&client, "added", "10.98.1.0/28").await;
    let started = Instant::now();
    let after = create_once_it_fits(&ns, &mk_service("after", "ClusterIP", &[(80, None)])).await;
    let took = started.elapsed();
    assert!(between(cluster_ip(&after), "10.98.1.1", "10.98.1.14"), "{:?}", cluster_ip(&after));
    // A /28 has no static band: the dynamic pick may be any of its addresses.
    let wanted = if cluster_ip(&after).to_string() == "10.98.1.9" { "10.98.1.10" } else { "10.98.1.9" };
    let requested = ns.create(&with_cluster_ip("requested", wanted)).await;
    assert_eq!(cluster_ip(&requested).to_string(), wanted);
    println!("the added ServiceCIDR gave a ClusterIP {took:?} after its finalizer appeared");
    services.extend([after, requested]);

    delete_services(&ns, &names(&services), &server).await;
    delete_service_cidr(&client, "added").await;
    server.kill();
}

#[tokio::test]
async fn a_service_cidr_deleted_while_services_hold_ips_in_it_drains_until_they_are_gone() {
    let Turn { _pools, _certs, client, args, server, ns } = take_turn("cidr-deleted").await;
    let plain = TestNamespace::new(&client, "plain-cidr-deleted").await;
    let api: Api<Service> = ns.api();

    add_service_cidr(&client, "doomed", "10.98.2.0/28").await;
    create_once_it_fits(&ns, &with_cluster_ip("holder", "10.98.2.5")).await;
    delete_service_cidr(&client, "doomed").await;

    // No new value from it: a request for one is refused naming it, as
    // kube-apiserver alone refuses it (in its own words).
    let wanted = with_cluster_ip("wanted", "10.98.2.6");
    let ours = "10.98.2.6 is in 10.98.2.0/28, but ServiceCIDR doomed is being deleted: no new ClusterIP is \
                allocated from it";
    dry_run_denied(&ns, &wanted, ours).await;
    let theirs =
        apiserver_refuses(&plain, &wanted, "the provided network does not match the current range").await;
    println!("kube-apiserver alone: {theirs}");
    // Nor a dynamic one, though it has 13 free: only the cluster's /28 gives.
    let (filled, full) = fill(&ns, "fill").await;
    assert!(full.contains(&format!("failed to allocate a ClusterIP: pool {CLUSTER_CIDR} is full")), "{full}");
    assert!(filled.iter().all(|s| !between(cluster_ip(s), "10.98.2.0", "10.98.2.15")), "{filled:?}");
    apiserver_refuses(&plain, &mk_service("dynamic", "ClusterIP", &[(80, None)]), "range is full").await;

    // What it holds stays valid: the Service can change, and repair finds
    // nothing out of range while kube-controller-manager keeps the ServiceCIDR.
    let cidrs: Api<ServiceCIDR> = Api::all(client.clone());
    eventually("kube-controller-manager keeping it (Ready=False, Terminating)", DEADLINE, || async {
        let doomed = cidrs.get("doomed").await.map_err(|e| e.to_string())?;
        let conditions = doomed.status.and_then(|s| s.conditions).unwrap_or_default();
        let terminating = conditions.iter().any(|c| c.type_ == "Ready" && c.reason == "Terminating");
        if terminating { Ok(()) } else { Err(format!("{conditions:?}")) }
    })
    .await;
    let more_ports =
        serde_json::json!({"spec": {"ports": [{"name": "p80", "port": 80}, {"name": "p81", "port": 81}]}});
    let holder =
        api.patch("holder", &PatchParams::default(), &Patch::Merge(&more_ports)).await.expect("update");
    assert_eq!(cluster_ip(&holder).to_string(), "10.98.2.5");
    let plan =
        repair_pass(&client, &args, &mut args.usage_alerts().expect("thresholds")).await.expect("repair");
    let ours: Vec<_> = plan.out_of_range.iter().filter(|(_, owner, _)| owner.namespace == ns.name).collect();
    assert!(ours.is_empty(), "no false ClusterIPOutOfRange: {ours:?}");
    assert!(cidrs.get_opt("doomed").await.expect("get").is_some(), "kept while 10.98.2.5 is held");

    // Its last holder deleted, the ServiceCIDR goes, and so does the pool.
    let started = Instant::now();
    delete_services(&ns, &["holder".to_owned()], &server).await;
    eventually("the ServiceCIDR gone", DEADLINE, || async {
        match cidrs.get_opt("doomed").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!("ServiceCIDR gone {:?} after its last holder", started.elapsed());
    dry_run_denied(&ns, &wanted, "10.98.2.6 is not in range").await;

    delete_services(&ns, &names(&filled), &server).await;
    server.kill();
}

#[tokio::test]
async fn a_larger_service_cidr_added_to_extend_the_range_never_hands_out_an_ip_held_in_the_smaller() {
    let Turn { _pools, _certs, client, server, ns, .. } = take_turn("cidr-wider").await;
    let mut services = fill_cluster_cidr(&ns).await;

    // 10.98.0.0/27 contains the /28, whose 14 addresses are all held.
    add_service_cidr(&client, "wider", "10.98.0.0/27").await;
    let first = create_once_it_fits(&ns, &mk_service("wide-first", "ClusterIP", &[(80, None)])).await;
    let conflicts = server.metrics.claim_conflicts.get();
    let (rest, full) = fill(&ns, "wide").await;
    let wide: Vec<Service> = [first].into_iter().chain(rest).collect();
    let ips: std::collections::BTreeSet<Ipv4Addr> = wide.iter().map(cluster_ip).collect();
    assert_eq!((wide.len(), ips.len()), (16, 16), "the /27's 16 free addresses, each once: {ips:?}");
    assert!(ips.iter().all(|ip| between(*ip, "10.98.0.15", "10.98.0.30")), "{ips:?}");
    assert!(full.contains(&format!("pool {CLUSTER_CIDR},10.98.0.0/27 is full")), "{full}");
    assert_eq!(server.metrics.claim_conflicts.get(), conflicts, "no pick of a value already claimed");
    services.extend(wide);

    delete_services(&ns, &names(&services), &server).await;
    delete_service_cidr(&client, "wider").await;
    server.kill();
}
