//! The shared watch state: one reflector per resource (never two watches of the same
//! resource), the selector index, and the router that turns watch events into queue
//! keys for each controller. Reads the API (watches), never writes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, RwLock},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Endpoints, Node, Service},
    discovery::v1::EndpointSlice,
};
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tokio::sync::watch;

use super::{Key, queue::WorkQueue};
use crate::{
    endpointslice::{NodeInfo, NodeLookup},
    index::SelectorIndex,
    labels,
    metrics::ControllerKind,
    stored_pod::StoredPod,
    tracker::WriteTracker,
    trim,
};

/// Reflector stores of everything the controllers read.
#[derive(Clone)]
pub struct Stores {
    /// All Services.
    pub services: Store<Service>,
    /// All Pods (only the fields the controllers read).
    pub pods: Store<StoredPod>,
    /// All Nodes (name and zone only).
    pub nodes: Store<Node>,
    /// Slices managed by svcplane (both managed-by values).
    pub slices: Store<EndpointSlice>,
    /// All Endpoints.
    pub endpoints: Store<Endpoints>,
}

/// Queues of the controllers the router feeds (absent: controller not running).
#[derive(Clone, Default)]
pub struct Queues {
    /// EndpointSlice controller, keyed by Service.
    pub slices: Option<Arc<WorkQueue<Key>>>,
    /// Endpoints controller, keyed by Service.
    pub endpoints: Option<Arc<WorkQueue<Key>>>,
    /// Mirroring controller, keyed by Service/Endpoints name.
    pub mirroring: Option<Arc<WorkQueue<Key>>>,
}

/// Indexes the router maintains beside the stores.
#[derive(Default)]
pub struct Indexes {
    /// Service ↔ Pod membership.
    pub selectors: RwLock<SelectorIndex>,
    /// (namespace, service-name label, managed-by) → slice names.
    pub slices_by_owner: RwLock<HashMap<(String, String, String), BTreeSet<String>>>,
}

impl Indexes {
    /// The Pods a Service selects (from the index, then the store).
    pub fn members(&self, stores: &Stores, key: &Key) -> Vec<Arc<StoredPod>> {
        let names = read(&self.selectors).members(&key.namespace, &key.name);
        names
            .iter()
            .filter_map(|name| stores.pods.get(&ObjectRef::new(name).within(&key.namespace)))
            .collect()
    }

    /// Slices of `key` with `managed_by`, from the store.
    pub fn slices_of(&self, stores: &Stores, key: &Key, managed_by: &str) -> Vec<Arc<EndpointSlice>> {
        let owner = (key.namespace.clone(), key.name.clone(), managed_by.to_string());
        let names = read(&self.slices_by_owner).get(&owner).cloned().unwrap_or_default();
        names
            .iter()
            .filter_map(|name| stores.slices.get(&ObjectRef::new(name).within(&key.namespace)))
            .collect()
    }
}

pub(crate) fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

impl NodeLookup for Store<Node> {
    fn node(&self, name: &str) -> Option<NodeInfo> {
        self.get(&ObjectRef::new(name))
            .map(|node| NodeInfo { zone: node.labels().get("topology.kubernetes.io/zone").cloned() })
    }
}

