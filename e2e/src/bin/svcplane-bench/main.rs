//! `make bench`: svcplane against kube-controller-manager's endpoint controllers
//! (endpointslice + endpoints) on a control plane of the pinned version, with
//! Pods and Nodes as API objects whose status the benchmark patches (no
//! kubelet). A scenario whose change only turns Pods Ready keeps one control
//! plane for all its runs (see `Stage`); the others start a fresh one per run.
//!
//! Per scenario and side: time from the first change to convergence (both
//! EndpointSlices and Endpoints as desired), writes on endpointslices and endpoints
//! by verb as counted by kube-apiserver itself (`apiserver_request_total`), the
//! controller's CPU seconds during the change and peak RSS from /proc, the events
//! and bytes one EndpointSlice watcher received during the change (a raw watch of
//! every slice in protobuf, as kube-proxy and CoreDNS hold it, counted frame by
//! frame as it arrives), the p50/p99 latency from each changed Pod's Ready
//! (or its creation, where it is ready in the slice at once) to its endpoint
//! shown ready in a slice (as a JSON watch in the benchmark sees it, see
//! `observer`), and the svcplane/upstream ratios; the QPS floor for the throttled
//! runs: the busier controller's writes beyond its burst at its QPS (each
//! controller has its own token bucket, in kube-controller-manager and in
//! svcplane). Output: a markdown table on stdout and in
//! `bench/results/scenarios.md` with issue 20's goals stated as met or not
//! (`goals`), a ratio plot in `bench/results/ratios.svg`, and a reconcile
//! profile of svcplane from its own sync histograms.
//!
//! Scenarios (`scenario`): A (500 Services × 10 Pods turn Ready, at QPS 20 and
//! unthrottled), B (5000 × 1), a rolling update of 1000 Pods, a headless
//! StatefulSet, Node deletion; at SIG Scalability's limits: C (40 Services × 250
//! Pods turn Ready, at QPS 20 and unthrottled), a Deployment of 250 replicas
//! rolled with the default strategy, and 10k Services × 5 Pods over 5 namespaces
//! where a tenth of the Services' Pods turn Ready; then single-Pod latency under
//! churn.
//!
//! Each run's starting state is written by the controller at QPS 1000/2000
//! (after the previous run's slices and Endpoints are deleted and its change
//! undone); it is then restarted at the measured QPS and the change begins once
//! its initial sync has written nothing for 3 s. The single-Pod latency runs
//! use scenario B's objects, on its control plane.
//!
//! Scale: `BENCH_SCALE` (default 1.0) multiplies every object count, e.g. 0.1 for
//! a quick run. Usage: svcplane-bench [SCENARIO…] (default: all).

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::api::{
    core::v1::{Endpoints, Pod},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams},
};
use svcplane_e2e::{
    ControlPlane, ControlPlaneOptions, TestNamespace,
    fixtures::{ensure_node, set_pod_ready, set_pod_status},
    svcplane::{Svcplane, sum_metric},
};
mod goals;
mod observer;
mod scenario;

use observer::{Observer, Summary, quantile};
use scenario::{Scenario, ip};

/// How often convergence is checked (in the observer's stores).
const POLL: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug)]
enum Side {
    Upstream { qps: u32, burst: u32 },
    Svcplane { qps: u32, burst: u32 },
}

impl Side {
    fn name(self) -> String {
        match self {
            Side::Upstream { qps, burst } => format!("kube-controller-manager (QPS {qps}/{burst})"),
            Side::Svcplane { qps, burst } => format!("svcplane (QPS {qps}/{burst})"),
        }
    }

    fn qps_burst(self) -> (u32, u32) {
        match self {
            Side::Upstream { qps, burst } | Side::Svcplane { qps, burst } => (qps, burst),
        }
    }

