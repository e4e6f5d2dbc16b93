//! kube-apiserver and etcd restarted under a running svcplane (issue 18, item 1).
//!
//! svcplane runs its controller, webhook and repair roles against the control
//! plane itself (no proxy). The test kills one component (SIGKILL) and starts it
//! again with the same flags, port and data: kube-apiserver at once, etcd after
//! 10 s during which kube-apiserver serves on without it. As soon as the API
//! answers again (svcplane's watches are still backing off), Pods become ready
//! or go away, a Service is deleted and another created. svcplane must converge:
//! each Service's slice and Endpoints hold exactly its Pods, one slice per Service
//! and none of the deleted one; the Service created after the restart gets its
//! ClusterIP from the webhook, held by no other Service; and no hot loop: syncs
//! during the restart stay bounded and stop once converged.
//!
//! Its own binary and control plane: a restart would fail any test sharing them.
//! The tests take turns, so one svcplane runs at a time (two would both write).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams},
};
use svcplane_e2e::{
    ControlPlane, HarnessError, TestNamespace,
    fixtures::{ensure_node, mk_pod, mk_port, mk_service, set_pod_ready},
    shared,
    slices::SVCPLANE,
    wait::eventually,
    webhook::{
        holders_of_values, install_crd, register, scoped_namespace, serving_cert, spawn_replica_process,
        wait_process_webhook_active,
    },
};
use svcplane_webhook::{AllocationClaim, Value};

/// Held by each test: one restart, and one svcplane, at a time.
static ONE_RESTART: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long etcd stays down: the outage is the input of the test.
const ETCD_DOWN: Duration = Duration::from_secs(10);

const ENDPOINTSLICE: &str = "controller=\"endpointslice\"";

#[tokio::test]
async fn svcplane_converges_and_allocates_after_a_kube_apiserver_restart() {
    restart_under_svcplane("apiserver", async |cp| {
        cp.stop_for_restart("kube-apiserver")?;
        cp.start_again("kube-apiserver").await
    })
    .await;
}

#[tokio::test]
async fn svcplane_converges_and_allocates_after_etcd_is_down_for_10s() {
    restart_under_svcplane("etcd", async |cp| {
        cp.stop_for_restart("etcd")?;
        // Not synchronisation: etcd staying down while kube-apiserver serves is
        // the fault under test.
        tokio::time::sleep(ETCD_DOWN).await;
        cp.start_again("etcd").await
    })
    .await;
}

/// Each Service's endpoints as `(address, ready)`: from svcplane's slices (and
/// how many slices), and from its Endpoints object.
type Observed = BTreeMap<String, (usize, BTreeSet<(String, bool)>, BTreeSet<(String, bool)>)>;

/// What svcplane has written in `ns`, by Service: every slice it manages and every
/// Endpoints object, so a slice or Endpoints of a deleted Service shows up too.
async fn observe(ns: &TestNamespace) -> Observed {
    let mut seen = Observed::new();
    let by_svcplane = format!("endpointslice.kubernetes.io/managed-by={SVCPLANE}");
    let slices = ns.api::<EndpointSlice>().list(&ListParams::default().labels(&by_svcplane)).await;
    for slice in slices.expect("list slices").items {
        let labels = slice.metadata.labels.unwrap_or_default();
        let service = labels.get("kubernetes.io/service-name").cloned().unwrap_or_default();
        let entry = seen.entry(service).or_default();
        entry.0 += 1;
        for endpoint in slice.endpoints.into_iter().flatten() {
            let ready = endpoint.conditions.and_then(|c| c.ready).unwrap_or(false);
            entry.1.extend(endpoint.addresses.into_iter().map(|a| (a, ready)));
        }
    }
    for endpoints in ns.api::<Endpoints>().list(&ListParams::default()).await.expect("list Endpoints").items {
        let entry = seen.entry(endpoints.metadata.name.unwrap_or_default()).or_default();
        for subset in endpoints.subsets.unwrap_or_default() {
            for (addresses, ready) in [(subset.addresses, true), (subset.not_ready_addresses, false)] {
                entry.2.extend(addresses.unwrap_or_default().into_iter().map(|a| (a.ip, ready)));
            }
        }
    }
    seen
}

/// One slice and the same endpoints in slice and Endpoints, per Service.
fn expected(services: &[(&str, &[(&str, bool)])]) -> Observed {
    let endpoints =
        |e: &[(&str, bool)]| e.iter().map(|(ip, ready)| (ip.to_string(), *ready)).collect::<BTreeSet<_>>();
    services.iter().map(|(name, e)| (name.to_string(), (1, endpoints(e), endpoints(e)))).collect()
}

async fn converges(ns: &TestNamespace, what: &str, want: Observed) {
    eventually(what, Duration::from_secs(120), || async {
        let seen = observe(ns).await;
        if seen == want { Ok(()) } else { Err(seen) }
    })
    .await;
}

