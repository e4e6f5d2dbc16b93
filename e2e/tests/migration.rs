//! Moving endpoints between kube-controller-manager and svcplane (issue 16), on a
//! real kube-apiserver + etcd + kube-controller-manager:
//!
//! 1. shadow: svcplane `--migration=shadow` agrees with kube-controller-manager on
//!    every Service, writes nothing, and `svcplane shadow report` says the same;
//!    a hand-edited kube-controller-manager slice shows as a difference naming
//!    the endpoint, until kube-controller-manager rewrites it;
//! 2. take-over while kube-controller-manager still runs its endpoint
//!    controllers (out of order): svcplane stops deleting (metric, Warning
//!    Event) and no Service ever lacks a ready endpoint;
//! 3. the proper take-over: kube-controller-manager without its endpoint
//!    controllers, then svcplane `--migration=take-over`: kube-controller-manager's
//!    slices go only once svcplane's are there, and none is left;
//! 4. hand-back: svcplane `--migration=hand-back`, kube-controller-manager with its
//!    endpoint controllers again: svcplane's slices go only once
//!    kube-controller-manager's agree, and none is left.
//!
//! The phases run in that order in one test: they restart kube-controller-manager
//! and each svcplane acts on every namespace. A watch on every EndpointSlice
//! checks, at each event, that every Service still has all its ready endpoints
//! from one manager or the other.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints},
    discovery::v1::EndpointSlice,
    events::v1::Event,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
    core::ObjectMeta,
    runtime::watcher::{self, watcher},
};
use serde_json::Value;
use svcplane_controller::{labels, migration::REASON_STILL_RUNNING};
use svcplane_e2e::{
    ControlPlane, ControlPlaneOptions, TestNamespace,
    fixtures::{ensure_node, mk_pod, mk_port, mk_service},
    shared_with,
    slices::{SVCPLANE, SVCPLANE_MIRROR, UPSTREAM, UPSTREAM_MIRROR},
    svcplane::{Svcplane, svcplane_bin},
    wait::eventually,
};

/// kube-controller-manager's endpoint controllers. Its `--controllers` is a
/// string slice, so this second `--controllers` flag adds to the harness's
/// (which names none of them): restarting with it turns them on, without it off.
const ENDPOINT_CONTROLLERS: &str =
    "--controllers=endpointslice-controller,endpoints-controller,endpointslice-mirroring-controller";

/// One step's deadline (kube-controller-manager restarts included).
const STEP: Duration = Duration::from_secs(60);

fn options() -> ControlPlaneOptions {
    let mut options =
        ControlPlaneOptions::default().with_controller_manager(&["garbage-collector-controller"]);
    options.controller_manager_args = vec![ENDPOINT_CONTROLLERS.to_owned()];
    options
}

fn endpoint_controllers(on: bool) -> Vec<String> {
    if on { vec![ENDPOINT_CONTROLLERS.to_owned()] } else { Vec::new() }
}

/// `namespace/name` of a Service.
type ServiceKey = String;

/// The ready addresses each test Service must always have (from one manager or
/// the other), by `namespace/name`.
type Expected = BTreeMap<ServiceKey, BTreeSet<String>>;

