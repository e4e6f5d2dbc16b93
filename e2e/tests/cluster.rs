//! svcplane as users run it: a real cluster on this machine (kubelet nodes in network
//! namespaces, containerd, kube-proxy in iptables mode on node 1 and nftables on node
//! 2, kube-scheduler, kube-controller-manager without its endpoint controllers, CoreDNS
//! behind kube-dns), svcplane deployed from its own image with
//! `manifests/overlays/local`, real Pods whose readiness comes from real probes.
//!
//! `make test-cluster` (root): `#[ignore]`d in a plain `cargo test`. One cluster for the
//! binary (or the one `make cluster` left running), one namespace per test. Tests that
//! disturb svcplane or a node take [`DISRUPTION`] exclusively; the others share it.

use std::{
    collections::BTreeSet,
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::FutureExt as _;
use k8s_openapi::api::{
    apps::v1::Deployment,
    coordination::v1::Lease,
    core::v1::{Endpoints, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
    events::v1::Event,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use svcplane_e2e::{
    certs::TestCa,
    cluster::{
        self, Cluster, SVCPLANE_NAMESPACE,
        migration::{
            KCM_WITH_ENDPOINT_CONTROLLERS, Migration, ShadowRow, kcm_without_endpoint_controllers,
            shadow_report, svcplane_leader_metrics,
        },
        timeline::{Interval, Owner, SliceSampler},
        traffic::{Load, Lookup},
        wait_available,
        workload::{
            client_pod, cluster_ip_service, endpoint_conditions, endpoint_is, fetch_through, from_json,
            headless_statefulset, http_get, namespace, pod_ip, pod_node, ready_pods, resolve_in, set_ready,
            testpod_deployment,
        },
    },
    slices::UPSTREAM,
    svcplane::try_sum_metric,
    wait::eventually,
};
use svcplane_webhook::AllocationClaim;
use tokio::sync::RwLock;

const SVCPLANE_SELECTOR: &str = "app.kubernetes.io/name=svcplane";
/// The label naming an EndpointSlice's manager.
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

/// Exclusive for tests that stop svcplane replicas or a node; shared for the rest.
static DISRUPTION: RwLock<()> = RwLock::const_new(());

/// Prints how long a test took when it ends (pass or fail): `make test-cluster`
/// shows each test's duration.
struct Timed(&'static str, Instant);

impl Drop for Timed {
    fn drop(&mut self) {
        eprintln!("[duration] {}: {:.1} s", self.0, self.1.elapsed().as_secs_f64());
    }
}

fn cluster() -> &'static Cluster {
    cluster::shared(env!("CARGO_BIN_EXE_svcplane-cluster"))
}

/// One client Pod per node (`client-1` on node 1, ...), Ready: requests through a
/// Service start in each kube-proxy mode.
async fn clients(client: &kube::Client, ns: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for node in &cluster().nodes {
        pods.create(&PostParams::default(), &client_pod(&format!("client-{}", node.index), &node.name))
            .await
            .unwrap_or_else(|e| panic!("create client on {}: {e}", node.name));
    }
    let mut ready = ready_pods(client, ns, "role=client", cluster().nodes.len()).await;
    ready.sort_by_key(|p| p.metadata.name.clone());
    ready
}

/// Service creates in `ns` until `stop`, from `workers` loops each at `per_second`:
/// (attempts, failures with their messages).
fn create_services_until(
    client: kube::Client,
    ns: String,
    prefix: &'static str,
    (workers, per_second): (usize, u32),
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    let loops: Vec<_> = (0..workers)
        .map(|worker| {
            let (api, stop): (Api<Service>, _) = (Api::namespaced(client.clone(), &ns), stop.clone());
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(Duration::from_millis(1000 / u64::from(per_second)));
                let (mut attempts, mut failures) = (0usize, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    ticker.tick().await;
                    let name = format!("{prefix}-{worker}-{attempts}");
                    let svc: Service = from_json(json!({
                        "metadata": { "name": name },
                        "spec": { "type": "NodePort", "ports": [{ "port": 80 }] },
                    }));
                    attempts += 1;
                    let started = Instant::now();
                    if let Err(e) = api.create(&PostParams::default(), &svc).await {
                        failures.push(format!("{name} after {:?}: {e}", started.elapsed()));
                    }
                }
                (attempts, failures)
            })
        })
        .collect();
    tokio::spawn(async move {
        let (mut attempts, mut failures) = (0, Vec::new());
        for task in loops {
            if let Ok((a, f)) = task.await {
                attempts += a;
                failures.extend(f);
            }
        }
        (attempts, failures)
    })
}

/// A Deployment `web` of `replicas` testpods (`container_extra` merged into the
/// container) behind a ClusterIP Service `web`: the Service's `IP:80` and the Ready Pods.
async fn web_behind_cluster_ip(
    client: &kube::Client,
    ns: &str,
    replicas: i32,
    container_extra: serde_json::Value,
) -> (String, Vec<Pod>) {
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &testpod_deployment("web", replicas, container_extra))
        .await
        .unwrap_or_else(|e| panic!("create Deployment web: {e}"));
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cluster_ip_service("web"))
        .await
        .unwrap_or_else(|e| panic!("create Service web: {e}"));
    let ip = svc.spec.and_then(|s| s.cluster_ip).unwrap_or_else(|| panic!("Service web has no ClusterIP"));
    let pods = ready_pods(client, ns, "app=web", replicas as usize).await;
    (format!("{ip}:80"), pods)
}

/// The leader's identity from the Lease: `POD_NAME_<per-process suffix>`.
async fn lease_holder(client: &kube::Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), SVCPLANE_NAMESPACE);
    leases.get("svcplane").await.ok()?.spec?.holder_identity.filter(|h| !h.is_empty())
}

/// The Pod of a Lease identity.
fn pod_of(identity: &str) -> &str {
    identity.split('_').next().unwrap_or_default()
}

fn answered_by(results: &[Result<String, String>]) -> Vec<String> {
    let mut names: Vec<String> = results.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
    names.sort();
    names.dedup();
    names
}

/// Requests an "only `name` answers" check makes. A Pod still in kube-proxy's
/// rules answers half of them; with 10, all ten went to the other Pod by chance
/// (1 in 1024 per poll) while kube-proxy had not synced yet, the poll passed,
/// and the check after it failed (CI, twice). With 30 that is 1 in 10^9.
const ONLY_ONE_ANSWERS: usize = 30;

/// Ok when [`ONLY_ONE_ANSWERS`] requests through `client` to `target` were all
/// answered by Pod `name`; else what answered.
async fn only_answers(client: &Pod, target: &str, name: &str) -> Result<(), Vec<Result<String, String>>> {
    let got = fetch_through(client, target, ONLY_ONE_ANSWERS).await;
    if got.iter().all(|r| r.as_deref() == Ok(name)) { Ok(()) } else { Err(got) }
}