/// Runs svcplane (controller, webhook and repair roles), converges, applies
/// `restart`, changes the cluster at once, and checks what the module says.
async fn restart_under_svcplane(
    name: &str,
    restart: impl AsyncFnOnce(&'static ControlPlane) -> Result<(), HarnessError>,
) {
    let _alone = ONE_RESTART.lock().await;
    let cp = shared();
    let client = cp.client().await;
    install_crd(&client).await;
    ensure_node(&client, "restart-node", "192.0.2.21", None).await;
    let ns = scoped_namespace(&client, &format!("restart-{name}"), name).await;
    let (_certs, webhook) = serving_cert(cp);
    let (sp, addr) =
        spawn_replica_process(cp, &format!("restart-{name}"), &webhook, "controller,webhook,repair").await;
    register(&client, cp, &format!("svcplane-restart-{name}"), addr, name).await;
    wait_process_webhook_active(&ns, &sp).await;

    let pod = |name: &str, app: &str| mk_pod(name, &[("app", app)], "restart-node", &[("http", 8080)]);
    for (svc, app) in [("web", "web"), ("gone", "gone")] {
        ns.create(&mk_service(svc, &[("app", app)], vec![mk_port("http", 80, "http")])).await;
    }
    ns.running_pod(pod("web-1", "web"), &["10.42.0.1"], true).await;
    ns.running_pod(pod("web-2", "web"), &["10.42.0.2"], false).await;
    ns.running_pod(pod("web-3", "web"), &["10.42.0.3"], true).await;
    ns.running_pod(pod("gone-1", "gone"), &["10.42.0.5"], true).await;
    ns.running_pod(pod("late-1", "late"), &["10.42.0.9"], true).await;
    let web_before: &[(&str, bool)] = &[("10.42.0.1", true), ("10.42.0.2", false), ("10.42.0.3", true)];
    let want = expected(&[("web", web_before), ("gone", &[("10.42.0.5", true)])]);
    converges(&ns, "svcplane's slices and Endpoints before the restart", want).await;
    let quiet = Duration::from_secs(2);
    let syncs_before =
        sp.metric_settles("syncs before", "svcplane_syncs_total", &[ENDPOINTSLICE], quiet).await;
    let services = Api::<Service>::all(client.clone()).list(&ListParams::default()).await.expect("list");

    let started = Instant::now();
    restart(cp).await.unwrap_or_else(|e| panic!("restart {name}: {e}"));
    let down = started.elapsed();
    let during = sp.metric_sum("svcplane_syncs_total", &[ENDPOINTSLICE]).await - syncs_before;
    // A re-list may sync each Service once; a hot loop would be many times that.
    let bound = services.items.len() as f64 + 2.0;
    assert!(
        during <= bound,
        "{during} syncs while {name} restarted for {down:?} (bound {bound}): a hot loop"
    );

    // The old clients' connections died with the apiserver: a new one.
    let ns = TestNamespace { name: ns.name.clone(), client: cp.client().await };
    set_pod_ready(&ns.api(), "web-2", true).await;
    ns.finish_pod_deletion("web-3").await;
    ns.api::<Service>().delete("gone", &DeleteParams::default()).await.expect("delete gone");
    let allocations = sp.metric_sum("svcplane_webhook_allocations_total", &[]).await;
    let late = ns.create(&mk_service("late", &[("app", "late")], vec![mk_port("http", 80, "http")])).await;

    let web_after: &[(&str, bool)] = &[("10.42.0.1", true), ("10.42.0.2", true)];
    let want = expected(&[("web", web_after), ("late", &[("10.42.0.9", true)])]);
    converges(&ns, &format!("svcplane converged after the {name} restart"), want).await;
    let back = started.elapsed() - down;
    println!("{name}: down {down:?}, {during} endpointslice syncs meanwhile, converged {back:?} after");

    // The webhook allocated late's ClusterIP and holds it in a claim.
    // (With blocks on, the claim is written right after the answer: poll.)
    let ip = late.spec.and_then(|s| s.cluster_ip).expect("late has a ClusterIP");
    let claim = Value::Ip(ip.parse().expect("an IP")).claim_name();
    let claims = Api::<AllocationClaim>::all(ns.client.clone());
    let claim = eventually("late's claim", Duration::from_secs(10), || async {
        claims.get(&claim).await.map_err(|e| e.to_string())
    })
    .await;
    assert_eq!((claim.spec.namespace, claim.spec.service), (ns.name.clone(), "late".to_owned()));
    let allocated = sp.metric_sum("svcplane_webhook_allocations_total", &[]).await - allocations;
    assert_eq!(allocated, 1.0, "the webhook allocated late's one ClusterIP");
    let services = Api::<Service>::all(ns.client.clone()).list(&ListParams::default()).await.expect("list");
    holders_of_values(&services.items);

    // No hot loop: once converged, nothing is synced again or left queued.
    sp.metric_settles("syncs after convergence", "svcplane_syncs_total", &[], quiet).await;
    assert_eq!(sp.metric_sum("svcplane_queue_depth", &[]).await, 0.0, "nothing left queued");
}