/// Starts the five watches; returns the stores, the indexes, a signal that turns
/// true once every watch has listed and been routed, and the watch tasks.
pub fn start_watches(
    client: &Client,
    queues: Queues,
    tracker: Arc<WriteTracker>,
) -> (Stores, Arc<Indexes>, watch::Receiver<bool>, Vec<tokio::task::JoinHandle<()>>) {
    let indexes = Arc::new(Indexes::default());
    let (svc_reader, svc_writer) = reflector::store::<Service>();
    let (pod_reader, pod_writer) = reflector::store::<StoredPod>();
    let (node_reader, node_writer) = reflector::store::<Node>();
    let (slice_reader, slice_writer) = reflector::store::<EndpointSlice>();
    let (ep_reader, ep_writer) = reflector::store::<Endpoints>();
    let stores = Stores {
        services: svc_reader,
        pods: pod_reader,
        nodes: node_reader,
        slices: slice_reader,
        endpoints: ep_reader,
    };
    let (ready_tx, ready_rx) = watch::channel(false);
    let synced = Arc::new(SyncedCount::new(5, ready_tx));
    let mut tasks = Vec::new();

    let all = watcher::Config::default();
    let managed = watcher::Config::default().labels(&format!(
        "{} in ({},{})",
        labels::MANAGED_BY,
        labels::SVCPLANE_SLICE_CONTROLLER,
        labels::SVCPLANE_MIRRORING_CONTROLLER
    ));

    // Services: index selectors, trigger all three controllers.
    {
        let (indexes, queues, synced, stores) =
            (indexes.clone(), queues.clone(), synced.clone(), stores.clone());
        let stream = reflector::reflector(
            svc_writer,
            watcher(Api::<Service>::all(client.clone()), all.clone())
                .default_backoff()
                .modify(trim::trim_service),
        );
        tasks.push(tokio::spawn(route(stream, "services", synced, move |ev| match ev {
            watcher::Event::Apply(svc) | watcher::Event::InitApply(svc) => {
                let key = Key::of(&svc);
                write(&indexes.selectors).upsert_service(
                    &key.namespace,
                    &key.name,
                    svc.spec.as_ref().and_then(|s| s.selector.as_ref()),
                );
                queues.all(&key);
            }
            watcher::Event::Delete(svc) => {
                let key = Key::of(&svc);
                write(&indexes.selectors).remove_service(&key.namespace, &key.name);
                queues.all(&key);
            }
            watcher::Event::InitDone => {
                // A re-list may have missed deletions: drop Services the index still
                // knows but the store does not (their keys are queued so the
                // controllers clean up), and resync everything.
                let gone: Vec<(String, String)> = read(&indexes.selectors)
                    .services()
                    .into_iter()
                    .filter(|(ns, name)| stores.services.get(&ObjectRef::new(name).within(ns)).is_none())
                    .collect();
                for (namespace, name) in gone {
                    write(&indexes.selectors).remove_service(&namespace, &name);
                    queues.all(&Key { namespace, name });
                }
                for svc in stores.services.state() {
                    queues.all(&Key::of(svc.as_ref()));
                }
            }
            watcher::Event::Init => {}
        })));
    }

    // Pods: update membership, trigger the Services the Pod was or is in.
    {
        let (indexes, queues, synced, stores) =
            (indexes.clone(), queues.clone(), synced.clone(), stores.clone());
        let stream = reflector::reflector(
            pod_writer,
            watcher(Api::<StoredPod>::all(client.clone()), all.clone())
                .default_backoff()
                .modify(StoredPod::trim),
        );
        tasks.push(tokio::spawn(route(stream, "pods", synced, move |ev| match ev {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                let ns = pod.namespace().unwrap_or_default();
                let affected =
                    write(&indexes.selectors).upsert_pod(&ns, &pod.name_any(), pod.metadata.labels.as_ref());
                for svc in affected {
                    queues.pod_changed(&Key { namespace: ns.clone(), name: svc });
                }
            }
            watcher::Event::Delete(pod) => {
                let ns = pod.namespace().unwrap_or_default();
                let affected = write(&indexes.selectors).remove_pod(&ns, &pod.name_any());
                for svc in affected {
                    queues.pod_changed(&Key { namespace: ns.clone(), name: svc });
                }
            }
            watcher::Event::InitDone => {
                // Pods deleted while the watch was down.
                let gone: Vec<(String, String)> = read(&indexes.selectors)
                    .pods()
                    .into_iter()
                    .filter(|(ns, name)| stores.pods.get(&ObjectRef::new(name).within(ns)).is_none())
                    .collect();
                for (ns, name) in gone {
                    for svc in write(&indexes.selectors).remove_pod(&ns, &name) {
                        queues.pod_changed(&Key { namespace: ns.clone(), name: svc });
                    }
                }
            }
            watcher::Event::Init => {}
        })));
    }

    // Nodes: a store only. Upstream does not resync Services on Node events (only
    // for topology hints), so neither does svcplane: the results stay identical.
    {
        let synced = synced.clone();
        let stream = reflector::reflector(
            node_writer,
            watcher(Api::<Node>::all(client.clone()), all.clone()).default_backoff().modify(trim::trim_node),
        );
        tasks.push(tokio::spawn(route(stream, "nodes", synced, |_| {})));
    }

    // svcplane's slices: index by owner, trigger the owning controller.
    {
        let (indexes, queues, synced) = (indexes.clone(), queues.clone(), synced.clone());
        let stream = reflector::reflector(
            slice_writer,
            watcher(Api::<EndpointSlice>::all(client.clone()), managed)
                .default_backoff()
                .modify(trim::trim_slice),
        );
        tasks.push(tokio::spawn(route(stream, "endpointslices", synced, move |ev| {
            let (slice, deleted) = match ev {
                watcher::Event::Apply(s) | watcher::Event::InitApply(s) => (s, false),
                watcher::Event::Delete(s) => (s, true),
                watcher::Event::Init | watcher::Event::InitDone => return,
            };
            let Some(owner) = slice.labels().get(labels::SERVICE_NAME).cloned() else { return };
            let managed_by = slice.labels().get(labels::MANAGED_BY).cloned().unwrap_or_default();
            let key = Key { namespace: slice.namespace().unwrap_or_default(), name: owner };
            let controller = match managed_by.as_str() {
                labels::SVCPLANE_SLICE_CONTROLLER => Some(ControllerKind::endpointslice),
                labels::SVCPLANE_MIRRORING_CONTROLLER => Some(ControllerKind::mirroring),
                _ => None,
            };
            if deleted && let Some(controller) = &controller {
                tracker.observed_deletion(&super::tracker_owner(controller, &key), &slice.name_any());
            }
            {
                let mut by_owner = write(&indexes.slices_by_owner);
                let entry = by_owner
                    .entry((key.namespace.clone(), key.name.clone(), managed_by.clone()))
                    .or_default();
                if deleted {
                    entry.remove(&slice.name_any());
                } else {
                    entry.insert(slice.name_any());
                }
            }
            match managed_by.as_str() {
                labels::SVCPLANE_SLICE_CONTROLLER => queues.slices.iter().for_each(|q| q.add(key.clone())),
                labels::SVCPLANE_MIRRORING_CONTROLLER => {
                    queues.mirroring.iter().for_each(|q| q.add(key.clone()))
                }
                _ => {}
            }
        })));
    }

    // Endpoints: mirroring (user-written) and the Endpoints controller (its own).
    {
        let (queues, synced) = (queues.clone(), synced.clone());
        let stream = reflector::reflector(
            ep_writer,
            watcher(Api::<Endpoints>::all(client.clone()), all)
                .default_backoff()
                .modify(trim::trim_endpoints),
        );
        tasks.push(tokio::spawn(route(stream, "endpoints", synced, move |ev| match ev {
            // Mirroring follows every change of a hand-written Endpoints. The
            // Endpoints controller, as upstream's, only follows deletions (to write
            // its own object again): syncing on an add would delete a user's
            // Endpoints that arrives before its selectorless Service.
            watcher::Event::Apply(ep) | watcher::Event::InitApply(ep) => {
                queues.mirroring.iter().for_each(|q| q.add(Key::of(&ep)));
            }
            watcher::Event::Delete(ep) => queues.endpoints_deleted(&Key::of(&ep)),
            watcher::Event::Init | watcher::Event::InitDone => {}
        })));
    }

    (stores, indexes, ready_rx, tasks)
}

