//! `make bench-webhook`: the admission webhook's cost, on a real kube-apiserver.
//! Services are created at a fixed rate (open loop: a slow answer does not slow
//! the sender) into a namespace the webhook does not serve, then into one it does.
//! Reported: client-observed Service create latency p50/p99 without and with the
//! webhook (and the ratio), and the webhook's server-side admission latency
//! p50/p99 from its own `admission_seconds` histogram.
//!
//! Usage: svcplane-webhook-bench [RATE_PER_SECOND] [SERVICES]   (default 50 500)

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::{Api, api::PostParams};
use svcplane_e2e::{
    ControlPlane, ControlPlaneOptions, TestNamespace,
    webhook::{install_crd, mk_service, replica_for_scope, serving_cert},
};

/// Unmeasured creates before each phase.
const WARM_UP: usize = 50;

/// Creates `count` NodePort Services in `ns` at `rate` per second; returns each
/// create's latency, sorted, and the sequence numbers of the five slowest.
async fn creates_at_rate(
    ns: &TestNamespace,
    prefix: &str,
    rate: u32,
    count: usize,
) -> (Vec<Duration>, Vec<usize>) {
    let api: Api<Service> = ns.api();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        ticker.tick().await;
        let (api, svc) = (api.clone(), mk_service(&format!("{prefix}-{i}"), "NodePort", &[(80, None)]));
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            api.create(&PostParams::default(), &svc).await.unwrap_or_else(|e| panic!("create: {e}"));
            start.elapsed()
        }));
    }
    let mut latencies = Vec::with_capacity(count);
    for (i, t) in tasks.into_iter().enumerate() {
        latencies.push((t.await.expect("create task"), i));
    }
    latencies.sort();
    let slowest = latencies.iter().rev().take(5).map(|(_, i)| *i).collect();
    (latencies.into_iter().map(|(d, _)| d).collect(), slowest)
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The `admission_duration_seconds` buckets of Prometheus text: (le, cumulative count).
fn buckets(text: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.contains("admission_duration_seconds_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Prometheus' `histogram_quantile` over the increase from `before` to `after`, ms.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let increase: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| (le, n - before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1)))
        .collect();
    let Some(&(_, total)) = increase.last() else { return 0.0 };
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in &increase {
        if count >= rank {
            if le.is_infinite() {
                return lower * 1000.0;
            }
            let within = if count > below { (rank - below) / (count - below) } else { 0.0 };
            return (lower + (le - lower) * within) * 1000.0;
        }
        (lower, below) = (le, count);
    }
    lower * 1000.0
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rate = args.first().copied().unwrap_or(50) as u32;
    let count = args.get(1).copied().unwrap_or(500) as usize;
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await.unwrap_or_else(|e| panic!("{e}"));
    let client = cp.client().await;
    println!(
        "Service creates at {rate}/s, {count} per phase, kube-apiserver {}\n",
        svcplane_e2e::kubernetes_version()
    );

    // Each phase starts with WARM_UP unmeasured creates: the first writes of a
    // just-installed CRD (the webhook's claims) take seconds while kube-apiserver
    // sets up its storage; the cold tail is printed apart.
    let plain = TestNamespace::new(&client, "no-webhook").await;
    creates_at_rate(&plain, "warm-up", rate, WARM_UP).await;
    let (without, slow_without) = creates_at_rate(&plain, "plain", rate, count).await;

    install_crd(&client).await;
    let (_certs, webhook_args) = serving_cert(&cp);
    let (server, served) = replica_for_scope(&cp, &client, &webhook_args, "bench").await;
    let (cold, _) = creates_at_rate(&served, "warm-up", rate, WARM_UP).await;
    let before = buckets(&server.metrics.encode());
    let (with, slow_with) = creates_at_rate(&served, "served", rate, count).await;
    let metrics = server.metrics.encode();
    let after = buckets(&metrics);

    let (p50_without, p99_without) = (quantile(&without, 0.5), quantile(&without, 0.99));
    let (p50_with, p99_with) = (quantile(&with, 0.5), quantile(&with, 0.99));
    println!("| measurement | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|");
    println!("| Service create, no webhook (client-observed) | {p50_without:.1} | {p99_without:.1} |");
    println!("| Service create, svcplane webhook (client-observed) | {p50_with:.1} | {p99_with:.1} |");
    println!(
        "| webhook admission, server side (histogram, mutate + validate calls) | {:.2} | {:.2} |",
        histogram_quantile(&before, &after, 0.5),
        histogram_quantile(&before, &after, 0.99)
    );
    println!(
        "\nCold start (first {WARM_UP} creates after the claim CRD is installed, not in the table): p50 {:.1} ms, max {:.1} ms",
        quantile(&cold, 0.5),
        quantile(&cold, 1.0)
    );
    println!(
        "Ratio with/without webhook: p50 {:.2}x, p99 {:.2}x",
        p50_with / p50_without.max(0.001),
        p99_with / p99_without.max(0.001)
    );
    println!("Slowest creates (sequence numbers): without {slow_without:?}, with {slow_with:?}");
    println!(
        "{}",
        metrics.lines().filter(|l| l.contains("claim_conflicts_total")).collect::<Vec<_>>().join("\n")
    );
    server.kill();
}