#[tokio::test]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn svcplane_runs_two_ready_replicas_on_different_nodes_and_exactly_one_leads() {
    let _shared = DISRUPTION.read().await;
    let _timed =
        Timed("svcplane_runs_two_ready_replicas_on_different_nodes_and_exactly_one_leads", Instant::now());
    let started = Instant::now();
    let client = cluster().client().await;
    wait_available(&client, SVCPLANE_NAMESPACE, "svcplane", Duration::from_secs(120)).await.unwrap();
    let pods = ready_pods(&client, SVCPLANE_NAMESPACE, SVCPLANE_SELECTOR, 2).await;
    let nodes: std::collections::BTreeSet<String> = pods.iter().map(pod_node).collect();
    assert_eq!(nodes.len(), 2, "replicas share a node: {nodes:?}");
    let names: Vec<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();
    // Exactly one: a Lease has one holder; it must be one of the running replicas.
    let holder = eventually("one of the replicas holds the Lease", Duration::from_secs(30), || async {
        match lease_holder(&client).await {
            Some(h) if names.iter().any(|n| n == pod_of(&h)) => Ok(h),
            other => Err(format!("holder {other:?}, replicas {names:?}")),
        }
    })
    .await;
    // What the kubelet probes: each replica's /readyz on the health port is 200.
    for pod in &pods {
        let (status, body) =
            http_get(&format!("{}:8081", pod_ip(pod)), "/readyz", Duration::from_secs(5)).await.unwrap();
        assert_eq!(status, 200, "{:?} /readyz: {body}", pod.metadata.name);
    }
    eprintln!("svcplane 2/2 on {nodes:?}, leader {holder} ({:?})", started.elapsed());
}

#[tokio::test]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn a_replica_whose_allocation_index_is_not_built_is_not_ready() {
    let _shared = DISRUPTION.read().await;
    let _timed = Timed("a_replica_whose_allocation_index_is_not_built_is_not_ready", Instant::now());
    let client = cluster().client().await;
    let ns = namespace(&client, "unready").await;
    // svcplane's own Pod template (probes and all), as a webhook-only replica in a
    // namespace whose ServiceAccount may not list AllocationClaims: the index can
    // never be built, so the kubelet's readiness probe must never pass.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), SVCPLANE_NAMESPACE);
    let mut template = deployments.get("svcplane").await.unwrap().spec.template;
    let ca = TestCa::new().unwrap();
    let cert = ca.server(&["svcplane-unready"]).unwrap();
    let secret: Secret = from_json(json!({
        "metadata": { "name": "serving" },
        "stringData": { "tls.crt": cert.cert_pem, "tls.key": cert.key_pem },
    }));
    Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &secret).await.unwrap();
    let spec = template.spec.as_mut().unwrap();
    spec.service_account_name = None;
    spec.service_account = None;
    spec.affinity = None;
    spec.priority_class_name = None;
    spec.volumes = Some(vec![from_json(json!({ "name": "serving", "secret": { "secretName": "serving" } }))]);
    let container = &mut spec.containers[0];
    container.args = Some(
        [
            "run",
            "--roles=webhook",
            "--webhook-tls-cert-file=/serving/tls.crt",
            "--webhook-tls-key-file=/serving/tls.key",
        ]
        .map(String::from)
        .to_vec(),
    );
    container.volume_mounts = Some(vec![from_json(json!({ "name": "serving", "mountPath": "/serving" }))]);
    container.lifecycle = None;
    let mut labels = std::collections::BTreeMap::new();
    labels.insert("app".to_string(), "unready".to_string());
    template.metadata.get_or_insert_default().labels = Some(labels.clone());
    let unready: Deployment = from_json(json!({
        "metadata": { "name": "unready" },
        "spec": { "replicas": 1, "selector": { "matchLabels": labels }, "template": template },
    }));
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &unready)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Started, probed several times (period 5 s), never Ready.
    let pod = eventually("the replica started and probed three times", Duration::from_secs(90), || async {
        let list =
            pods.list(&ListParams::default().labels("app=unready")).await.map_err(|e| e.to_string())?;
        let pod = list.items.into_iter().next().ok_or("no Pod yet")?;
        let status = pod.status.clone().unwrap_or_default();
        let started_at = status
            .container_statuses
            .as_ref()
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref()?.running.as_ref()?.started_at.clone())
            .ok_or("not running")?;
        let running_for = age_of(&started_at.0);
        if running_for < Duration::from_secs(16) {
            return Err(format!("running for {running_for:?}"));
        }
        Ok(pod)
    })
    .await;
    assert!(
        !svcplane_e2e::cluster::workload::pod_ready(&pod),
        "a replica without an index is Ready: {:?}",
        pod.status
    );
    let (status, body) =
        http_get(&format!("{}:8081", pod_ip(&pod)), "/readyz", Duration::from_secs(5)).await.unwrap();
    assert_eq!(status, 503, "/readyz of a replica without an index: {body}");
    assert!(body.contains("webhook"), "/readyz should name the role that is not ready: {body}");
}

fn age_of(time: &k8s_openapi::jiff::Timestamp) -> Duration {
    let now = k8s_openapi::jiff::Timestamp::now();
    Duration::from_secs_f64((now.as_millisecond() - time.as_millisecond()).max(0) as f64 / 1000.0)
}

#[tokio::test]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn a_service_created_with_kubectl_gets_its_cluster_ip_and_node_port_from_svcplane() {
    let _shared = DISRUPTION.read().await;
    let _timed = Timed(
        "a_service_created_with_kubectl_gets_its_cluster_ip_and_node_port_from_svcplane",
        Instant::now(),
    );
    let cluster = cluster();
    let client = cluster.client().await;
    let ns = namespace(&client, "alloc").await;
    cluster.kubectl(&["create", "service", "nodeport", "web", "--tcp=80:8080", "-n", &ns]).unwrap();
    let svc = Api::<Service>::namespaced(client.clone(), &ns).get("web").await.unwrap();
    let spec = svc.spec.unwrap();
    let ip = spec.cluster_ip.unwrap();
    let node_port = spec.ports.unwrap()[0].node_port.unwrap();
    // With `--webhook-block-size` above 0 the claims of values handed out from
    // blocks are written right after the answer: poll.
    let claims: Api<AllocationClaim> = Api::all(client.clone());
    eventually("a claim for the ClusterIP and the nodePort", Duration::from_secs(15), || async {
        let held: Vec<(String, String)> = claims
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .into_iter()
            .filter(|c| c.spec.namespace == ns && c.spec.service == "web")
            .map(|c| (c.spec.kind, c.spec.value))
            .collect();
        let wanted = [("ClusterIP".to_owned(), ip.clone()), ("NodePort".to_owned(), node_port.to_string())];
        if wanted.iter().all(|w| held.contains(w)) { Ok(()) } else { Err(format!("claims: {held:?}")) }
    })
    .await;
}

