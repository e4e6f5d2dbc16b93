//! Continuous traffic while something changes: requests through Service addresses
//! and DNS lookups of Service names, each from every client Pod (a testpod: `/fetch`
//! and `/resolve` run inside the Pod, where kube-proxy's rules and the cluster DNS
//! are), counted until [`Load::stop`]. Calls nothing but the client Pods.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;

use super::workload::{fetch_through, resolve_in};

/// Requests one `/fetch` makes.
const REQUESTS_PER_FETCH: usize = 10;
/// Least time between two `/fetch`es of one loop: 40 new connections a second per
/// target from each client. Pacing, not synchronisation: back to back (about 400 a
/// second per client) a client's ephemeral ports come round again within the
/// 60 s TIME_WAIT, and a reused 4-tuple sometimes loses its SYN (one connect in
/// ~3000 timed out after the testpod's 1 s, in every phase alike).
const FETCH_INTERVAL: Duration = Duration::from_millis(250);
/// Pause between two lookups of one name from one client (pacing, not synchronisation).
const LOOKUP_INTERVAL: Duration = Duration::from_millis(100);

/// A DNS name and the addresses it must resolve to (as a set: duplicates are fine).
#[derive(Clone, Debug)]
pub struct Lookup {
    /// The fully qualified name.
    pub name: String,
    /// Exactly these addresses.
    pub want: BTreeSet<String>,
}

/// What the traffic saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Requests sent.
    pub requests: usize,
    /// Failed requests: `[seconds since start] client -> target: why`.
    pub request_failures: Vec<String>,
    /// Lookups made.
    pub lookups: usize,
    /// Failed lookups (an error or other addresses than wanted).
    pub lookup_failures: Vec<String>,
}

/// Traffic running in the background.
pub struct Load {
    stop: Arc<AtomicBool>,
    requests: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>,
    lookups: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>,
}

impl Load {
    /// From every client, requests to every `targets` (`IP:PORT`) back to back, and
    /// lookups of every name in `lookups`.
    pub fn start(clients: &[Pod], targets: &[String], lookups: &[Lookup]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let began = Instant::now();
        let name = |c: &Pod| c.metadata.name.clone().unwrap_or_default();
        let mut requests = Vec::new();
        let mut lookup_tasks = Vec::new();
        for client in clients {
            for target in targets {
                let (client, target, stop) = (client.clone(), target.clone(), stop.clone());
                requests.push(tokio::spawn(async move {
                    let (mut sent, mut failures) = (0, Vec::new());
                    let mut ticker = tokio::time::interval(FETCH_INTERVAL);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        ticker.tick().await;
                        let results = fetch_through(&client, &target, REQUESTS_PER_FETCH).await;
                        sent += results.len();
                        failures.extend(results.into_iter().filter_map(Result::err).map(|why| {
                            format!(
                                "[{:.1} s] {} -> {target}: {why}",
                                began.elapsed().as_secs_f64(),
                                name(&client)
                            )
                        }));
                    }
                    (sent, failures)
                }));
            }
            for lookup in lookups {
                let (client, lookup, stop) = (client.clone(), lookup.clone(), stop.clone());
                lookup_tasks.push(tokio::spawn(async move {
                    let (mut made, mut failures) = (0, Vec::new());
                    let mut ticker = tokio::time::interval(LOOKUP_INTERVAL);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        ticker.tick().await;
                        made += 1;
                        let failure = match resolve_in(&client, &lookup.name).await {
                            Ok(got) if got.iter().cloned().collect::<BTreeSet<_>>() == lookup.want => {
                                continue;
                            }
                            Ok(got) => format!("got {got:?}, want {:?}", lookup.want),
                            Err(e) => e,
                        };
                        failures.push(format!(
                            "[{:.1} s] {} resolving {}: {failure}",
                            began.elapsed().as_secs_f64(),
                            name(&client),
                            lookup.name
                        ));
                    }
                    (made, failures)
                }));
            }
        }
        Self { stop, requests, lookups: lookup_tasks }
    }

    /// Stops every loop (each finishes the exchange it is in) and counts.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = LoadReport::default();
        for task in self.requests {
            let (sent, failures) = task.await.unwrap_or_else(|e| (0, vec![format!("request loop: {e}")]));
            report.requests += sent;
            report.request_failures.extend(failures);
        }
        for task in self.lookups {
            let (made, failures) = task.await.unwrap_or_else(|e| (0, vec![format!("lookup loop: {e}")]));
            report.lookups += made;
            report.lookup_failures.extend(failures);
        }
        report
    }
}