    /// The same controller at QPS 1000/2000: it writes each scenario's starting
    /// state, which is not measured, so a large scenario does not spend minutes
    /// there at QPS 20.
    fn fast(self) -> Side {
        match self {
            Side::Upstream { .. } => Side::Upstream { qps: 1000, burst: 2000 },
            Side::Svcplane { .. } => Side::Svcplane { qps: 1000, burst: 2000 },
        }
    }

    fn managed_by(self) -> &'static str {
        match self {
            Side::Upstream { .. } => "endpointslice-controller.k8s.io",
            Side::Svcplane { .. } => "endpointslice-controller.svcplane.io",
        }
    }
}

/// One side's figures for one scenario.
struct Run {
    side: Side,
    converge_s: f64,
    writes: BTreeMap<String, f64>,
    cpu_s: f64,
    rss_mib: f64,
    watch: WatchCount,
    /// Per timed Pod, ms from its change to its endpoint shown ready; sorted.
    latencies_ms: Vec<f64>,
    profile: Option<String>,
}

/// What one EndpointSlice watcher received.
#[derive(Clone, Copy, Debug, Default)]
struct WatchCount {
    events: u64,
    bytes: u64,
}

/// A raw watch of every EndpointSlice from `resource_version` on, in protobuf as
/// kube-proxy asks for it (`application/vnd.kubernetes.protobuf;stream=watch`: each
/// event a 4-byte big-endian length, then the event). The counts grow as frames
/// arrive; abort the task to stop watching.
fn watch_slices(
    client: Client,
    resource_version: String,
    counts: Arc<std::sync::Mutex<WatchCount>>,
) -> tokio::task::JoinHandle<()> {
    use futures::AsyncReadExt as _;
    tokio::spawn(async move {
        let uri = format!(
            "/apis/discovery.k8s.io/v1/endpointslices?watch=true&allowWatchBookmarks=false&resourceVersion={resource_version}&timeoutSeconds=3600"
        );
        let request = http::Request::get(uri)
            .header("Accept", "application/vnd.kubernetes.protobuf;stream=watch")
            .body(Vec::new())
            .expect("watch request");
        let mut body = client.request_stream(request).await.unwrap_or_else(|e| panic!("watch slices: {e}"));
        let mut length = [0u8; 4];
        loop {
            if body.read_exact(&mut length).await.is_err() {
                return;
            }
            let n = u32::from_be_bytes(length) as usize;
            let mut frame = vec![0u8; n];
            if body.read_exact(&mut frame).await.is_err() {
                return;
            }
            let mut c = counts.lock().unwrap_or_else(|p| p.into_inner());
            c.events += 1;
            c.bytes += 4 + n as u64;
        }
    })
}

impl Run {
    fn total_writes(&self) -> f64 {
        self.writes.values().sum()
    }

    /// The least time the change can take at the controller's QPS: each
    /// controller has its own token bucket, so it is the busier controller's
    /// writes beyond its burst, at its QPS; none when unthrottled.
    fn floor_s(&self) -> Option<f64> {
        let (qps, burst) = self.side.qps_burst();
        if qps > 100 {
            return None;
        }
        let busiest = ["endpointslices", "endpoints"]
            .iter()
            .map(|res| {
                self.writes
                    .iter()
                    .filter(|(k, _)| k.starts_with(&format!("{res} ")))
                    .map(|(_, v)| v)
                    .sum::<f64>()
            })
            .fold(0.0, f64::max);
        Some((busiest - f64::from(burst)).max(0.0) / f64::from(qps))
    }
}

/// User + system CPU seconds and peak RSS (MiB) of a process, from /proc.
fn proc_usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the parenthesised command name, utime and stime are fields 12 and 13.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, hwm_kib / 1024.0)
}