#[tokio::test]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn endpoints_follow_real_readiness_probes_and_traffic_avoids_a_failing_pod() {
    let _shared = DISRUPTION.read().await;
    let _timed =
        Timed("endpoints_follow_real_readiness_probes_and_traffic_avoids_a_failing_pod", Instant::now());
    let client = cluster().client().await;
    let ns = namespace(&client, "probe").await;
    let clients = clients(&client, &ns).await;
    let (target, web) = web_behind_cluster_ip(&client, &ns, 2, json!({})).await;
    let (failing, healthy) = (&web[0], &web[1]);
    let failing_name = failing.metadata.name.clone().unwrap();
    let healthy_name = healthy.metadata.name.clone().unwrap();
    let both = {
        let mut v = vec![failing_name.clone(), healthy_name.clone()];
        v.sort();
        v
    };
    for c in &clients {
        eventually("both Pods answer through the ClusterIP", Duration::from_secs(30), || async {
            let got = answered_by(&fetch_through(c, &target, 20).await);
            if got == both { Ok(()) } else { Err(got) }
        })
        .await;
    }

    set_ready(failing, false).await;
    let flipped = Instant::now();
    let ip = pod_ip(failing);
    eventually("the failing Pod's endpoint turns not ready", Duration::from_secs(30), || {
        endpoint_is(&client, &ns, "web", &ip, |c| matches!(c, (false, false, false)))
    })
    .await;
    eprintln!("probe failed -> endpoint not ready in {:?}", flipped.elapsed());
    for c in &clients {
        // After kube-proxy's sync, no request reaches the failing Pod.
        eventually("kube-proxy drops the failing Pod", Duration::from_secs(30), || {
            only_answers(c, &target, &healthy_name)
        })
        .await;
        let got = fetch_through(c, &target, 50).await;
        assert!(
            got.iter().all(|r| r.as_deref() == Ok(healthy_name.as_str())),
            "from {:?} ({}) while {failing_name} fails its probe: {got:?}",
            c.metadata.name,
            pod_node(c)
        );
    }

    set_ready(failing, true).await;
    eventually("the endpoint turns ready again", Duration::from_secs(30), || {
        endpoint_is(&client, &ns, "web", &ip, |c| matches!(c, (true, true, false)))
    })
    .await;
    for c in &clients {
        eventually("both Pods answer again", Duration::from_secs(30), || async {
            let got = answered_by(&fetch_through(c, &target, 20).await);
            if got == both { Ok(()) } else { Err(got) }
        })
        .await;
    }
}

// Multi-threaded: the background traffic must run while the test blocks on kubectl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn a_rolling_update_under_traffic_fails_no_request() {
    let _shared = DISRUPTION.read().await;
    let _timed = Timed("a_rolling_update_under_traffic_fails_no_request", Instant::now());
    let client = cluster().client().await;
    let ns = namespace(&client, "rollout").await;
    let clients = clients(&client, &ns).await;
    // What users configure so a rollout drops nothing: a preStop pause longer than
    // the endpoint removal takes to reach kube-proxy (one request in ~500 000 failed
    // with 5 s on a loaded machine), then SIGTERM.
    let prestop = json!({ "lifecycle": { "preStop": { "sleep": { "seconds": 10 } } } });
    let (target, _) = web_behind_cluster_ip(&client, &ns, 4, prestop).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    for c in &clients {
        eventually("4 Pods answer through the ClusterIP", Duration::from_secs(30), || async {
            let got = answered_by(&fetch_through(c, &target, 40).await);
            if got.len() == 4 { Ok(()) } else { Err(got) }
        })
        .await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = clients
        .iter()
        .cloned()
        .map(|c| {
            let (stop, target) = (stop.clone(), target.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    results.extend(fetch_through(&c, &target, 10).await);
                }
                (c.metadata.name.clone().unwrap_or_default(), results)
            })
        })
        .collect();
    // Every slice event, as kube-proxy sees them: the fewest ready endpoints the
    // Service ever had during the rollout.
    let fewest_ready = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let slice_watch = {
        use futures::StreamExt as _;
        use kube::runtime::watcher::{Config, Event, watcher};
        type Slice = k8s_openapi::api::discovery::v1::EndpointSlice;
        let (api, fewest) = (Api::<Slice>::namespaced(client.clone(), &ns), fewest_ready.clone());
        tokio::spawn(async move {
            let ready = |s: &Slice| {
                s.endpoints
                    .iter()
                    .flatten()
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                    .count()
            };
            let mut ready_by_slice = std::collections::BTreeMap::<String, usize>::new();
            let mut events =
                std::pin::pin!(watcher(api, Config::default().labels("kubernetes.io/service-name=web")));
            while let Some(Ok(event)) = events.next().await {
                match event {
                    Event::Apply(s) | Event::InitApply(s) => {
                        ready_by_slice.insert(s.metadata.name.clone().unwrap_or_default(), ready(&s));
                    }
                    Event::Delete(s) => {
                        ready_by_slice.remove(&s.metadata.name.clone().unwrap_or_default());
                    }
                    _ => continue,
                }
                fewest.fetch_min(ready_by_slice.values().sum(), Ordering::Relaxed);
            }
        })
    };
    let restarted = Instant::now();
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "template": { "metadata": { "annotations": { "restartedAt": format!("{}", std::process::id()) } } } } })),
        )
        .await
        .unwrap();
    // Terminating endpoints are published as serving (not ready) while they drain.
    let mut saw_terminating_serving = false;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let endpoints = endpoint_conditions(&client, &ns, "web").await;
        saw_terminating_serving |=
            endpoints.values().any(|&(ready, serving, terminating)| terminating && serving && !ready);
        let done = wait_available(&client, &ns, "web", Duration::from_millis(1)).await.is_ok()
            && endpoints.len() == 4
            && endpoints.values().all(|&(ready, _, terminating)| ready && !terminating);
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "rollout not done in 180 s: {endpoints:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut failures = Vec::new();
    for task in traffic {
        let (from, results) = task.await.unwrap();
        total += results.len();
        failures.extend(results.into_iter().filter_map(|r| r.err()).map(|e| format!("{from}: {e}")));
    }
    slice_watch.abort();
    let fewest = fewest_ready.load(Ordering::Relaxed);
    eprintln!(
        "rolling update of 4 in {:?}: {total} requests, {} failed; fewest ready endpoints in any slice event: {fewest}",
        restarted.elapsed(),
        failures.len()
    );
    assert!(total > 100, "too little traffic to judge: {total}");
    assert!(failures.is_empty(), "{} of {total} requests failed: {failures:#?}", failures.len());
    assert!(saw_terminating_serving, "never saw a terminating endpoint published as serving");
    // maxUnavailable 25 % of 4: at least 3 ready at every moment kube-proxy sees.
    assert!(fewest >= 3, "the Service had {fewest} ready endpoints at one point of the rollout");
    // Once the rollout is over the old Pods' endpoints are gone.
    let now = ready_pods(&client, &ns, "app=web", 4).await;
    let ips: std::collections::BTreeSet<String> = now.iter().map(pod_ip).collect();
    let published: std::collections::BTreeSet<String> =
        endpoint_conditions(&client, &ns, "web").await.into_keys().collect();
    assert_eq!(published, ips);
}

