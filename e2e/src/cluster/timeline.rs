//! What every Service's EndpointSlices looked like over time, across managers: the
//! gaps (a Service that had a ready endpoint has none in any slice of any manager)
//! and the overlaps (slices of kube-controller-manager and of svcplane exist for the
//! same Service at once) of a migration between the two (issue 16 item 4).
//!
//! [`SliceTimeline`] is pure bookkeeping: it is fed slice events with the time each
//! was seen and never calls the API. [`SliceSampler`] feeds it from a watch on the
//! EndpointSlices of one namespace (every manager), timing each event by when it
//! arrived, as kube-proxy and CoreDNS see it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;

use crate::slices::{SVCPLANE, SVCPLANE_MIRROR, UPSTREAM, UPSTREAM_MIRROR};

/// The label naming a slice's Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming a slice's manager.
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// Who wrote a slice, by its managed-by label.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Owner {
    /// `endpointslice-controller.k8s.io` or `endpointslicemirroring-controller.k8s.io`.
    KubeControllerManager,
    /// `endpointslice-controller.svcplane.io` or `endpointslicemirroring-controller.svcplane.io`.
    Svcplane,
    /// Any other manager (or none): the label's value.
    Other(String),
}

impl Owner {
    /// The owner of a slice with this managed-by label.
    pub fn of(managed_by: Option<&str>) -> Self {
        match managed_by {
            Some(m) if m == UPSTREAM || m == UPSTREAM_MIRROR => Self::KubeControllerManager,
            Some(m) if m == SVCPLANE || m == SVCPLANE_MIRROR => Self::Svcplane,
            other => Self::Other(other.unwrap_or_default().to_string()),
        }
    }

    /// The owner of `slice`.
    pub fn of_slice(slice: &EndpointSlice) -> Self {
        Self::of(slice.metadata.labels.as_ref().and_then(|l| l.get(MANAGED_BY_LABEL)).map(String::as_str))
    }
}

/// A period of a gap or an overlap of one Service.
#[derive(Clone, Debug, PartialEq)]
pub struct Interval {
    /// `namespace/name` of the Service.
    pub service: String,
    /// The phase ([`SliceTimeline::mark`]) it began in.
    pub phase: String,
    /// When it began.
    pub start: Instant,
    /// When it ended; `None`: still open at [`SliceTimeline::finish`].
    pub end: Option<Instant>,
}

impl Interval {
    /// How long it lasted (an open one: until `now`).
    pub fn length(&self, now: Instant) -> Duration {
        self.end.unwrap_or(now).saturating_duration_since(self.start)
    }
}

/// One slice as the timeline keeps it.
#[derive(Clone, Debug)]
struct SliceState {
    service: String,
    owner: Owner,
    ready: usize,
}

/// Where a Service stands.
#[derive(Clone, Debug, Default)]
struct ServiceState {
    /// It has had a ready endpoint: from then on, none is a gap.
    had_ready: bool,
    /// Index in `gaps` of the open gap.
    open_gap: Option<usize>,
    /// Index in `overlaps` of the open overlap.
    open_overlap: Option<usize>,
}

/// Gaps and overlaps of every Service whose slices it is fed. Times are the caller's
/// (when each event was seen).
#[derive(Debug)]
pub struct SliceTimeline {
    slices: BTreeMap<String, SliceState>,
    services: BTreeMap<String, ServiceState>,
    phase: String,
    phases: Vec<(String, Instant)>,
    gaps: Vec<Interval>,
    overlaps: Vec<Interval>,
    events: usize,
}

impl SliceTimeline {
    /// An empty timeline in phase `phase`, starting at `at`.
    pub fn new(phase: &str, at: Instant) -> Self {
        Self {
            slices: BTreeMap::new(),
            services: BTreeMap::new(),
            phase: phase.to_string(),
            phases: vec![(phase.to_string(), at)],
            gaps: Vec::new(),
            overlaps: Vec::new(),
            events: 0,
        }
    }

    /// Gaps and overlaps that begin from `at` on belong to phase `phase`.
    pub fn mark(&mut self, phase: &str, at: Instant) {
        self.phase = phase.to_string();
        self.phases.push((phase.to_string(), at));
    }

    /// A slice was created or changed at `at`.
    pub fn apply(&mut self, slice: &EndpointSlice, at: Instant) {
        self.events += 1;
        let Some(key) = slice_key(slice) else { return };
        let Some(service) = service_key(slice) else {
            // A slice that lost its Service label no longer counts for any Service.
            if let Some(old) = self.slices.remove(&key) {
                self.settle(&old.service, at);
            }
            return;
        };
        let state = SliceState {
            service: service.clone(),
            owner: Owner::of_slice(slice),
            ready: ready_endpoints(slice),
        };
        if let Some(old) = self.slices.insert(key, state)
            && old.service != service
        {
            self.settle(&old.service, at);
        }
        self.settle(&service, at);
    }