/// Writes on endpointslices and endpoints, by resource and verb.
async fn writes(client: &Client) -> BTreeMap<String, f64> {
    let req = http::Request::get("/metrics").body(Vec::new()).expect("request");
    let text = client.request_text(req).await.unwrap_or_else(|e| panic!("apiserver /metrics: {e}"));
    let mut out = BTreeMap::new();
    for resource in ["endpointslices", "endpoints"] {
        for verb in ["POST", "PUT", "PATCH", "DELETE"] {
            let n = sum_metric(
                &text,
                "apiserver_request_total",
                &[&format!("resource=\"{resource}\""), &format!("verb=\"{verb}\"")],
            );
            out.insert(format!("{resource} {verb}"), n);
        }
    }
    out
}

/// A control plane holding one scenario's objects. A scenario whose change can
/// be undone ([`Scenario::reusable`]) keeps its stage for all its runs (both
/// sides, throttled and unthrottled): its objects are written once, and each
/// run starts from them with the change undone and the previous controller's
/// slices and Endpoints deleted, so every controller writes its starting state
/// itself as on a fresh control plane. At 10k Services this saves the ~110 000
/// requests of a second set-up; the later runs share etcd with the earlier
/// ones' deleted objects, which only costs them.
struct Stage {
    scenario: Scenario,
    cp: ControlPlane,
    client: Client,
    nss: Vec<TestNamespace>,
    /// The svcplane process, when svcplane is the controller running.
    svcplane: Option<Svcplane>,
    /// Whether the Pods the change flips are Ready now; `None` when some are
    /// and some not (the latency runs flip them).
    flipped: Option<bool>,
}

impl Stage {
    /// The stage in `slot` if it holds `scenario` and can be reused; otherwise a
    /// fresh control plane (the old one stops) with the scenario's objects and
    /// no controller running.
    async fn open(slot: &mut Option<Stage>, scenario: Scenario) -> &mut Stage {
        let reuse = scenario.reusable() && slot.as_ref().is_some_and(|s| s.scenario == scenario);
        if !reuse {
            *slot = None;
            // kube-controller-manager is configured in every stage, so either
            // side can run on it; it runs only when a side hands to it.
            let options = ControlPlaneOptions::default()
                .with_controller_manager(&["endpointslice-controller", "endpoints-controller"]);
            let cp = ControlPlane::start(options).await.unwrap_or_else(|e| panic!("{e}"));
            cp.stop_for_restart("kube-controller-manager").unwrap_or_else(|e| panic!("{e}"));
            let client = cp.client().await;
            ensure_node(&client, "node-a", "192.0.2.1", None).await;
            let nss = scenario::namespaces(&client, scenario.namespaces()).await;
            scenario.setup(&nss).await;
            *slot = Some(Stage { scenario, cp, client, nss, svcplane: None, flipped: Some(false) });
        }
        slot.as_mut().expect("stage just set")
    }

    /// Stops the running controller, brings the flipped Pods to `flipped`,
    /// deletes what an earlier controller wrote, and starts `side` at QPS
    /// 1000/2000 to write the starting state; returns its observer once `ready`
    /// holds on it.
    async fn hand_to(
        &mut self,
        side: Side,
        flipped: bool,
        ready: impl Fn(&Summary) -> bool,
    ) -> Arc<Observer> {
        self.stop_controller();
        if self.flipped != Some(flipped) {
            self.scenario.set_flipped(&self.nss, flipped).await;
            self.flipped = Some(flipped);
        }
        // Nothing to delete on a fresh stage: two requests per namespace.
        let (dp, lp) = (DeleteParams::default(), ListParams::default());
        for ns in &self.nss {
            ns.api::<EndpointSlice>().delete_collection(&dp, &lp).await.expect("delete the slices");
            ns.api::<Endpoints>().delete_collection(&dp, &lp).await.expect("delete the Endpoints");
        }
        let observer = Arc::new(Observer::start(&self.client, side.managed_by()).await);
        self.switch_to(side.fast()).await;
        wait_for(&observer, side, "the starting state", ready).await;
        observer
    }