/// Creates a Service `web` (named target port; Pods ready and not ready on two
/// Nodes), optionally a headless `zk` (hostnames), and a selectorless `db` with
/// hand-written Endpoints; returns the ready addresses of each.
async fn services(ns: &TestNamespace, net: u8, headless: bool) -> Expected {
    let key = |name: &str| format!("{}/{name}", ns.name);
    let ip = |host: u8| format!("10.30.{net}.{host}");
    let mut expected = Expected::new();
    ns.create(&mk_service("web", &[("app", "web")], vec![mk_port("http", 80, "http")])).await;
    for (i, (node, ready)) in [("node-a", true), ("node-b", false), ("node-b", true)].into_iter().enumerate()
    {
        let host = i as u8 + 1;
        let pod = mk_pod(&format!("web-{i}"), &[("app", "web"), ("rev", "1")], node, &[("http", 8080)]);
        ns.running_pod(pod, &[&ip(host)], ready).await;
        if ready {
            expected.entry(key("web")).or_default().insert(ip(host));
        }
    }
    if headless {
        let mut zk = mk_service("zk", &[("app", "zk")], vec![mk_port("peer", 2888, "2888")]);
        zk.spec.as_mut().expect("spec").cluster_ip = Some("None".into());
        ns.create(&zk).await;
        for (i, ready) in [true, false].into_iter().enumerate() {
            let mut pod = mk_pod(&format!("zk-{i}"), &[("app", "zk")], "node-a", &[]);
            let spec = pod.spec.as_mut().expect("spec");
            (spec.hostname, spec.subdomain) = (Some(format!("zk-{i}")), Some("zk".into()));
            let host = 11 + i as u8;
            ns.running_pod(pod, &[&ip(host)], ready).await;
            if ready {
                expected.entry(key("zk")).or_default().insert(ip(host));
            }
        }
    }
    let db_ip = format!("192.0.2.{}", 100 + net);
    ns.create(&mk_service("db", &[], vec![mk_port("sql", 5432, "5432")])).await;
    ns.create(&Endpoints {
        metadata: ObjectMeta { name: Some("db".into()), ..Default::default() },
        subsets: Some(vec![EndpointSubset {
            addresses: Some(vec![EndpointAddress { ip: db_ip.clone(), ..Default::default() }]),
            ports: Some(vec![EndpointPort {
                name: Some("sql".into()),
                port: 5432,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }]),
    })
    .await;
    expected.insert(key("db"), BTreeSet::from([db_ip]));
    expected
}

/// Ready addresses of `slices` (a missing `ready` means ready).
fn ready_addresses<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> BTreeSet<String> {
    slices
        .into_iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter().cloned())
        .collect()
}

/// Who manages a slice: `Some(true)` kube-controller-manager, `Some(false)` svcplane.
fn is_upstream(slice: &EndpointSlice) -> Option<bool> {
    match slice.labels().get(labels::MANAGED_BY).map(String::as_str) {
        Some(UPSTREAM | UPSTREAM_MIRROR) => Some(true),
        Some(SVCPLANE | SVCPLANE_MIRROR) => Some(false),
        _ => None,
    }
}

/// Whether each manager's slices of `service` hold all of `want`: (kube-controller-manager, svcplane).
fn coverage(
    slices: &BTreeMap<(String, String), EndpointSlice>,
    service: &str,
    want: &BTreeSet<String>,
) -> (bool, bool) {
    let of = |upstream: bool| {
        let mine = slices.values().filter(|s| {
            let owner = format!(
                "{}/{}",
                s.namespace().unwrap_or_default(),
                s.labels().get(labels::SERVICE_NAME).cloned().unwrap_or_default()
            );
            owner == service && is_upstream(s) == Some(upstream)
        });
        ready_addresses(mine).is_superset(want)
    };
    (of(true), of(false))
}

/// What a [`Sampler`] saw.
#[derive(Debug, Default)]
struct Figures {
    /// Watch events checked.
    events: usize,
    /// Moments a Service had neither manager's slices with all its ready endpoints.
    gaps: Vec<String>,
    /// The longest such moment.
    longest_gap: Duration,
    /// The longest time one Service was served by both managers at once.
    longest_overlap: Duration,
}

#[derive(Default)]
struct Timeline {
    slices: BTreeMap<(String, String), EndpointSlice>,
    gap_since: BTreeMap<ServiceKey, Instant>,
    overlap_since: BTreeMap<ServiceKey, Instant>,
    figures: Figures,
}

impl Timeline {
    fn check(&mut self, expected: &Expected, at: Instant) {
        self.figures.events += 1;
        for (service, want) in expected {
            let (upstream, ours) = coverage(&self.slices, service, want);
            if upstream || ours {
                if let Some(since) = self.gap_since.remove(service) {
                    self.figures.longest_gap = self.figures.longest_gap.max(at - since);
                }
            } else if !self.gap_since.contains_key(service) {
                self.gap_since.insert(service.clone(), at);
                self.figures.gaps.push(format!("{service} lacks ready endpoints {want:?}"));
            }
            if upstream && ours {
                self.overlap_since.entry(service.clone()).or_insert(at);
            } else if let Some(since) = self.overlap_since.remove(service) {
                self.figures.longest_overlap = self.figures.longest_overlap.max(at - since);
            }
        }
    }
}

/// Watches every EndpointSlice and checks the `expected` Services after each event.
struct Sampler {
    timeline: Arc<Mutex<Timeline>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    async fn start(client: &Client, expected: Expected) -> Self {
        let timeline = Arc::new(Mutex::new(Timeline::default()));
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let api = Api::<EndpointSlice>::all(client.clone());
        let task = {
            let timeline = timeline.clone();
            tokio::spawn(async move {
                let mut synced = Some(synced_tx);
                let mut listing = BTreeMap::new();
                let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let at = Instant::now();
                    let mut t = timeline.lock().unwrap_or_else(|p| p.into_inner());
                    let id = |s: &EndpointSlice| (s.namespace().unwrap_or_default(), s.name_any());
                    match event {
                        watcher::Event::Init => listing.clear(),
                        watcher::Event::InitApply(s) => {
                            listing.insert(id(&s), s);
                        }
                        watcher::Event::InitDone => {
                            t.slices = std::mem::take(&mut listing);
                            if let Some(tx) = synced.take() {
                                let _ = tx.send(());
                            }
                        }
                        watcher::Event::Apply(s) => {
                            t.slices.insert(id(&s), s);
                        }
                        watcher::Event::Delete(s) => {
                            t.slices.remove(&id(&s));
                        }
                    }
                    if synced.is_none() {
                        t.check(&expected, at);
                    }
                }
            })
        };
        tokio::time::timeout(STEP, synced_rx).await.expect("slice watch listed").expect("slice watch");
        Self { timeline, task }
    }

    /// Stops watching; closes open gaps and overlaps now.
    fn stop(self) -> Figures {
        self.task.abort();
        let mut t = self.timeline.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let open_gap = t.gap_since.values().map(|since| now - *since).max().unwrap_or_default();
        let open_overlap = t.overlap_since.values().map(|since| now - *since).max().unwrap_or_default();
        let mut figures = std::mem::take(&mut t.figures);
        figures.longest_gap = figures.longest_gap.max(open_gap);
        figures.longest_overlap = figures.longest_overlap.max(open_overlap);
        figures
    }
}

/// Slices cluster-wide written by kube-controller-manager (`true`) or svcplane.
async fn slices_by(client: &Client, upstream: bool) -> Vec<String> {
    let managers = if upstream { [UPSTREAM, UPSTREAM_MIRROR] } else { [SVCPLANE, SVCPLANE_MIRROR] };
    let selector = format!("{} in ({},{})", labels::MANAGED_BY, managers[0], managers[1]);
    Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await
        .unwrap_or_else(|e| panic!("list slices: {e}"))
        .items
        .iter()
        .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
        .collect()
}

/// Waits until one manager's slices cover every expected Service.
async fn covered_by(client: &Client, expected: &Expected, upstream: bool) {
    let who = if upstream { "kube-controller-manager" } else { "svcplane" };
    eventually(&format!("{who}'s slices of every Service"), STEP, || async move {
        let slices: BTreeMap<(String, String), EndpointSlice> = Api::<EndpointSlice>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .into_iter()
            .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), s))
            .collect();
        let missing: Vec<&String> = expected
            .iter()
            .filter(|(service, want)| {
                let (theirs, ours) = coverage(&slices, service, want);
                !if upstream { theirs } else { ours }
            })
            .map(|(service, _)| service)
            .collect();
        if missing.is_empty() { Ok(()) } else { Err(format!("{missing:?}")) }
    })
    .await;
}

