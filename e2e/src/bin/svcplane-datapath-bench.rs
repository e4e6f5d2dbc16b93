//! `make bench-datapath`: how long from a Pod becoming Ready (its status patch) to the
//! first request through the Service's ClusterIP that it answers, with kube-proxy
//! (nftables mode, default settings) in a network namespace as the consumer. The same
//! network, kube-proxy and Pod serve two control planes in turn: one with svcplane's
//! controllers, one with kube-controller-manager's endpointslice, endpoints and
//! mirroring controllers (batching off) and no svcplane. Prints p50/p99 per side.
//!
//! Each trial: patch Ready=true, then send a request every millisecond (each on a new
//! connection; a ClusterIP without endpoints is rejected at once) until the Pod
//! answers; then patch Ready=false and wait until requests are rejected again. The
//! next trial starts [`IDLE_BEFORE_TRIAL`] after that: kube-proxy 1.37 syncs at most
//! once per `minSyncPeriod` (1 s, counted from the end of the previous sync, no burst),
//! and the endpoint chain left stale by the not-ready change is deleted by a follow-up
//! sync a second later. Starting each trial with kube-proxy idle makes the figure the
//! controllers' reaction plus one kube-proxy sync, not the limiter's cooldown (without
//! the pause, samples spread uniformly over that second on both sides). Needs root.
//!
//! `svcplane-datapath-bench [--trials N]` (default 50).

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::core::v1::{Pod, Service};
use svcplane_e2e::{
    ControlPlane, ControlPlaneOptions, TestNamespace,
    datapath::{Network, PodNet, http_get_from, sibling_bin, socket_addr},
    fixtures::{ensure_node, mk_pod, mk_port, mk_service},
    wait::poll_until,
};

const NODE: &str = "bench-node";
/// Pause between the previous trial's last change and the next trial (see above).
const IDLE_BEFORE_TRIAL: Duration = Duration::from_millis(2500);
/// Bound on one trial's wait for the first answer or for the rejection after.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one request: short, so that a SYN lost while kube-proxy swaps its rules
/// costs at most this much instead of the kernel's 1 s retransmission.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug)]
enum Side {
    Svcplane,
    KubeControllerManager,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Svcplane => "svcplane",
            Side::KubeControllerManager => "kube-controller-manager",
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut trials = 50usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--trials" => trials = args.next().context("--trials needs a value")?.parse()?,
            _ => bail!("unknown argument {arg} (usage: svcplane-datapath-bench [--trials N])"),
        }
    }
    let net = Network::create().context("building the test network")?;
    let pod = net.add_pod().context("pod namespace")?;
    let echo = sibling_bin("echo-server");
    net.start_echo_server(&echo, &pod, "lat-0", &[8080], &[]).await.map_err(|e| anyhow!(e))?;

    let mut results = Vec::new();
    for side in [Side::Svcplane, Side::KubeControllerManager] {
        let samples = run_side(&net, &pod, side, trials).await.with_context(|| side.label().to_string())?;
        results.push((side, samples));
    }

    println!();
    println!(
        "Pod Ready (status patch) -> first answer through the ClusterIP, kube-proxy nftables, {trials} trials"
    );
    println!("{:<26} {:>9} {:>9} {:>9} {:>9}", "controllers", "p50 ms", "p99 ms", "min ms", "max ms");
    for (side, mut s) in results {
        s.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:<26} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            side.label(),
            ms(quantile(&s, 0.50)),
            ms(quantile(&s, 0.99)),
            ms(s[0]),
            ms(s[s.len() - 1]),
        );
    }
    Ok(())
}

/// Nearest-rank quantile of sorted samples.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn run_side(net: &Network, pod: &PodNet, side: Side, trials: usize) -> anyhow::Result<Vec<Duration>> {
    let mut options = ControlPlaneOptions::default().with_bind_address(&net.root_ip);
    if let Side::KubeControllerManager = side {
        options = options.with_controller_manager(&[
            "endpointslice-controller",
            "endpoints-controller",
            "endpointslice-mirroring-controller",
        ]);
    }
    let cp = ControlPlane::start(options).await?;
    let client = cp.try_client().await?;
    ensure_node(&client, NODE, &net.node_ip, None).await;
    let proxy = format!("kube-proxy-{}", side.label());
    net.start_kube_proxy(&proxy, &cp.kubeconfig_path, NODE).await.map_err(|e| anyhow!(e))?;
    let _svcplane = match side {
        Side::Svcplane => {
            Some(cp.svcplane("bench", &["--controllers=endpointslice,endpoints,mirroring"]).await)
        }
        Side::KubeControllerManager => None,
    };
    let result = measure(net, pod, &client, trials).await;
    net.stop(&proxy);
    eprintln!("[{}] done; logs: {}", side.label(), cp.dir().display());
    result
}