    fn stop_controller(&mut self) {
        if let Some(old) = self.svcplane.take() {
            old.kill();
        }
        // Not running is fine: the stage may have none yet.
        let _ = self.cp.stop_for_restart("kube-controller-manager");
    }

    /// Restarts the controller under test at `side`'s QPS (it rebuilds its
    /// caches and finds everything written, as `controller_restart` proves for
    /// svcplane); returns its pid.
    async fn switch_to(&mut self, side: Side) -> u32 {
        self.stop_controller();
        let (qps, burst) = side.qps_burst();
        let (qps, burst) = (format!("--kube-api-qps={qps}"), format!("--kube-api-burst={burst}"));
        match side {
            Side::Svcplane { .. } => {
                // BENCH_SVCPLANE_ARGS: extra flags for the measured svcplane, to compare settings.
                let extra = std::env::var("BENCH_SVCPLANE_ARGS").unwrap_or_default();
                let mut args = vec!["--controllers=endpointslice,endpoints", qps.as_str(), burst.as_str()];
                args.extend(extra.split_whitespace());
                let s = self.cp.svcplane("bench", &args).await;
                let pid = s.pid();
                self.svcplane = Some(s);
                pid
            }
            Side::Upstream { .. } => {
                self.cp.restart_controller_manager(&[qps, burst]).unwrap_or_else(|e| panic!("{e}"));
                self.cp.pids().into_iter().find(|(n, _)| n == "kube-controller-manager").map_or(0, |(_, p)| p)
            }
        }
    }
}

/// Waits until no endpoint write has happened for 3 s (the restarted controller
/// has finished its initial sync), at most 10 minutes.
async fn settle(client: &Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut last = writes(client).await;
    let mut quiet_since = tokio::time::Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(3) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = writes(client).await;
        if now != last {
            last = now;
            quiet_since = tokio::time::Instant::now();
        }
    }
}

async fn wait_for(observer: &Observer, side: Side, what: &str, ok: impl Fn(&Summary) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(900);
    loop {
        let s = observer.summary();
        if ok(&s) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} never reached {what}: {s:?}", side.name());
        tokio::time::sleep(POLL).await;
    }
}

async fn run(slot: &mut Option<Stage>, scenario: Scenario, side: Side) -> Run {
    let stage = Stage::open(slot, scenario).await;
    let observer = stage.hand_to(side, false, |s| scenario.started(s)).await;
    let pid = stage.switch_to(side).await;
    let (client, nss) = (stage.client.clone(), stage.nss.clone());
    settle(&client).await;
    let writes_before = writes(&client).await;
    let (cpu_before, _) = proc_usage(pid);
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let from = slices
        .list_metadata(&ListParams::default().limit(1))
        .await
        .ok()
        .and_then(|l| l.metadata.resource_version)
        .expect("a resourceVersion to watch from");
    let counts = Arc::new(std::sync::Mutex::new(WatchCount::default()));
    let watcher = watch_slices(client.clone(), from, counts.clone());

    let start = tokio::time::Instant::now();
    let change = scenario.change(&nss, &observer);
    let converge = wait_for(&observer, side, "convergence", |s| scenario.converged(s));
    let ((), ()) = tokio::join!(change, converge);
    let converge_s = start.elapsed().as_secs_f64();

    let (cpu_after, rss_mib) = proc_usage(pid);
    // The last writes' events are on their way to the watchers: wait until the raw
    // watcher's count holds still for a second (the data is in; nothing
    // synchronises the controller) and the observer has seen every timed Pod.
    let mut last = *counts.lock().unwrap_or_else(|p| p.into_inner());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = *counts.lock().unwrap_or_else(|p| p.into_inner());
        let seen_all = observer.timed_pending() == 0 || tokio::time::Instant::now() > deadline;
        if now.events == last.events && seen_all {
            break;
        }
        last = now;
    }
    watcher.abort();
    let watch = last;
    let (latencies_ms, unseen) = observer.take_latencies();
    assert_eq!(unseen, 0, "{}: {unseen} changed Pods never seen ready", side.name());
    stage.flipped = Some(true);
    let after = writes(&client).await;
    let writes =
        after.iter().map(|(k, v)| (k.clone(), v - writes_before.get(k).copied().unwrap_or(0.0))).collect();
    let profile = match &stage.svcplane {
        Some(s) => Some(sync_profile(&s.metrics_text().await)),
        None => None,
    };
    Run { side, converge_s, writes, cpu_s: cpu_after - cpu_before, rss_mib, watch, latencies_ms, profile }
}