    /// A slice was deleted at `at`.
    pub fn delete(&mut self, slice: &EndpointSlice, at: Instant) {
        self.events += 1;
        let Some(key) = slice_key(slice) else { return };
        if let Some(old) = self.slices.remove(&key) {
            self.settle(&old.service, at);
        }
    }

    /// A re-list at `at` found exactly `slices`: those it no longer lists were deleted.
    pub fn relist(&mut self, slices: &[EndpointSlice], at: Instant) {
        let listed: BTreeSet<String> = slices.iter().filter_map(slice_key).collect();
        let gone: Vec<String> = self.slices.keys().filter(|k| !listed.contains(*k)).cloned().collect();
        for key in gone {
            if let Some(old) = self.slices.remove(&key) {
                self.settle(&old.service, at);
            }
        }
        for slice in slices {
            self.apply(slice, at);
        }
    }

    /// Opens or closes `service`'s gap and overlap after a change at `at`.
    fn settle(&mut self, service: &str, at: Instant) {
        let (ready, owners) = self.slices.values().filter(|s| s.service == service).fold(
            (0, BTreeSet::new()),
            |(ready, mut owners), s| {
                owners.insert(s.owner.clone());
                (ready + s.ready, owners)
            },
        );
        let overlapping = owners.contains(&Owner::KubeControllerManager) && owners.contains(&Owner::Svcplane);
        let phase = self.phase.clone();
        let state = self.services.entry(service.to_string()).or_default();
        let open = |list: &mut Vec<Interval>| {
            list.push(Interval { service: service.to_string(), phase: phase.clone(), start: at, end: None });
            list.len() - 1
        };
        if ready > 0 {
            state.had_ready = true;
            if let Some(i) = state.open_gap.take() {
                self.gaps[i].end = Some(at);
            }
        } else if state.had_ready && state.open_gap.is_none() {
            state.open_gap = Some(open(&mut self.gaps));
        }
        match (overlapping, state.open_overlap) {
            (true, None) => state.open_overlap = Some(open(&mut self.overlaps)),
            (false, Some(i)) => {
                self.overlaps[i].end = Some(at);
                state.open_overlap = None;
            }
            _ => {}
        }
    }

    /// The owners of `service`'s slices now (`namespace/name`).
    pub fn owners(&self, service: &str) -> BTreeSet<Owner> {
        self.slices.values().filter(|s| s.service == service).map(|s| s.owner.clone()).collect()
    }

    /// Slice events seen.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Every gap so far (open ones have no end).
    pub fn gaps(&self) -> &[Interval] {
        &self.gaps
    }

    /// Every overlap so far (open ones have no end).
    pub fn overlaps(&self) -> &[Interval] {
        &self.overlaps
    }

    /// The phases marked, in order, with when each began.
    pub fn phases(&self) -> &[(String, Instant)] {
        &self.phases
    }

    /// The longest gap (open ones measured to `now`).
    pub fn longest_gap(&self, now: Instant) -> Option<&Interval> {
        self.gaps.iter().max_by_key(|i| i.length(now))
    }

    /// The longest overlap that began in `phase` (open ones measured to `now`).
    pub fn longest_overlap_in(&self, phase: &str, now: Instant) -> Option<&Interval> {
        self.overlaps.iter().filter(|i| i.phase == phase).max_by_key(|i| i.length(now))
    }

    /// A line per phase: its overlaps (count, longest and which Service) and gaps.
    pub fn summary(&self, now: Instant) -> String {
        let start = self.phases.first().map_or(now, |p| p.1);
        let mut out = String::new();
        for (phase, began) in &self.phases {
            let overlaps: Vec<&Interval> = self.overlaps.iter().filter(|i| &i.phase == phase).collect();
            let gaps: Vec<&Interval> = self.gaps.iter().filter(|i| &i.phase == phase).collect();
            let longest = |list: &[&Interval]| {
                list.iter()
                    .max_by_key(|i| i.length(now))
                    .map(|i| format!(", longest {:.2} s ({})", i.length(now).as_secs_f64(), i.service))
                    .unwrap_or_default()
            };
            out.push_str(&format!(
                "  at {:>6.1} s {phase}: {} overlaps{}; {} gaps{}\n",
                began.saturating_duration_since(start).as_secs_f64(),
                overlaps.len(),
                longest(&overlaps),
                gaps.len(),
                longest(&gaps),
            ));
        }
        out
    }
}