#[tokio::test]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn a_statefulset_member_resolves_through_coredns_even_when_not_ready() {
    let _shared = DISRUPTION.read().await;
    let _timed = Timed("a_statefulset_member_resolves_through_coredns_even_when_not_ready", Instant::now());
    let client = cluster().client().await;
    let ns = namespace(&client, "sts").await;
    let clients = clients(&client, &ns).await;
    let (svc, set) = headless_statefulset("db", 2);
    Api::<Service>::namespaced(client.clone(), &ns).create(&PostParams::default(), &svc).await.unwrap();
    Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &set)
        .await
        .unwrap();
    let members = ready_pods(&client, &ns, "app=db", 2).await;
    let db1 = members.iter().find(|p| p.metadata.name.as_deref() == Some("db-1")).unwrap();
    set_ready(db1, false).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    eventually("db-1 not Ready", Duration::from_secs(30), || async {
        let p = pods.get("db-1").await.map_err(|e| e.to_string())?;
        if svcplane_e2e::cluster::workload::pod_ready(&p) { Err("still Ready".to_string()) } else { Ok(()) }
    })
    .await;
    for c in &clients {
        for member in &members {
            let name = member.metadata.name.clone().unwrap();
            let fqdn = format!("{name}.db.{ns}.svc.cluster.local");
            let ip = pod_ip(member);
            eventually(
                &format!("{fqdn} resolves to {ip} in {:?}", c.metadata.name),
                Duration::from_secs(30),
                || async {
                    let got = resolve_in(c, &fqdn).await?;
                    if got == [ip.clone()] { Ok(()) } else { Err(format!("{got:?}")) }
                },
            )
            .await;
        }
    }
    // The headless name lists every member, the not-ready one included.
    let all = format!("db.{ns}.svc.cluster.local");
    let mut want: Vec<String> = members.iter().map(pod_ip).collect();
    want.sort();
    let mut got = resolve_in(&clients[0], &all).await.unwrap();
    got.sort();
    assert_eq!(got, want, "{all}");
}