fn restart_controller_manager(cp: &ControlPlane, with_endpoint_controllers: bool) {
    cp.restart_controller_manager(&endpoint_controllers(with_endpoint_controllers))
        .unwrap_or_else(|e| panic!("restart kube-controller-manager: {e}"));
}

/// `svcplane shadow report <args> -o json`, parsed; the command must succeed.
fn shadow_report(cp: &ControlPlane, args: &[&str]) -> Vec<Value> {
    let (ok, stdout, stderr) =
        cp.run_cli(&svcplane_bin(), &[&["shadow", "report", "-o", "json"], args].concat());
    assert!(ok, "shadow report failed: {stderr}");
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("shadow report -o json is not JSON ({e}): {stdout}"))
}

/// `(service, controller, agrees)` of a report, sorted.
fn verdicts(report: &[Value]) -> Vec<(String, String, bool)> {
    let mut v: Vec<_> = report
        .iter()
        .map(|r| {
            (
                r["service"].as_str().unwrap_or_default().to_owned(),
                r["controller"].as_str().unwrap_or_default().to_owned(),
                r["agrees"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

async fn shadow_gauge(svcplane: &Svcplane, controller: &str, agreement: &str) -> f64 {
    let (controller, agreement) =
        (format!("controller=\"{controller}\""), format!("agreement=\"{agreement}\""));
    svcplane.metric_sum("svcplane_shadow_services", &[&controller, &agreement]).await
}

async fn stop(svcplane: Svcplane) {
    svcplane.terminate(Duration::from_secs(20)).await.expect("svcplane stopped");
}

/// Waits until the manager handing over (`to_upstream`: svcplane) has no slice
/// left and the other's cover every expected Service.
async fn handed_over(client: &Client, expected: &Expected, to_upstream: bool) {
    let from = if to_upstream { "svcplane" } else { "kube-controller-manager" };
    eventually(&format!("no {from} slice left"), STEP, || async {
        let left = slices_by(client, !to_upstream).await;
        if left.is_empty() { Ok(()) } else { Err(left) }
    })
    .await;
    covered_by(client, expected, to_upstream).await;
}

/// Stops svcplane and the sampler, prints the phase's figures and checks that no
/// Service ever lacked its ready endpoints.
async fn end_phase(phase: &str, started: Instant, svcplane: Svcplane, sampler: Sampler) {
    stop(svcplane).await;
    let figures = sampler.stop();
    print(phase, started.elapsed(), &figures);
    assert!(figures.gaps.is_empty(), "{phase}: {:?}", figures.gaps);
}

fn print(phase: &str, took: Duration, figures: &Figures) {
    eprintln!(
        "{phase}: {took:.1?}, {} slice events checked, gaps {} (longest {:?}), longest overlap of both managers {:.1?}",
        figures.events,
        figures.gaps.len(),
        figures.longest_gap,
        figures.longest_overlap
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_then_take_over_out_of_order_then_in_order_then_hand_back() {
    let cp = shared_with(options);
    let client = cp.client().await;
    ensure_node(&client, "node-a", "192.0.2.1", Some("zone-a")).await;
    ensure_node(&client, "node-b", "192.0.2.2", Some("zone-b")).await;
    let mut expected = Expected::new();

    // ---- 1. shadow ------------------------------------------------------------
    let started = Instant::now();
    let ns = TestNamespace::new(&client, "shadow").await;
    expected.extend(services(&ns, 1, true).await);
    covered_by(&client, &expected, true).await;
    let endpoints = ns.api::<Endpoints>();
    for (svc, ip) in [("web", "10.30.1.3"), ("zk", "10.30.1.11")] {
        eventually(&format!("kube-controller-manager's Endpoints {svc}"), STEP, || async {
            let found = format!("{:?}", endpoints.get_opt(svc).await);
            if found.contains(ip) { Ok(()) } else { Err(found) }
        })
        .await;
    }
    let shadow = cp.svcplane("shadow", &["--migration=shadow"]).await;
    // web and zk: slices and Endpoints; db: mirrored.
    for (controller, agree) in [("endpointslice", 2.0), ("endpoints", 2.0), ("mirroring", 1.0)] {
        eventually(&format!("shadow: {controller} agrees on {agree} Services"), STEP, || async {
            let got = (
                shadow_gauge(&shadow, controller, "agrees").await,
                shadow_gauge(&shadow, controller, "differs").await,
            );
            if got == (agree, 0.0) { Ok(()) } else { Err(got) }
        })
        .await;
    }
    // A Service created while svcplane shadows: kube-controller-manager's slices
    // and Endpoints may arrive after svcplane's first comparison, and their
    // events compare again (an Endpoints event queues the shadow Endpoints
    // controller too).
    let late = TestNamespace::new(&client, "shadow-late").await;
    late.create(&mk_service("late", &[("app", "late")], vec![mk_port("http", 80, "8080")])).await;
    late.running_pod(mk_pod("late-0", &[("app", "late")], "node-a", &[]), &["10.30.9.1"], true).await;
    for controller in ["endpointslice", "endpoints"] {
        eventually(&format!("shadow: {controller} agrees on 3 Services"), STEP, || async {
            let got = (
                shadow_gauge(&shadow, controller, "agrees").await,
                shadow_gauge(&shadow, controller, "differs").await,
            );
            if got == (3.0, 0.0) { Ok(()) } else { Err(got) }
        })
        .await;
    }
    let report = shadow_report(cp, &["-n", &ns.name]);
    let yes = |s: &str, c: &str| (s.to_owned(), c.to_owned(), true);
    let all_agree = vec![
        yes("db", "mirroring"),
        yes("web", "endpoints"),
        yes("web", "endpointslice"),
        yes("zk", "endpoints"),
        yes("zk", "endpointslice"),
    ];
    assert_eq!(verdicts(&report), all_agree, "{report:#?}");
    assert!(report.iter().all(|r| r["difference"].is_null()), "{report:#?}");
    let everywhere = shadow_report(cp, &["-A"]);
    assert!(report.iter().all(|r| everywhere.contains(r)), "-A misses some of -n:\n{everywhere:#?}");
    assert!(everywhere.iter().any(|r| r["namespace"] == late.name.as_str()), "{everywhere:#?}");
    let (ok, table, _) = cp.run_cli(&svcplane_bin(), &["shadow", "report", "-n", &ns.name]);
    assert!(ok && table.contains("AGREES") && table.ends_with("5 agree, 0 differ\n"), "{table}");
    assert_eq!(shadow.metric_sum("svcplane_changes_total", &[]).await, 0.0, "shadow mode wrote");
    assert!(slices_by(&client, false).await.is_empty(), "svcplane wrote slices in shadow mode");

    // kube-controller-manager rewrites a slice edited behind its back about a
    // second later (its slice tracker sees a generation it did not write), so
    // the edit is made while its endpoint controllers are off, and undone by
    // their first sync when they come back.
    restart_controller_manager(cp, false);
    let slices = ns.api::<EndpointSlice>();
    let web_slices = slices
        .list(&ListParams::default().labels(&format!(
            "{}=web,{}={UPSTREAM}",
            labels::SERVICE_NAME,
            labels::MANAGED_BY
        )))
        .await
        .expect("list web's slices")
        .items;
    let mut edited = web_slices
        .into_iter()
        .find(|s| ready_addresses([s]).contains("10.30.1.1"))
        .expect("10.30.1.1's slice");
    edited.endpoints.iter_mut().for_each(|e| e.retain(|e| !e.addresses.contains(&"10.30.1.1".to_owned())));
    slices.replace(&edited.name_any(), &PostParams::default(), &edited).await.expect("edit the slice");
    eventually("shadow: the edited Service differs", STEP, || async {
        let got = shadow_gauge(&shadow, "endpointslice", "differs").await;
        if got == 1.0 { Ok(()) } else { Err(got) }
    })
    .await;
    let report = shadow_report(cp, &["-n", &ns.name]);
    let web =
        report.iter().find(|r| r["service"] == "web" && r["controller"] == "endpointslice").expect("web");
    let difference = web["difference"].as_str().unwrap_or_default();
    assert!(
        web["agrees"] == false
            && difference.starts_with("only svcplane: ")
            && difference.contains("10.30.1.1 "),
        "{web:#}"
    );
    eprintln!("shadow report of the edited slice: {difference}");
    restart_controller_manager(cp, true);
    eventually("shadow: kube-controller-manager rewrote the slice, all agree again", STEP, || async {
        let report = shadow_report(cp, &["-n", &ns.name]);
        let gauge = shadow_gauge(&shadow, "endpointslice", "differs").await;
        if verdicts(&report) == all_agree && gauge == 0.0 { Ok(()) } else { Err((report, gauge)) }
    })
    .await;
    assert_eq!(shadow.metric_sum("svcplane_changes_total", &[]).await, 0.0, "shadow mode wrote");
    stop(shadow).await;
    eprintln!("shadow: {:.1?}", started.elapsed());

    // ---- 2. take-over while kube-controller-manager still runs them -----------
    let started = Instant::now();
    let ns = TestNamespace::new(&client, "early").await;
    expected.extend(services(&ns, 2, false).await);
    covered_by(&client, &expected, true).await;
    let sampler = Sampler::start(&client, expected.clone()).await;
    let svcplane = cp.svcplane("take-over-early", &["--migration=take-over"]).await;
    eventually("svcplane_takeover_blocked 1", STEP, || async {
        let got = svcplane.metric_sum("svcplane_takeover_blocked", &[]).await;
        if got == 1.0 { Ok(()) } else { Err(got) }
    })
    .await;
    let events = Api::<Event>::all(client.clone());
    let warning = eventually("a KubeControllerManagerStillRunning Warning", STEP, || async {
        let list = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        list.items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(REASON_STILL_RUNNING) && e.type_.as_deref() == Some("Warning")
            })
            .ok_or_else(|| "none yet".to_owned())
    })
    .await;
    let regarding = warning.regarding.clone().unwrap_or_default();
    let (kind, on) = (
        regarding.kind.unwrap_or_default(),
        format!("{}/{}", regarding.namespace.unwrap_or_default(), regarding.name.unwrap_or_default()),
    );
    eprintln!("take-over, out of order: Warning on {kind} {on}: {}", warning.note.unwrap_or_default());
    // The EndpointSlice controller's Events go on the Service, mirroring's on the Endpoints.
    assert!(["Service", "Endpoints"].contains(&kind.as_str()) && expected.contains_key(&on), "{kind} {on}");
    // Blocked: both managers keep their slices, so every Service ends up served by both.
    eventually("both managers' slices of every Service", STEP, || async {
        let slices = sampler.timeline.lock().unwrap_or_else(|p| p.into_inner()).slices.clone();
        // Each Service missing a manager, with (upstream's, svcplane's) coverage.
        let partial: Vec<(&String, (bool, bool))> = expected
            .iter()
            .map(|(s, want)| (s, coverage(&slices, s, want)))
            .filter(|(_, covered)| *covered != (true, true))
            .collect();
        if partial.is_empty() { Ok(()) } else { Err(format!("{partial:?}")) }
    })
    .await;
    assert_eq!(svcplane.metric_sum("svcplane_takeover_blocked", &[]).await, 1.0);
    end_phase("take-over, kube-controller-manager still running", started, svcplane, sampler).await;

    // ---- 3. take-over, in order ----------------------------------------------
    let started = Instant::now();
    let ns = TestNamespace::new(&client, "takeover").await;
    expected.extend(services(&ns, 3, true).await);
    covered_by(&client, &expected, true).await;
    restart_controller_manager(cp, false);
    let sampler = Sampler::start(&client, expected.clone()).await;
    let svcplane = cp.svcplane("take-over", &["--migration=take-over"]).await;
    handed_over(&client, &expected, false).await;
    assert_eq!(svcplane.metric_sum("svcplane_takeover_blocked", &[]).await, 0.0);
    end_phase("take-over", started, svcplane, sampler).await;

    // ---- 4. hand-back ---------------------------------------------------------
    let started = Instant::now();
    let sampler = Sampler::start(&client, expected.clone()).await;
    let svcplane = cp.svcplane("hand-back", &["--migration=hand-back"]).await;
    restart_controller_manager(cp, true);
    handed_over(&client, &expected, true).await;
    end_phase("hand-back", started, svcplane, sampler).await;
}

/// The sampler itself: a moment without either manager's ready endpoints is a
/// gap, and one with both an overlap.
#[test]
fn the_sampler_counts_a_moment_without_ready_endpoints_as_a_gap() {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    let slice = |name: &str, managed_by: &str, ready: bool| EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            labels: Some(BTreeMap::from([
                (labels::SERVICE_NAME.to_owned(), "web".to_owned()),
                (labels::MANAGED_BY.to_owned(), managed_by.to_owned()),
            ])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec!["10.0.0.1".into()],
            conditions: Some(EndpointConditions { ready: Some(ready), ..Default::default() }),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let expected = Expected::from([("ns/web".to_owned(), BTreeSet::from(["10.0.0.1".to_owned()]))]);
    let mut t = Timeline::default();
    let start = Instant::now();
    let key = |name: &str| ("ns".to_owned(), name.to_owned());
    t.slices.insert(key("kcm"), slice("kcm", UPSTREAM, true));
    t.check(&expected, start);
    t.slices.insert(key("ours"), slice("ours", SVCPLANE, true));
    t.check(&expected, start + Duration::from_millis(10));
    t.slices.remove(&key("kcm"));
    t.check(&expected, start + Duration::from_millis(30));
    assert!(t.figures.gaps.is_empty());
    assert_eq!(t.figures.longest_overlap, Duration::from_millis(20));
    t.slices.insert(key("ours"), slice("ours", SVCPLANE, false));
    t.check(&expected, start + Duration::from_millis(40));
    t.slices.insert(key("kcm"), slice("kcm", UPSTREAM_MIRROR, true));
    t.check(&expected, start + Duration::from_millis(45));
    assert_eq!(t.figures.gaps, ["ns/web lacks ready endpoints {\"10.0.0.1\"}"]);
    assert_eq!(t.figures.longest_gap, Duration::from_millis(5));
}