/// `namespace/name` of a slice.
fn slice_key(slice: &EndpointSlice) -> Option<String> {
    Some(format!(
        "{}/{}",
        slice.metadata.namespace.as_deref().unwrap_or_default(),
        slice.metadata.name.as_deref()?
    ))
}

/// `namespace/service` of a slice, from its Service label.
fn service_key(slice: &EndpointSlice) -> Option<String> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(format!("{}/{service}", slice.metadata.namespace.as_deref().unwrap_or_default()))
}

/// Endpoints of `slice` a proxy sends traffic to: ready, where an absent condition
/// means ready (the API's rule for consumers).
fn ready_endpoints(slice: &EndpointSlice) -> usize {
    slice
        .endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true) && !e.addresses.is_empty())
        .count()
}

/// A [`SliceTimeline`] fed by a watch on every EndpointSlice of a namespace; the
/// watch ends when this is dropped.
pub struct SliceSampler {
    timeline: Arc<Mutex<SliceTimeline>>,
    task: tokio::task::JoinHandle<()>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl SliceSampler {
    /// Starts watching `namespace`'s EndpointSlices (every manager) in phase `phase`;
    /// returns once the first list is in.
    pub async fn start(client: &kube::Client, namespace: &str, phase: &str) -> Self {
        use futures::StreamExt as _;
        use kube::runtime::watcher::{Config, Event, watcher};
        let timeline = Arc::new(Mutex::new(SliceTimeline::new(phase, Instant::now())));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
        let task = {
            let (timeline, errors) = (timeline.clone(), errors.clone());
            tokio::spawn(async move {
                let mut synced = Some(synced_tx);
                let mut listing: Vec<EndpointSlice> = Vec::new();
                let mut events = std::pin::pin!(watcher(api, Config::default()));
                while let Some(event) = events.next().await {
                    let at = Instant::now();
                    let event = match event {
                        Ok(event) => event,
                        Err(e) => {
                            // The watcher re-lists by itself; a failure is recorded, not fatal.
                            lock(&errors).push(format!("slice watch: {e}"));
                            continue;
                        }
                    };
                    let mut timeline = lock(&timeline);
                    match event {
                        Event::Init => listing.clear(),
                        Event::InitApply(slice) => listing.push(slice),
                        Event::InitDone => {
                            timeline.relist(&std::mem::take(&mut listing), at);
                            if let Some(tx) = synced.take() {
                                let _ = tx.send(());
                            }
                        }
                        Event::Apply(slice) => timeline.apply(&slice, at),
                        Event::Delete(slice) => timeline.delete(&slice, at),
                    }
                }
            })
        };
        let _ = tokio::time::timeout(Duration::from_secs(30), synced_rx).await;
        Self { timeline, task, errors }
    }

    /// Gaps and overlaps from now on belong to `phase`.
    pub fn mark(&self, phase: &str) {
        lock(&self.timeline).mark(phase, Instant::now());
    }

    /// Reads the timeline as it is now.
    pub fn with<T>(&self, read: impl FnOnce(&SliceTimeline) -> T) -> T {
        read(&lock(&self.timeline))
    }

    /// Errors the watch reported (it re-lists after each).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.errors).clone()
    }
}