impl Queues {
    fn all(&self, key: &Key) {
        for q in [&self.slices, &self.endpoints, &self.mirroring].into_iter().flatten() {
            q.add(key.clone());
        }
    }

    fn pod_changed(&self, key: &Key) {
        for q in [&self.slices, &self.endpoints].into_iter().flatten() {
            q.add(key.clone());
        }
    }

    fn endpoints_deleted(&self, key: &Key) {
        for q in [&self.endpoints, &self.mirroring].into_iter().flatten() {
            q.add(key.clone());
        }
    }
}

/// Counts watches that have finished their first list and been routed.
struct SyncedCount {
    remaining: std::sync::atomic::AtomicUsize,
    ready: watch::Sender<bool>,
}

impl SyncedCount {
    fn new(n: usize, ready: watch::Sender<bool>) -> Self {
        Self { remaining: n.into(), ready }
    }

    fn one_done(&self) {
        if self.remaining.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            let _ = self.ready.send(true);
        }
    }
}

/// Drives one reflector stream, routing each event; signals `synced` after the
/// first complete list. Watch errors are retried by the backoff; they are logged.
async fn route<K, S>(
    stream: S,
    what: &'static str,
    synced: Arc<SyncedCount>,
    mut on_event: impl FnMut(watcher::Event<K>) + Send,
) where
    K: Resource + Clone + Send + 'static,
    S: futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send,
{
    let mut first = true;
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(ev) => {
                let done = matches!(ev, watcher::Event::InitDone);
                on_event(ev);
                if done && first {
                    first = false;
                    synced.one_done();
                }
            }
            Err(e) => tracing::warn!(watch = what, error = %e, "watch failed; retrying"),
        }
    }
}

/// Pod trigger times for the last-change-trigger-time annotation (upstream's
/// TriggerTimeTracker): per Service, the Ready transition time last seen per Pod.
#[derive(Default)]
pub struct TriggerTimes {
    services: std::sync::Mutex<HashMap<Key, ServiceTriggerState>>,
}

/// Last Service trigger time seen, and last Ready transition per Pod.
type ServiceTriggerState = (Option<Timestamp>, BTreeMap<String, Timestamp>);

impl TriggerTimes {
    /// The earliest change not yet reported for this Service: on the first sync of
    /// a Service, its creation time; afterwards the earliest Pod Ready transition or
    /// Service change newer than last time; `None` when nothing changed.
    pub fn compute(&self, key: &Key, svc: &Service, pods: &[Arc<StoredPod>]) -> Option<Timestamp> {
        let mut services = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let created = svc.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let known = services.contains_key(key);
        let (last_svc, last_pods) = services.entry(key.clone()).or_default();
        let mut min: Option<Timestamp> = None;
        let mut seen = BTreeMap::new();
        for pod in pods {
            let ready_time = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0);
            if let Some(t) = ready_time {
                if last_pods.get(&pod.name_any()).is_none_or(|last| t > *last) {
                    min = Some(min.map_or(t, |m| m.min(t)));
                }
                seen.insert(pod.name_any(), t);
            }
        }
        if let Some(c) = created
            && last_svc.is_none_or(|last| c > last)
        {
            min = Some(min.map_or(c, |m| m.min(c)));
        }
        *last_pods = seen;
        *last_svc = created;
        if known { min } else { created }
    }

    /// Forgets a deleted Service.
    pub fn forget(&self, key: &Key) {
        self.services.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

pub(crate) fn lock_map<K, V>(
    m: &std::sync::Mutex<HashMap<K, V>>,
) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