// Multi-threaded: the background traffic must run while the test blocks on kubectl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn the_standby_takes_over_when_the_leaders_container_is_killed() {
    let _exclusive = DISRUPTION.write().await;
    let _timed = Timed("the_standby_takes_over_when_the_leaders_container_is_killed", Instant::now());
    let cluster = cluster();
    let client = cluster.client().await;
    let ns = namespace(&client, "failover").await;
    let (_, web) = web_behind_cluster_ip(&client, &ns, 2, json!({})).await;
    wait_available(&client, SVCPLANE_NAMESPACE, "svcplane", Duration::from_secs(120)).await.unwrap();
    let leader = lease_holder(&client).await.expect("a leader");
    let pods: Api<Pod> = Api::namespaced(client.clone(), SVCPLANE_NAMESPACE);
    let leader_pod = pods.get(pod_of(&leader)).await.unwrap();
    let container_id = leader_pod.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0]
        .container_id
        .clone()
        .unwrap();
    let node = cluster.nodes.iter().find(|n| n.name == pod_node(&leader_pod)).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let load = create_services_until(client.clone(), ns.clone(), "during-kill", (2, 5), stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await; // traffic before the kill, not synchronisation
    let killed = Instant::now();
    node.kill_container(container_id.trim_start_matches("containerd://")).unwrap();
    // A live process leads again: the standby, or the killed container's restart
    // (a new process, so a new identity; it may win the race at the Lease's expiry).
    let new_leader = eventually("a live process holds the Lease", Duration::from_secs(40), || async {
        match lease_holder(&client).await {
            Some(h) if h != leader => Ok(h),
            other => Err(other),
        }
    })
    .await;
    let takeover = killed.elapsed();
    let which = if pod_of(&new_leader) == pod_of(&leader) {
        "the killed Pod's restarted container"
    } else {
        "the other replica"
    };
    eprintln!("leader {leader} killed; {new_leader} ({which}) took the Lease after {takeover:?}");
    assert!(takeover < Duration::from_secs(20), "takeover took {takeover:?} (lease duration 15 s)");
    // Slices keep following changes under the new leader.
    let ip = pod_ip(&web[0]);
    set_ready(&web[0], false).await;
    eventually("the new leader follows a readiness change", Duration::from_secs(30), || {
        endpoint_is(&client, &ns, "web", &ip, |c| matches!(c, (false, false, false)))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // traffic after the takeover, not synchronisation
    stop.store(true, Ordering::Relaxed);
    let (attempts, failures) = load.await.unwrap();
    eprintln!("Service creates during the leader kill: {attempts} attempted, {} failed", failures.len());
    for failure in &failures {
        eprintln!("  failed: {failure}");
    }
    wait_available(&client, SVCPLANE_NAMESPACE, "svcplane", Duration::from_secs(120)).await.unwrap();
}

// Multi-threaded: the background traffic must run while the test blocks on kubectl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn a_rollout_restart_of_svcplane_fails_no_service_create() {
    let _exclusive = DISRUPTION.write().await;
    let _timed = Timed("a_rollout_restart_of_svcplane_fails_no_service_create", Instant::now());
    let cluster = cluster();
    let client = cluster.client().await;
    let ns = namespace(&client, "restart").await;
    wait_available(&client, SVCPLANE_NAMESPACE, "svcplane", Duration::from_secs(120)).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = create_services_until(client.clone(), ns.clone(), "during-restart", (4, 10), stop.clone());
    let started = Instant::now();
    cluster.kubectl(&["rollout", "restart", "deployment/svcplane", "-n", SVCPLANE_NAMESPACE]).unwrap();
    cluster
        .kubectl(&["rollout", "status", "deployment/svcplane", "-n", SVCPLANE_NAMESPACE, "--timeout=240s"])
        .unwrap();
    wait_available(&client, SVCPLANE_NAMESPACE, "svcplane", Duration::from_secs(120)).await.unwrap();
    // The rollout is "done" while the old replicas still stop: keep creating until
    // they are gone and the webhook's slice lists only the new ones.
    let pods: Api<Pod> = Api::namespaced(client.clone(), SVCPLANE_NAMESPACE);
    eventually("the old replicas gone and unpublished", Duration::from_secs(120), || async {
        let list =
            pods.list(&ListParams::default().labels(SVCPLANE_SELECTOR)).await.map_err(|e| e.to_string())?;
        let ips: std::collections::BTreeSet<String> =
            list.items.iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).collect();
        let published: std::collections::BTreeSet<String> =
            endpoint_conditions(&client, SVCPLANE_NAMESPACE, "svcplane-webhook").await.into_keys().collect();
        if list.items.len() == 2 && published == ips {
            Ok(())
        } else {
            Err(format!("{} Pods, published {published:?}", list.items.len()))
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (attempts, failures) = load.await.unwrap();
    eprintln!(
        "rollout restart of svcplane in {:?}: {attempts} Service creates, {} failed",
        started.elapsed(),
        failures.len()
    );
    assert!(attempts >= 100, "too few creates to judge: {attempts}");
    assert!(failures.is_empty(), "{} of {attempts} creates failed: {failures:#?}", failures.len());
}

#[tokio::test]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn a_failed_node_loses_its_endpoints_and_gets_them_back() {
    let _exclusive = DISRUPTION.write().await;
    let _timed = Timed("a_failed_node_loses_its_endpoints_and_gets_them_back", Instant::now());
    let cluster = cluster();
    let client = cluster.client().await;
    let ns = namespace(&client, "nodefail").await;
    let clients = clients(&client, &ns).await;
    let (target, web) = web_behind_cluster_ip(&client, &ns, 2, json!({})).await;
    let failed = &cluster.nodes[0];
    let (lost, kept): (Vec<&Pod>, Vec<&Pod>) = web.iter().partition(|p| pod_node(p) == failed.name);
    assert_eq!((lost.len(), kept.len()), (1, 1), "one web Pod per node");
    let (lost_ip, kept_name) = (pod_ip(lost[0]), kept[0].metadata.name.clone().unwrap());
    let survivor = clients.iter().find(|c| pod_node(c) != failed.name).unwrap();

    let stopped = Instant::now();
    failed.stop_agents();
    // The node comes back whatever the checks while it is down find: left
    // down, it would fail every later test of the suite that needs two nodes.
    let while_down = async {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        eventually("kube-controller-manager marks the node not Ready", Duration::from_secs(90), || async {
            let node = nodes.get(&failed.name).await.map_err(|e| e.to_string())?;
            if cluster::node_ready(&node) { Err("still Ready".to_string()) } else { Ok(()) }
        })
        .await;
        eprintln!("node {} stopped -> not Ready after {:?}", failed.name, stopped.elapsed());
        eventually("the failed node's endpoint turns not ready", Duration::from_secs(90), || {
            endpoint_is(&client, &ns, "web", &lost_ip, |c| matches!(c, (false, _, false)))
        })
        .await;
        eprintln!("node {} stopped -> its endpoint not ready after {:?}", failed.name, stopped.elapsed());
        eventually("traffic goes to the other node's Pod only", Duration::from_secs(30), || {
            only_answers(survivor, &target, &kept_name)
        })
        .await;
        let got = fetch_through(survivor, &target, 30).await;
        if !got.iter().all(|r| r.as_deref() == Ok(kept_name.as_str())) {
            let conditions = endpoint_conditions(&client, &ns, "web").await;
            panic!(
                "the failed node's Pod answered: {got:?}; slice conditions (ready, serving, terminating) now: {conditions:?}"
            );
        }
    };
    let outcome = AssertUnwindSafe(while_down).catch_unwind().await;
    failed.restart_agents(&svcplane_e2e::bin_dir()).await.unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    eventually("the node's endpoint is ready again", Duration::from_secs(90), || {
        endpoint_is(&client, &ns, "web", &lost_ip, |c| matches!(c, (true, true, false)))
    })
    .await;
    eprintln!("node {} back -> endpoint ready after {:?}", failed.name, stopped.elapsed());
    wait_available(&client, SVCPLANE_NAMESPACE, "svcplane", Duration::from_secs(120)).await.unwrap();
}

#[tokio::test]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn svcplane_scaled_to_zero_fails_creates_by_name_and_recovers_by_itself() {
    let _exclusive = DISRUPTION.write().await;
    let _timed =
        Timed("svcplane_scaled_to_zero_fails_creates_by_name_and_recovers_by_itself", Instant::now());
    let cluster = cluster();
    let client = cluster.client().await;
    let ns = namespace(&client, "scale0").await;
    let clients = clients(&client, &ns).await;
    let (target, _) = web_behind_cluster_ip(&client, &ns, 2, json!({})).await;
    let ip = target.trim_end_matches(":80").to_string();
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let dns = format!("web.{ns}.svc.cluster.local");
    let endpoints_before = eventually("2 ready endpoints", Duration::from_secs(30), || async {
        let e = endpoint_conditions(&client, &ns, "web").await;
        if e.len() == 2 && e.values().all(|c| c.0) { Ok(e) } else { Err(e) }
    })
    .await;

    cluster.kubectl(&["scale", "deployment/svcplane", "-n", SVCPLANE_NAMESPACE, "--replicas=0"]).unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), SVCPLANE_NAMESPACE);
    eventually("no svcplane Pod left", Duration::from_secs(90), || async {
        let n = pods
            .list(&ListParams::default().labels(SVCPLANE_SELECTOR))
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        if n == 0 { Ok(()) } else { Err(format!("{n} left")) }
    })
    .await;
    let denied = services
        .create(&PostParams::default(), &cluster_ip_service("while-down"))
        .await
        .expect_err("a Service create must fail while no svcplane replica runs (failurePolicy Fail)");
    eprintln!("create while svcplane is at 0: {denied}");
    assert!(denied.to_string().contains("svcplane"), "the failure should name svcplane: {denied}");
    for excluded in ["kube-system", SVCPLANE_NAMESPACE] {
        let api: Api<Service> = Api::namespaced(client.clone(), excluded);
        let name = format!("scale0-{}", std::process::id());
        api.create(&PostParams::default(), &cluster_ip_service(&name))
            .await
            .unwrap_or_else(|e| panic!("{excluded} must be unaffected: {e}"));
        api.delete(&name, &DeleteParams::default()).await.unwrap();
    }
    assert_eq!(
        endpoint_conditions(&client, &ns, "web").await,
        endpoints_before,
        "endpoints changed while down"
    );
    for c in &clients {
        assert_eq!(
            resolve_in(c, &dns).await.unwrap(),
            std::slice::from_ref(&ip),
            "DNS while svcplane is at 0"
        );
        let got = fetch_through(c, &format!("{ip}:80"), 10).await;
        assert!(got.iter().all(Result::is_ok), "traffic while svcplane is at 0: {got:?}");
    }

    cluster.kubectl(&["scale", "deployment/svcplane", "-n", SVCPLANE_NAMESPACE, "--replicas=2"]).unwrap();
    let back = Instant::now();
    eventually("Service creates work again", Duration::from_secs(120), || async {
        services.create(&PostParams::default(), &cluster_ip_service("after-scale-up")).await.map(|_| ())
    })
    .await;
    eprintln!("svcplane scaled back: creates work after {:?}", back.elapsed());
    wait_available(&client, SVCPLANE_NAMESPACE, "svcplane", Duration::from_secs(120)).await.unwrap();
}