/// Reconcile counts and time per controller from svcplane's own histograms.
fn sync_profile(metrics: &str) -> String {
    let mut out = String::new();
    for c in ["endpointslice", "endpoints"] {
        let f = format!("controller=\"{c}\"");
        let count = sum_metric(metrics, "svcplane_sync_duration_seconds_count", &[&f]);
        let sum = sum_metric(metrics, "svcplane_sync_duration_seconds_sum", &[&f]);
        let stale = sum_metric(metrics, "svcplane_stale_cache_skips_total", &[&f]);
        let _ = write!(
            out,
            "{c}: {count:.0} reconciles, {:.1} s in reconciles (mean {:.2} ms, including API writes), {stale:.0} stale-cache retries; ",
            sum,
            if count > 0.0 { sum / count * 1000.0 } else { 0.0 }
        );
    }
    out
}

/// What [`latency`] measured.
struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    /// Controller CPU during the churn and trials divided by the Pod events it
    /// saw (every readiness patch), in ms: flat from 100 to 5000 Services when
    /// the cost of a Pod event does not grow with the namespace.
    cpu_per_event_ms: f64,
}

/// Single-Pod latency under load: S Services of one ready Pod each, a background
/// churn of readiness flips, and trials of one Pod's Ready patch until its slice
/// shows it ready; also the controller's CPU per Pod event over the same period.
/// The Services and Pods are scenario B's (`s0`… with one Pod each, here all
/// Ready): on B's stage when it is still open.
async fn latency(slot: &mut Option<Stage>, side: Side, services: usize, trials: usize) -> Latency {
    let stage = Stage::open(slot, Scenario::ManyPods { services, pods: 1 }).await;
    stage.hand_to(side, true, |s| s.slice_ready == services && s.endpoints_ready == services).await;
    let pid = stage.switch_to(side).await;
    let (client, ns) = (stage.client.clone(), stage.nss[0].clone());
    settle(&client).await;
    let (cpu_before, _) = proc_usage(pid);

    // Background churn: readiness flips of the upper half, 20 per second.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (ns, stop) = (ns.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let s = services / 2 + i % (services / 2).max(1);
                let name = format!("s{s}-0");
                set_pod_status(&ns.api(), &name, &[&ip(s)], i % 2 == 1).await;
                i += 1;
            }
            i
        })
    };
    let slices: Api<EndpointSlice> = ns.api();
    let mut samples = Vec::with_capacity(trials);
    for t in 0..trials {
        let s = t % (services / 2).max(1);
        let (name, app) = (format!("s{s}-0"), format!("s{s}"));
        set_pod_ready(&ns.api::<Pod>(), &name, false).await;
        let lp = ListParams::default().labels(&format!(
            "kubernetes.io/service-name={app},endpointslice.kubernetes.io/managed-by={}",
            side.managed_by()
        ));
        let shows = |want: bool| {
            let (slices, lp) = (slices.clone(), lp.clone());
            async move {
                slices.list(&lp).await.map(|l| {
                    l.items
                        .iter()
                        .flat_map(|s| s.endpoints.iter().flatten())
                        .any(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(want))
                })
            }
        };
        while !shows(false).await.unwrap_or(false) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let start = tokio::time::Instant::now();
        set_pod_ready(&ns.api::<Pod>(), &name, true).await;
        while !shows(true).await.unwrap_or(false) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = churn.await.unwrap_or(0);
    // Let the controller finish the last events before reading its CPU.
    settle(&client).await;
    let (cpu_after, _) = proc_usage(pid);
    stage.flipped = None;
    let events = flips + 2 * trials;
    samples.sort_by(f64::total_cmp);
    let q = |q: f64| quantile(&samples, q).expect("latency trials");
    Latency {
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        cpu_per_event_ms: (cpu_after - cpu_before) * 1000.0 / events.max(1) as f64,
    }
}