impl Drop for SliceSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::workload::from_json;
    use serde_json::json;

    /// A slice `name` of Service `svc` in `ns` by `manager` with `ready` ready and one
    /// not-ready endpoint.
    fn mk_slice(name: &str, svc: &str, manager: &str, ready: usize) -> EndpointSlice {
        let mut endpoints: Vec<serde_json::Value> = (0..ready)
            .map(|i| json!({ "addresses": [format!("10.0.0.{i}")], "conditions": { "ready": true } }))
            .collect();
        endpoints.push(json!({ "addresses": ["10.0.1.1"], "conditions": { "ready": false } }));
        from_json(json!({
            "metadata": {
                "name": name,
                "namespace": "ns",
                "labels": { SERVICE_NAME_LABEL: svc, MANAGED_BY_LABEL: manager },
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
        }))
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_hand_over_with_both_managers_present_is_an_overlap_and_no_gap() {
        let t0 = Instant::now();
        let mut t = SliceTimeline::new("default", t0);
        t.apply(&mk_slice("web-s", "web", SVCPLANE, 3), at(t0, 0));
        t.mark("hand-back", at(t0, 100));
        t.apply(&mk_slice("web-k", "web", UPSTREAM, 3), at(t0, 200));
        t.delete(&mk_slice("web-s", "web", SVCPLANE, 3), at(t0, 1700));
        let end = at(t0, 5000);
        assert!(t.gaps().is_empty(), "{:?}", t.gaps());
        let overlap = t.longest_overlap_in("hand-back", end).unwrap();
        assert_eq!((overlap.service.as_str(), overlap.length(end)), ("ns/web", Duration::from_millis(1500)));
        assert!(t.longest_overlap_in("default", end).is_none());
        assert_eq!(t.owners("ns/web"), [Owner::KubeControllerManager].into());
    }

    #[test]
    fn deleting_the_only_ready_slice_before_the_other_manager_writes_is_a_gap() {
        let t0 = Instant::now();
        let mut t = SliceTimeline::new("take-over", t0);
        t.apply(&mk_slice("web-k", "web", UPSTREAM, 2), at(t0, 0));
        t.delete(&mk_slice("web-k", "web", UPSTREAM, 2), at(t0, 300));
        t.apply(&mk_slice("web-s", "web", SVCPLANE, 2), at(t0, 750));
        let gap = t.longest_gap(at(t0, 1000)).unwrap();
        assert_eq!((gap.phase.as_str(), gap.length(at(t0, 1000))), ("take-over", Duration::from_millis(450)));
        assert!(t.overlaps().is_empty());
    }

    #[test]
    fn a_slice_with_only_not_ready_endpoints_is_a_gap_and_a_gap_still_open_counts_to_now() {
        let t0 = Instant::now();
        let mut t = SliceTimeline::new("p", t0);
        t.apply(&mk_slice("a", "web", SVCPLANE, 1), at(t0, 0));
        t.apply(&mk_slice("a", "web", SVCPLANE, 0), at(t0, 100));
        assert_eq!(t.longest_gap(at(t0, 600)).unwrap().length(at(t0, 600)), Duration::from_millis(500));
        assert_eq!(t.gaps()[0].end, None);
    }

    #[test]
    fn a_service_that_never_had_a_ready_endpoint_has_no_gap() {
        let t0 = Instant::now();
        let mut t = SliceTimeline::new("p", t0);
        t.apply(&mk_slice("a", "starting", SVCPLANE, 0), at(t0, 0));
        t.delete(&mk_slice("a", "starting", SVCPLANE, 0), at(t0, 10));
        assert!(t.gaps().is_empty());
    }

    #[test]
    fn mirrored_slices_count_for_their_manager_and_services_do_not_mix() {
        let t0 = Instant::now();
        let mut t = SliceTimeline::new("p", t0);
        t.apply(&mk_slice("ext-s", "ext", SVCPLANE_MIRROR, 1), at(t0, 0));
        t.apply(&mk_slice("web-k", "web", UPSTREAM, 1), at(t0, 0));
        assert!(t.overlaps().is_empty(), "two Services, one manager each");
        t.apply(&mk_slice("ext-k", "ext", UPSTREAM_MIRROR, 1), at(t0, 10));
        assert_eq!(t.overlaps().len(), 1);
        assert_eq!(t.overlaps()[0].service, "ns/ext");
        // A third manager's slice is neither side of an overlap.
        t.apply(&mk_slice("web-o", "web", "someone-else", 1), at(t0, 20));
        assert_eq!(t.overlaps().len(), 1);
    }

    #[test]
    fn a_relist_deletes_what_it_no_longer_lists() {
        let t0 = Instant::now();
        let mut t = SliceTimeline::new("p", t0);
        t.apply(&mk_slice("web-k", "web", UPSTREAM, 1), at(t0, 0));
        t.apply(&mk_slice("web-s", "web", SVCPLANE, 1), at(t0, 0));
        t.relist(&[mk_slice("web-s", "web", SVCPLANE, 1)], at(t0, 400));
        assert_eq!(t.overlaps()[0].end, Some(at(t0, 400)));
        assert_eq!(t.owners("ns/web"), [Owner::Svcplane].into());
        t.relist(&[], at(t0, 500));
        assert_eq!(t.gaps().len(), 1, "every slice gone in a re-list is a gap");
    }

    #[test]
    fn the_summary_names_each_phase_with_its_longest_overlap() {
        let t0 = Instant::now();
        let mut t = SliceTimeline::new("default", t0);
        t.mark("take-over", at(t0, 1000));
        t.apply(&mk_slice("web-k", "web", UPSTREAM, 1), at(t0, 1000));
        t.apply(&mk_slice("web-s", "web", SVCPLANE, 1), at(t0, 1100));
        t.delete(&mk_slice("web-k", "web", UPSTREAM, 1), at(t0, 3100));
        let text = t.summary(at(t0, 4000));
        assert!(text.contains("take-over: 1 overlaps, longest 2.00 s (ns/web); 0 gaps"), "{text}");
        assert!(text.contains("default: 0 overlaps; 0 gaps"), "{text}");
    }
}