#[tokio::test]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn the_smoke_test_that_e2e_kind_runs_passes_on_the_local_cluster() {
    let _shared = DISRUPTION.read().await;
    let _timed = Timed("the_smoke_test_that_e2e_kind_runs_passes_on_the_local_cluster", Instant::now());
    let cluster = cluster();
    let kubeconfig = cluster.kubeconfig_path.display().to_string();
    let out = std::process::Command::new("bash")
        .arg(cluster::workspace_dir().join("e2e/cluster/smoke.sh"))
        .arg(format!("{} --kubeconfig {kubeconfig}", svcplane_e2e::bin_dir().join("kubectl").display()))
        .arg(format!("{} --kubeconfig {kubeconfig}", svcplane_e2e::svcplane::svcplane_bin().display()))
        .arg(svcplane_e2e::cluster::workload::TESTPOD_IMAGE)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "smoke.sh failed:\n{text}");
    assert!(text.contains("smoke test passed"), "{text}");
}

/// The runtime stage of the Dockerfile: (user, entrypoint, cmd, exposed ports).
fn dockerfile_runtime() -> (String, Vec<String>, Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(cluster::workspace_dir().join("Dockerfile")).expect("the Dockerfile");
    let runtime = text.rsplit("\nFROM ").next().expect("a FROM line");
    let field = |key: &str| {
        runtime.lines().rev().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or_default()
    };
    let list = |key: &str| serde_json::from_str::<Vec<String>>(field(key)).unwrap_or_default();
    let mut ports: Vec<String> = field("EXPOSE ").split_whitespace().map(|p| format!("{p}/tcp")).collect();
    ports.sort();
    (field("USER ").to_string(), list("ENTRYPOINT "), list("CMD "), ports)
}

#[test]
#[ignore = "needs the cluster images: make test-cluster"]
fn the_svcplane_image_runs_as_the_dockerfile_says() {
    let tar = cluster::default_images().join("svcplane-dev.tar");
    let read = |member: &str| {
        let out = std::process::Command::new("tar").arg("-xOf").arg(&tar).arg(member).output().unwrap();
        assert!(out.status.success(), "{}: {}", tar.display(), String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let manifest = read("manifest.json");
    let config = read(manifest[0]["Config"].as_str().unwrap())["config"].clone();
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
    };
    let mut ports: Vec<String> =
        config["ExposedPorts"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    ports.sort();
    let image = (
        config["User"].as_str().unwrap_or_default().to_string(),
        strings(&config["Entrypoint"]),
        strings(&config["Cmd"]),
        ports,
    );
    let dockerfile = dockerfile_runtime();
    assert!(
        !dockerfile.1.is_empty() && !dockerfile.3.is_empty(),
        "could not read the Dockerfile's runtime stage: {dockerfile:?}"
    );
    assert_eq!(image, dockerfile, "(user, entrypoint, cmd, ports) of the local image vs the Dockerfile");
    // What the overlay's `svcplane:dev` means to containerd.
    assert_eq!(manifest[0]["RepoTags"][0], "docker.io/library/svcplane:dev");
}

/// Puts endpoint ownership back to the cluster's default when a migration test
/// fails half-way, so the tests after it find svcplane owning endpoints.
struct RestoreOwnershipOnPanic(&'static Cluster);

impl Drop for RestoreOwnershipOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "restoring the default endpoint ownership: {}",
                self.0.restore_default_endpoint_ownership()
            );
        }
    }
}

/// Every slice of `service` is `owner`'s and together they list exactly `want` as
/// ready (`Err`: what they hold instead).
async fn owned_only_by(
    slices: &Api<EndpointSlice>,
    service: &str,
    owner: &Owner,
    want: &BTreeSet<String>,
) -> Result<(), String> {
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .map_err(|e| e.to_string())?;
    let owners: BTreeSet<Owner> = list.items.iter().map(Owner::of_slice).collect();
    let ready: BTreeSet<String> = list
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses.clone())
        .collect();
    if owners == BTreeSet::from([owner.clone()]) && &ready == want {
        Ok(())
    } else {
        Err(format!("{service}: owners {owners:?}, ready {ready:?} (want {owner:?} with {want:?})"))
    }
}

/// The sum of the leader's `name` samples matching `filters`; fails when the metric
/// is not exposed (never read as 0).
async fn leader_metric(client: &kube::Client, name: &str, filters: &[&str]) -> Result<f64, String> {
    let text = svcplane_leader_metrics(client).await?;
    try_sum_metric(&text, name, filters).ok_or_else(|| format!("the leader does not expose {name}"))
}

