//! What the controller under test has written, as a client of kube-apiserver sees
//! it: watches of its EndpointSlices and of every Endpoints object, held in kube's
//! reflector stores. Convergence is read from the stores (no list of thousands of
//! objects every poll, which would load the apiserver the controllers share), and
//! each slice event is checked for the Pods whose change the benchmark is timing,
//! giving the latency from a Pod's change to its endpoint shown ready.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Endpoints, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    runtime::{
        reflector::{self, Store},
        watcher,
    },
};
use tokio::{task::JoinHandle, time::Instant};

/// Namespaces the benchmark creates start with this; `default/kubernetes`'s
/// Endpoints (the apiserver's own) is not counted.
pub const NAMESPACE_PREFIX: &str = "bench";

/// The totals the scenarios' start and convergence conditions read.
#[derive(Debug, Default)]
pub struct Summary {
    pub slice_endpoints: usize,
    pub slice_ready: usize,
    pub slice_targets: BTreeSet<String>,
    pub endpoints_ready: usize,
    pub endpoints_not_ready: usize,
}

/// Pods whose change is being timed, and the latencies measured so far.
#[derive(Default)]
struct Timing {
    /// `namespace/pod` → when the request that makes it ready was sent.
    awaiting: HashMap<String, Instant>,
    latencies_ms: Vec<f64>,
}

/// The watches and their stores; they stop when this is dropped.
pub struct Observer {
    slices: Store<EndpointSlice>,
    endpoints: Store<Endpoints>,
    timing: Arc<Mutex<Timing>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Observer {
    /// Watches the slices labelled `managed_by` and all Endpoints; returns once
    /// both stores hold their initial lists.
    pub async fn start(client: &Client, managed_by: &str) -> Self {
        let timing = Arc::new(Mutex::new(Timing::default()));
        let (slices, slice_writer) = reflector::store();
        let config = watcher::Config::default()
            .labels(&format!("endpointslice.kubernetes.io/managed-by={managed_by}"));
        let slice_events = reflector::reflector(
            slice_writer,
            watcher::watcher(Api::<EndpointSlice>::all(client.clone()), config),
        );
        let slice_task = {
            let timing = timing.clone();
            tokio::spawn(async move {
                let mut events = std::pin::pin!(slice_events);
                while let Some(event) = events.next().await {
                    match event {
                        Ok(watcher::Event::Apply(slice) | watcher::Event::InitApply(slice)) => {
                            record_ready(&timing, &slice);
                        }
                        Ok(_) => {}
                        // The watcher retries by itself; a gap only delays what is seen.
                        Err(e) => eprintln!("[bench] slice watch: {e}"),
                    }
                }
            })
        };
        let (endpoints, endpoints_writer) = reflector::store();
        let endpoints_events = reflector::reflector(
            endpoints_writer,
            watcher::watcher(Api::<Endpoints>::all(client.clone()), watcher::Config::default()),
        );
        let endpoints_task = tokio::spawn(async move {
            let mut events = std::pin::pin!(endpoints_events);
            while let Some(event) = events.next().await {
                if let Err(e) = event {
                    eprintln!("[bench] endpoints watch: {e}");
                }
            }
        });
        let observer = Observer { slices, endpoints, timing, tasks: vec![slice_task, endpoints_task] };
        observer.slices.wait_until_ready().await.expect("slice store ready");
        observer.endpoints.wait_until_ready().await.expect("endpoints store ready");
        observer
    }

    /// Starts timing `namespace/pod`: call it just before the request that makes
    /// the Pod ready (or creates it ready).
    pub fn await_ready(&self, namespace: &str, pod: &str) {
        let mut t = self.timing.lock().unwrap_or_else(|p| p.into_inner());
        t.awaiting.insert(format!("{namespace}/{pod}"), Instant::now());
    }

    /// How many timed Pods have not been seen ready yet.
    pub fn timed_pending(&self) -> usize {
        self.timing.lock().unwrap_or_else(|p| p.into_inner()).awaiting.len()
    }

    /// Latencies measured since the last call, in ms, sorted; and how many Pods
    /// still wait to be seen ready.
    pub fn take_latencies(&self) -> (Vec<f64>, usize) {
        let mut t = self.timing.lock().unwrap_or_else(|p| p.into_inner());
        let mut l = std::mem::take(&mut t.latencies_ms);
        l.sort_by(f64::total_cmp);
        (l, t.awaiting.len())
    }

    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for slice in self.slices.state() {
            for ep in slice.endpoints.iter().flatten() {
                s.slice_endpoints += 1;
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(true) {
                    s.slice_ready += 1;
                }
                if let Some(name) = ep.target_ref.as_ref().and_then(|t| t.name.clone()) {
                    s.slice_targets.insert(name);
                }
            }
        }
        for ep in self.endpoints.state() {
            if !ep.metadata.namespace.as_deref().unwrap_or("").starts_with(NAMESPACE_PREFIX) {
                continue;
            }
            for subset in ep.subsets.iter().flatten() {
                s.endpoints_ready += subset.addresses.as_ref().map_or(0, Vec::len);
                s.endpoints_not_ready += subset.not_ready_addresses.as_ref().map_or(0, Vec::len);
            }
        }
        s
    }
}

/// Ends the timing of every awaited Pod this slice shows ready.
fn record_ready(timing: &Mutex<Timing>, slice: &EndpointSlice) {
    let now = Instant::now();
    let namespace = slice.metadata.namespace.as_deref().unwrap_or("");
    let mut t = timing.lock().unwrap_or_else(|p| p.into_inner());
    if t.awaiting.is_empty() {
        return;
    }
    for ep in slice.endpoints.iter().flatten() {
        if ep.conditions.as_ref().and_then(|c| c.ready) != Some(true) {
            continue;
        }
        let Some(pod) = ep.target_ref.as_ref().and_then(|r| r.name.as_deref()) else { continue };
        if let Some(sent) = t.awaiting.remove(&format!("{namespace}/{pod}")) {
            t.latencies_ms.push(now.duration_since(sent).as_secs_f64() * 1000.0);
        }
    }
}

/// The `q` quantile of sorted samples (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() as f64 - 1.0) * q).round() as usize])
}