/// The single-Pod latency runs and the CPU per Pod event by Services in the
/// namespace, as markdown.
async fn latency_section(
    stage: &mut Option<Stage>,
    (upstream, svcplane): (Side, Side),
    small: usize,
    services: usize,
) -> String {
    let mut table = String::new();
    eprintln!("[bench] latency");
    let trials = 50;
    let u = latency(stage, upstream, services, trials).await;
    let s = latency(stage, svcplane, services, trials).await;
    let _ = writeln!(
        table,
        "\nSingle-Pod latency, {services} Services, 20 readiness flips/s in the background, {trials} trials (Ready patch → endpoint ready in the slice):\n\n| controller | p50 (ms) | p99 (ms) |\n|---|---|---|\n| {} | {:.0} | {:.0} |\n| {} | {:.0} | {:.0} |",
        upstream.name(),
        u.p50_ms,
        u.p99_ms,
        svcplane.name(),
        s.p50_ms,
        s.p99_ms
    );
    // The same run with few Services in the namespace: CPU per Pod event should
    // not grow with the number of Services.
    eprintln!("[bench] latency with {small} Services (CPU per Pod event)");
    let u_small = latency(stage, upstream, small, trials).await;
    let s_small = latency(stage, svcplane, small, trials).await;
    let _ = writeln!(
        table,
        "\nController CPU per Pod event (ms) in the same runs, by Services in the namespace:\n\n| controller | {small} Services | {services} Services | growth |\n|---|---|---|---|\n| {} | {:.3} | {:.3} | {:.2}x |\n| {} | {:.3} | {:.3} | {:.2}x |",
        upstream.name(),
        u_small.cpu_per_event_ms,
        u.cpu_per_event_ms,
        ratio(u.cpu_per_event_ms, u_small.cpu_per_event_ms),
        svcplane.name(),
        s_small.cpu_per_event_ms,
        s.cpu_per_event_ms,
        ratio(s.cpu_per_event_ms, s_small.cpu_per_event_ms),
    );
    table
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

fn plot(rows: &[(String, [f64; RATIOS])], path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max =
        rows.iter().flat_map(|(_, r)| r.iter()).copied().filter(|v| v.is_finite()).fold(1.5f64, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("svcplane / kube-controller-manager (lower is better; 1.0 = equal)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..rows.len() as f64, 0f64..max * 1.1)?;
    chart
        .configure_mesh()
        // Labels every half unit; only the centre of each group (i + 0.5) is named.
        .x_labels(rows.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let centre = (x - x.floor() - 0.5).abs() < 0.01;
            if centre {
                rows.get(x.floor() as usize).map(|(n, _)| n.clone()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ratio")
        .draw()?;
    let colours = [BLUE, RED, GREEN, MAGENTA, CYAN];
    let labels = ["convergence", "writes", "CPU", "peak RSS", "watcher bytes"];
    for (k, (colour, label)) in colours.into_iter().zip(labels).enumerate() {
        chart
            .draw_series(rows.iter().enumerate().filter(|(_, (_, r))| r[k].is_finite()).map(
                |(i, (_, r))| {
                    let x0 = i as f64 + 0.1 + k as f64 * 0.16;
                    Rectangle::new([(x0, 0.0), (x0 + 0.14, r[k])], colour.filled())
                },
            ))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    chart.draw_series(LineSeries::new([(0.0, 1.0), (rows.len() as f64, 1.0)], BLACK))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Ratios per scenario: convergence, writes, CPU, peak RSS, watcher bytes.
const RATIOS: usize = 5;

/// The ratio lines of a `scenarios.md` ("- KEY: a x, b x, c x, d x, e x").
fn parse_ratios(markdown: &str) -> Vec<(String, [f64; RATIOS])> {
    markdown
        .lines()
        .filter_map(|l| {
            let (key, rest) = l.strip_prefix("- ")?.split_once(": ")?;
            let values: Vec<f64> =
                rest.split(", ").filter_map(|v| v.trim_end_matches('x').parse().ok()).collect();
            let values: [f64; RATIOS] = values.try_into().ok()?;
            Some((key.to_string(), values))
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    if std::env::args().nth(1).as_deref() == Some("--replot") {
        // Redraw the plot from the last run's table, without running anything.
        let table = std::fs::read_to_string(dir.join("scenarios.md")).expect("bench/results/scenarios.md");
        plot(&parse_ratios(&table), &dir.join("ratios.svg")).expect("plot");
        return;
    }
    let scale: f64 = std::env::var("BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let n = |x: usize| ((x as f64 * scale).round() as usize).max(1);
    let only: Vec<String> = std::env::args().skip(1).collect();
    let wants = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let throttled = (Side::Upstream { qps: 20, burst: 30 }, Side::Svcplane { qps: 20, burst: 30 });
    let unthrottled = (Side::Upstream { qps: 1000, burst: 2000 }, Side::Svcplane { qps: 1000, burst: 2000 });
    let scenarios: Vec<(&str, Scenario, (Side, Side))> = vec![
        ("A", Scenario::ManyPods { services: n(500), pods: 10 }, throttled),
        ("A-unthrottled", Scenario::ManyPods { services: n(500), pods: 10 }, unthrottled),
        ("B", Scenario::ManyPods { services: n(5000), pods: 1 }, throttled),
        ("rolling-update", Scenario::RollingUpdate { pods: n(1000) }, throttled),
        ("statefulset", Scenario::StatefulSet { pods: n(200) }, throttled),
        ("node-deletion", Scenario::NodeDeletion { pods: n(1000) }, throttled),
        // SIG Scalability's limits: 250 endpoints per Service, 10k Services per cluster.
        ("C", Scenario::ManyPods { services: n(40), pods: 250 }, throttled),
        ("C-unthrottled", Scenario::ManyPods { services: n(40), pods: 250 }, unthrottled),
        ("deployment", Scenario::Deployment { replicas: 250 }, throttled),
        ("10k", Scenario::ManyServices { namespaces: 5, services: n(10000), pods: 5 }, throttled),
    ];

    let mut table = String::new();
    let _ = writeln!(
        table,
        "Kubernetes {}, BENCH_SCALE={scale}, batch periods 0; each run's controller writes its starting state itself; scenarios whose change only turns Pods Ready share one control plane between their runs.\n",
        svcplane_e2e::kubernetes_version()
    );
    let _ = writeln!(
        table,
        "| scenario | controller | converged (s) | floor (s) | Ready → endpoint ready p50 / p99 (ms) | EndpointSlice writes | Endpoints writes | CPU (s) | peak RSS (MiB) | watcher events | watcher KiB |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    let mut profiles = Vec::new();
    let mut results = Vec::new();
    let mut stage: Option<Stage> = None;
    let mut latency_table = None;
    for (key, scenario, (upstream, svcplane)) in scenarios {
        if !wants(key) {
            continue;
        }
        eprintln!("[bench] {key}: {}", scenario.name());
        let u = run(&mut stage, scenario, upstream).await;
        let s = run(&mut stage, scenario, svcplane).await;
        for r in [&u, &s] {
            let by = |res: &str| -> String {
                let verbs: Vec<String> = r
                    .writes
                    .iter()
                    .filter(|(k, v)| k.starts_with(&format!("{res} ")) && **v > 0.0)
                    .map(|(k, v)| format!("{v:.0} {}", k.split(' ').nth(1).unwrap_or("")))
                    .collect();
                if verbs.is_empty() { "0".into() } else { verbs.join(", ") }
            };
            let floor = r.floor_s().map_or("-".into(), |f| format!("{f:.1}"));
            let latency = |q: f64| quantile(&r.latencies_ms, q).map_or("-".into(), |ms| format!("{ms:.0}"));
            let _ = writeln!(
                table,
                "| {key}: {} | {} | {:.1} | {floor} | {} / {} | {} | {} | {:.2} | {:.0} | {} | {:.0} |",
                scenario.name(),
                r.side.name(),
                r.converge_s,
                latency(0.5),
                latency(0.99),
                by("endpointslices"),
                by("endpoints"),
                r.cpu_s,
                r.rss_mib,
                r.watch.events,
                r.watch.bytes as f64 / 1024.0
            );
            eprintln!("[bench]   {}: {:.1} s, {:.0} writes", r.side.name(), r.converge_s, r.total_writes());
        }
        ratios.push((
            key.to_string(),
            [
                ratio(s.converge_s, u.converge_s),
                ratio(s.total_writes(), u.total_writes()),
                ratio(s.cpu_s, u.cpu_s),
                ratio(s.rss_mib, u.rss_mib),
                ratio(s.watch.bytes as f64, u.watch.bytes as f64),
            ],
        ));
        if let Some(p) = &s.profile {
            profiles.push(format!("- {key}: {p}"));
        }
        results.push((key, u, s));
        // The latency runs use B's objects: on its stage while it is open.
        if key == "B" && wants("latency") {
            latency_table = Some(latency_section(&mut stage, throttled, n(100), n(5000)).await);
        }
    }
    if wants("latency") && latency_table.is_none() {
        latency_table = Some(latency_section(&mut stage, throttled, n(100), n(5000)).await);
    }
    table.push_str(&latency_table.unwrap_or_default());
    let _ = writeln!(
        table,
        "\nRatios svcplane / upstream (convergence, writes, CPU, peak RSS, bytes one slice watcher received):\n"
    );
    for (key, r) in &ratios {
        let _ =
            writeln!(table, "- {key}: {:.2}x, {:.2}x, {:.2}x, {:.2}x, {:.2}x", r[0], r[1], r[2], r[3], r[4]);
    }
    if !results.is_empty() {
        let _ =
            writeln!(table, "\nGoals (issue 20), svcplane against kube-controller-manager in this run:\n");
        for line in goals::assess(&results) {
            let _ = writeln!(table, "- {line}");
        }
    }
    if !profiles.is_empty() {
        let _ =
            writeln!(table, "\nsvcplane reconcile profile (its sync histograms):\n\n{}", profiles.join("\n"));
    }
    println!("{table}");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("scenarios.md"), &table);
    if !ratios.is_empty()
        && let Err(e) = plot(&ratios, &dir.join("ratios.svg"))
    {
        eprintln!("[bench] plot failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_lines_parse_and_every_scenario_is_labelled_in_the_plot() {
        let table = "Ratios:\n\n- A: 0.97x, 0.99x, 0.24x, 0.58x, 0.61x\n- B: 0.98x, 1.00x, 0.11x, 0.64x, 1.00x\n- node-deletion: 0.70x, 0.83x, 0.21x, 0.33x, 0.90x\n- old four-ratio line: 1x, 1x, 1x, 1x\n- nonsense line\n";
        let rows = parse_ratios(table);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1], ("B".to_string(), [0.98, 1.00, 0.11, 0.64, 1.00]));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ratios.svg");
        plot(&rows, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        // plotters writes each text element's content on a line of its own.
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        for (name, _) in &rows {
            assert!(texts.contains(&name.as_str()), "label {name} drawn");
        }
    }
}