/// Issue 16 item 4: the whole cycle an operator runs, under traffic, from the
/// cluster's default (svcplane owns endpoints) back to it: hand-back to
/// kube-controller-manager, shadow (all agree; a hand-edited slice differs until
/// kube-controller-manager rewrites it), a take-over started while
/// kube-controller-manager still runs its endpoint controllers (blocked, undone),
/// the take-over done properly, and `--migration` off.
// Multi-threaded: the background traffic and slice watch run while the test blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the real cluster: make test-cluster"]
async fn endpoint_ownership_goes_to_kube_controller_manager_and_back_without_a_failed_request() {
    let _exclusive = DISRUPTION.write().await;
    let _timed = Timed(
        "endpoint_ownership_goes_to_kube_controller_manager_and_back_without_a_failed_request",
        Instant::now(),
    );
    let cluster = cluster();
    let _restore = RestoreOwnershipOnPanic(cluster);
    let client = cluster.client().await;
    let ns = namespace(&client, "migrate").await;
    let clients = clients(&client, &ns).await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    // One Service per controller: `web` (ClusterIP, 3 probed Pods: slices and
    // Endpoints), `hl` (headless, 2 Pods: what CoreDNS answers comes from its
    // slices) and `ext` (selectorless, a hand-written Endpoints listing web's Pods:
    // mirroring).
    // Probes that a loaded machine does not fail: a readiness flap is a real
    // change of the endpoints (CoreDNS then answers without the Pod), which this
    // test would count against the switch; probes themselves are another test's.
    let steady = json!({ "readinessProbe": {
        "httpGet": { "path": "/healthz", "port": "http" },
        "periodSeconds": 1,
        "timeoutSeconds": 5,
        "failureThreshold": 5,
        "successThreshold": 1,
    } });
    let (web_target, web) = web_behind_cluster_ip(&client, &ns, 3, steady.clone()).await;
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &testpod_deployment("hl", 2, steady))
        .await
        .unwrap();
    let hl: Service = from_json(json!({
        "metadata": { "name": "hl" },
        "spec": {
            "clusterIP": "None",
            "selector": { "app": "hl" },
            "ports": [{ "name": "http", "port": 80, "targetPort": "http" }],
        },
    }));
    services.create(&PostParams::default(), &hl).await.unwrap();
    let hl_pods = ready_pods(&client, &ns, "app=hl", 2).await;
    let ext: Service = from_json(json!({
        "metadata": { "name": "ext" },
        "spec": { "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    }));
    let ext_ip =
        services.create(&PostParams::default(), &ext).await.unwrap().spec.unwrap().cluster_ip.unwrap();
    let web_ips: BTreeSet<String> = web.iter().map(pod_ip).collect();
    let endpoints: Endpoints = from_json(json!({
        "metadata": { "name": "ext" },
        "subsets": [{
            "addresses": web_ips.iter().map(|ip| json!({ "ip": ip })).collect::<Vec<_>>(),
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        }],
    }));
    Api::<Endpoints>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &endpoints)
        .await
        .unwrap();
    let want: Vec<(&str, BTreeSet<String>)> = vec![
        ("web", web_ips.clone()),
        ("hl", hl_pods.iter().map(pod_ip).collect()),
        ("ext", web_ips.clone()),
    ];
    let owned_by = |owner: Owner| {
        let (slices, want) = (&slices, &want);
        async move {
            for (service, ips) in want {
                owned_only_by(slices, service, &owner, ips).await?;
            }
            Ok::<(), String>(())
        }
    };
    eventually("svcplane's slices of web, hl and ext", Duration::from_secs(60), || owned_by(Owner::Svcplane))
        .await;

    let ext_target = format!("{ext_ip}:80");
    let web_ip = web_target.trim_end_matches(":80").to_string();
    let lookups = vec![
        Lookup { name: format!("web.{ns}.svc.cluster.local"), want: BTreeSet::from([web_ip]) },
        Lookup { name: format!("hl.{ns}.svc.cluster.local"), want: want[1].1.clone() },
        Lookup { name: format!("ext.{ns}.svc.cluster.local"), want: BTreeSet::from([ext_ip.clone()]) },
    ];
    for c in &clients {
        for target in [&web_target, &ext_target] {
            eventually("requests through web and ext answer", Duration::from_secs(30), || async {
                let got = fetch_through(c, target, 10).await;
                if got.iter().all(Result::is_ok) { Ok(()) } else { Err(got) }
            })
            .await;
        }
        for lookup in &lookups {
            eventually("web, hl and ext resolve", Duration::from_secs(30), || async {
                let got: BTreeSet<String> = resolve_in(c, &lookup.name).await?.into_iter().collect();
                if got == lookup.want { Ok(()) } else { Err(format!("{}: {got:?}", lookup.name)) }
            })
            .await;
        }
    }

    let sampler = SliceSampler::start(&client, &ns, "default").await;
    let load = Load::start(&clients, &[web_target.clone(), ext_target.clone()], &lookups);
    let cycle = Instant::now();
    let mut took: Vec<(&str, Duration)> = Vec::new();
    let kcm_default = kcm_without_endpoint_controllers();

    // C. Hand-back: kube-controller-manager with its endpoint controllers (both now
    // write slices), then svcplane deletes its own once kube-controller-manager's agree.
    let phase = Instant::now();
    sampler.mark("hand-back");
    let restart = cluster.restart_controller_manager(KCM_WITH_ENDPOINT_CONTROLLERS).await.unwrap();
    eprintln!("kube-controller-manager restarted with its endpoint controllers in {restart:?}");
    let rollout = cluster.set_svcplane_migration(&client, Migration::HandBack).await.unwrap();
    eprintln!("svcplane rolled to --migration=hand-back in {rollout:?}");
    eventually("only kube-controller-manager's slices", Duration::from_secs(120), || {
        owned_by(Owner::KubeControllerManager)
    })
    .await;
    took.push(("hand-back", phase.elapsed()));
    sampler.mark("hand-back settled");

    // A. Shadow: svcplane writes nothing and reports kube-controller-manager agreeing.
    let phase = Instant::now();
    sampler.mark("shadow");
    cluster.set_svcplane_migration(&client, Migration::Shadow).await.unwrap();
    let expected_rows: BTreeSet<(String, String)> = [
        ("web", "endpointslice"),
        ("web", "endpoints"),
        ("hl", "endpointslice"),
        ("hl", "endpoints"),
        ("ext", "mirroring"),
    ]
    .iter()
    .map(|(s, c)| (s.to_string(), c.to_string()))
    .collect();
    let agreeing = || async {
        let rows = shadow_report(cluster)?;
        let mine: Vec<&ShadowRow> = rows.iter().filter(|r| r.namespace == ns).collect();
        let present: BTreeSet<(String, String)> =
            mine.iter().map(|r| (r.service.clone(), r.controller.clone())).collect();
        let differ: Vec<&ShadowRow> = rows.iter().filter(|r| !r.agrees).collect();
        let differs = leader_metric(&client, "svcplane_shadow_services", &["agreement=\"differs\""]).await?;
        let agrees = leader_metric(&client, "svcplane_shadow_services", &["agreement=\"agrees\""]).await?;
        if expected_rows.is_subset(&present) && differ.is_empty() && differs == 0.0 && agrees >= 5.0 {
            Ok((rows.len(), agrees))
        } else {
            Err(format!(
                "rows of {ns}: {mine:?}; disagreeing anywhere: {differ:?}; metric agrees {agrees} differs {differs}"
            ))
        }
    };
    let (rows, agrees) =
        eventually("the shadow report: every Service agrees", Duration::from_secs(60), agreeing).await;
    eprintln!("shadow: {rows} report rows, all agree; svcplane_shadow_services agrees {agrees}, differs 0");
    took.push(("shadow", phase.elapsed()));
    sampler.mark("shadow settled");

    // A divergent case: kube-controller-manager paused (it would rewrite its slice a
    // second later), one of its slices hand-edited to drop a ready endpoint.
    let phase = Instant::now();
    sampler.mark("shadow, divergent");
    cluster.restart_controller_manager(&kcm_default).await.unwrap();
    let theirs = slices
        .list(
            &ListParams::default().labels(&format!("kubernetes.io/service-name=web,{MANAGED_BY}={UPSTREAM}")),
        )
        .await
        .unwrap();
    let edited = theirs.items.iter().find(|s| s.endpoints.as_ref().is_some_and(|e| e.len() >= 2)).unwrap();
    let (edited_name, dropped) =
        (edited.metadata.name.clone().unwrap(), edited.endpoints.as_ref().unwrap()[0].addresses[0].clone());
    let patch = json!([
        { "op": "test", "path": "/endpoints/0/addresses/0", "value": dropped },
        { "op": "remove", "path": "/endpoints/0" },
    ]);
    cluster
        .kubectl(&[
            "patch",
            "endpointslice",
            &edited_name,
            "-n",
            &ns,
            "--type=json",
            "-p",
            &patch.to_string(),
        ])
        .unwrap();
    let difference =
        eventually("the shadow report shows web's slices differ", Duration::from_secs(60), || async {
            let rows = shadow_report(cluster)?;
            let row = rows
                .iter()
                .find(|r| r.namespace == ns && r.service == "web" && r.controller == "endpointslice")
                .ok_or("no row for web")?;
            let differs =
                leader_metric(&client, "svcplane_shadow_services", &["agreement=\"differs\""]).await?;
            match (&row.difference, row.agrees, differs >= 1.0) {
                (Some(d), false, true) if !d.is_empty() => Ok(d.clone()),
                _ => Err(format!("{row:?}, metric differs {differs}")),
            }
        })
        .await;
    eprintln!("shadow after removing {dropped} from {edited_name} by hand: {difference}");
    cluster.restart_controller_manager(KCM_WITH_ENDPOINT_CONTROLLERS).await.unwrap();
    eventually("kube-controller-manager rewrote its slice", Duration::from_secs(60), || {
        owned_only_by(&slices, "web", &Owner::KubeControllerManager, &web_ips)
    })
    .await;
    eventually("the shadow report agrees again", Duration::from_secs(60), agreeing).await;
    took.push(("shadow, divergent and back", phase.elapsed()));
    sampler.mark("shadow settled again");

    // Out of order: a take-over while kube-controller-manager still runs its
    // endpoint controllers. svcplane deletes its slices, it writes them again:
    // svcplane must notice and stop deleting.
    let phase = Instant::now();
    sampler.mark("take-over, out of order");
    // The Event names the first Service where svcplane saw kube-controller-manager
    // write again, in whichever namespace: any Event of this reason since now.
    let since = k8s_openapi::jiff::Timestamp::now().as_second() - 1;
    cluster.set_svcplane_migration(&client, Migration::TakeOver).await.unwrap();
    let events: Api<Event> = Api::all(client.clone());
    let (blocked, warned) =
        eventually("svcplane says the take-over is blocked", Duration::from_secs(90), || async {
            let blocked = leader_metric(&client, "svcplane_takeover_blocked", &[]).await?;
            let warned: Vec<String> = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("KubeControllerManagerStillRunning"))
                .filter(|e| e.metadata.creation_timestamp.as_ref().is_some_and(|t| t.0.as_second() >= since))
                .map(|e| {
                    let on = e.regarding.map(|r| {
                        format!("{}/{}", r.namespace.unwrap_or_default(), r.name.unwrap_or_default())
                    });
                    format!(
                        "{} on {}: {}",
                        e.type_.unwrap_or_default(),
                        on.unwrap_or_default(),
                        e.note.unwrap_or_default()
                    )
                })
                .collect();
            if blocked == 1.0 && !warned.is_empty() {
                Ok((blocked, warned))
            } else {
                Err(format!("blocked {blocked}, Events {warned:?}"))
            }
        })
        .await;
    eprintln!(
        "take-over out of order: svcplane_takeover_blocked {blocked}; KubeControllerManagerStillRunning Events {warned:?}"
    );
    let owners_now =
        sampler.with(|t| ["web", "hl", "ext"].map(|s| (s, t.owners(&format!("{ns}/{s}")))).to_vec());
    eprintln!("take-over out of order, once blocked: slice owners {owners_now:?}");
    // Undone: svcplane rolled to hand-back first, so that no replica deletes
    // anything any more (a standby of the take-over rollout that became leader
    // would not know the block and delete again), then kube-controller-manager
    // restarted with its endpoint controllers: a new process syncs every Service
    // and writes the slices svcplane deleted (the old one re-creates only those it
    // wrote itself); svcplane then deletes its own once they agree.
    cluster.set_svcplane_migration(&client, Migration::HandBack).await.unwrap();
    cluster.restart_controller_manager(KCM_WITH_ENDPOINT_CONTROLLERS).await.unwrap();
    eventually("only kube-controller-manager's slices again", Duration::from_secs(120), || {
        owned_by(Owner::KubeControllerManager)
    })
    .await;
    took.push(("take-over out of order, undone", phase.elapsed()));
    sampler.mark("undone");

    // B. Take-over: kube-controller-manager without its endpoint controllers, then
    // svcplane deletes its slices Service by Service once its own are written.
    let phase = Instant::now();
    sampler.mark("take-over");
    cluster.restart_controller_manager(&kcm_default).await.unwrap();
    cluster.set_svcplane_migration(&client, Migration::TakeOver).await.unwrap();
    eventually("only svcplane's slices", Duration::from_secs(120), || owned_by(Owner::Svcplane)).await;
    assert_eq!(leader_metric(&client, "svcplane_takeover_blocked", &[]).await.unwrap(), 0.0);
    took.push(("take-over", phase.elapsed()));
    sampler.mark("take-over settled");

    // Off: the cluster's default again.
    let phase = Instant::now();
    sampler.mark("off");
    cluster.set_svcplane_migration(&client, Migration::Off).await.unwrap();
    eventually("svcplane's slices after --migration off", Duration::from_secs(60), || {
        owned_by(Owner::Svcplane)
    })
    .await;
    took.push(("off", phase.elapsed()));
    sampler.mark("off settled");

    let traffic = load.stop().await;
    let now = Instant::now();
    let (summary, gaps, overlaps, events_seen) =
        sampler.with(|t| (t.summary(now), t.gaps().to_vec(), t.overlaps().to_vec(), t.events()));
    eprintln!(
        "migration cycle in {:?}: {}",
        cycle.elapsed(),
        took.iter().map(|(p, d)| format!("{p} {:.1} s", d.as_secs_f64())).collect::<Vec<_>>().join(", ")
    );
    eprintln!("slice events seen: {events_seen}; per phase:\n{summary}");
    eprintln!(
        "traffic: {} requests, {} failed; {} lookups, {} failed",
        traffic.requests,
        traffic.request_failures.len(),
        traffic.lookups,
        traffic.lookup_failures.len()
    );
    let watch_errors = sampler.errors();
    assert!(
        watch_errors.is_empty(),
        "the slice watch failed, its timeline may miss events: {watch_errors:?}"
    );
    assert!(traffic.requests > 1000 && traffic.lookups > 500, "too little traffic to judge: {traffic:?}");
    assert!(traffic.request_failures.is_empty(), "failed requests: {:#?}", traffic.request_failures);
    assert!(traffic.lookup_failures.is_empty(), "failed lookups: {:#?}", traffic.lookup_failures);
    assert!(gaps.is_empty(), "a Service with ready Pods had no ready endpoint: {gaps:?}");
    let switches = ["hand-back", "take-over, out of order", "take-over"];
    let stray: Vec<&Interval> =
        overlaps.iter().filter(|i| i.end.is_none() || !switches.contains(&i.phase.as_str())).collect();
    assert!(stray.is_empty(), "overlaps outside a switch or never ended: {stray:?}");
    for switch in ["hand-back", "take-over"] {
        let longest =
            sampler.with(|t| t.longest_overlap_in(switch, now).map(|i| (i.service.clone(), i.length(now))));
        assert!(longest.is_some(), "no overlap in {switch}: the two managers never both had slices?");
    }
    // The default state again: kube-controller-manager without its endpoint
    // controllers, svcplane without --migration, no kube-controller-manager slice.
    assert_eq!(cluster.controller_manager_controllers().unwrap(), kcm_default);
    let deployment =
        Api::<Deployment>::namespaced(client.clone(), SVCPLANE_NAMESPACE).get("svcplane").await.unwrap();
    let args = deployment.spec.template.spec.unwrap().containers[0].args.clone().unwrap_or_default();
    assert!(!args.iter().any(|a| a.starts_with("--migration")), "{args:?}");
}