async fn measure(
    net: &Network,
    pod: &PodNet,
    client: &kube::Client,
    trials: usize,
) -> anyhow::Result<Vec<Duration>> {
    let ns = TestNamespace::new(client, "bench-datapath").await;
    ns.create(&mk_service("lat", &[("app", "lat")], vec![mk_port("http", 80, "8080")])).await;
    ns.running_pod(mk_pod("lat-0", &[("app", "lat")], NODE, &[("http", 8080)]), &[&pod.ipv4], false).await;
    let svc = ns.api::<Service>().get("lat").await?;
    let ip = svc.spec.and_then(|s| s.cluster_ip).context("no ClusterIP")?;
    let addr = socket_addr(&ip, 80).map_err(|e| anyhow!(e))?;
    let node = net.node_netns.clone();
    let answered = || async { http_get_from(&node, addr, REQUEST_TIMEOUT).await.as_deref() == Ok("lat-0") };
    // The Service is programmed (without endpoints) before the first trial.
    poll_until(TRIAL_TIMEOUT, Duration::from_millis(10), || async { Ok(!answered().await) })
        .await
        .map_err(|e| anyhow!("service never rejected: {e}"))?;

    let pods = ns.api::<Pod>();
    let side_start = Instant::now();
    let mut samples = Vec::with_capacity(trials);
    for trial in 0..trials {
        // Pacing for kube-proxy's sync limiter (see the module comment), not synchronisation.
        tokio::time::sleep(IDLE_BEFORE_TRIAL).await;
        let start = Instant::now();
        set_ready(&pods, &pod.ipv4, true).await?;
        poll_until(TRIAL_TIMEOUT, POLL, || async { Ok(answered().await) })
            .await
            .map_err(|e| anyhow!("trial {trial}: no answer: {e}"))?;
        let took = start.elapsed();
        if took > Duration::from_millis(200) {
            eprintln!("trial {trial}: {took:?} (at {:?} since the side started)", side_start.elapsed());
        }
        samples.push(took);
        set_ready(&pods, &pod.ipv4, false).await?;
        poll_until(TRIAL_TIMEOUT, POLL, || async { Ok(!answered().await) })
            .await
            .map_err(|e| anyhow!("trial {trial}: still answered after not ready: {e}"))?;
    }
    Ok(samples)
}

/// Sets lat-0's Ready condition as a kubelet would (one status merge patch), retrying
/// a failed request a few times within [`TRIAL_TIMEOUT`] instead of aborting the run.
async fn set_ready(pods: &kube::Api<Pod>, ip: &str, ready: bool) -> anyhow::Result<()> {
    let status = if ready { "True" } else { "False" };
    let patch = serde_json::json!({ "status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{ "ip": ip }],
        "conditions": [
            { "type": "PodScheduled", "status": "True" },
            { "type": "ContainersReady", "status": status },
            { "type": "Ready", "status": status },
        ],
    }});
    let params = kube::api::PatchParams::default();
    let last = std::sync::Mutex::new(String::new());
    let mut attempts = 0;
    poll_until(TRIAL_TIMEOUT, Duration::from_millis(50), || {
        attempts += 1;
        let patch = kube::api::Patch::Merge(&patch);
        let params = &params;
        let last = &last;
        let done = attempts > 5;
        async move {
            match pods.patch_status("lat-0", params, &patch).await {
                Ok(_) => Ok(true),
                Err(e) if done => {
                    Err(format!("{e} (before: {})", last.lock().map(|l| l.clone()).unwrap_or_default()))
                }
                Err(e) => {
                    if let Ok(mut l) = last.lock() {
                        *l = e.to_string();
                    }
                    Ok(false)
                }
            }
        }
    })
    .await
    .map_err(|e| anyhow!("patch Ready={status} on lat-0: {e}"))
}
