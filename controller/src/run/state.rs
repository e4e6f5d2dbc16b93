//! The shared watch state: one reflector per resource (never two watches of the same
//! resource), the selector index, and the router that turns watch events into queue
//! keys for each controller. Reads the API (watches), never writes.

use std::{
    collections::{BTreeSet, HashMap},
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
    endpointslice::{NodeInfo, topology_hints_enabled},
    index::SelectorIndex,
    labels,
    metrics::ControllerKind,
    migration::Migration,
    name_set::NameSet,
    node_index::NodeIndex,
    packed::Packed,
    stored_pod::StoredPod,
    tracker::WriteTracker,
    trim,
};

/// Objects per page of a watch's (re-)list.
const LIST_PAGE: u32 = 100;

/// Reflector stores of everything the controllers read.
#[derive(Clone)]
pub struct Stores {
    /// All Services, packed (read them with [`Stores::service`]).
    pub services: Store<Packed<Service>>,
    /// All Pods (only the fields the controllers read), packed (read them with
    /// [`Indexes::members`]).
    pub pods: Store<Packed<StoredPod>>,
    /// All Nodes (what [`NodeInfo::of`] reads only).
    pub nodes: Store<Node>,
    /// Slices managed by svcplane (both managed-by values), and while migrating
    /// those of kube-controller-manager; packed (read them with
    /// [`Indexes::slices_of`]).
    pub slices: Store<Packed<EndpointSlice>>,
    /// All Endpoints, packed (read them with [`Stores::endpoints_of`]).
    pub endpoints: Store<Packed<Endpoints>>,
}

impl Stores {
    /// The Service named as `key`, from the store.
    pub fn service(&self, key: &Key) -> Option<Arc<Service>> {
        let packed = self.services.get(&ObjectRef::new(&key.name).within(&key.namespace))?;
        Some(Arc::new(packed.unpack()))
    }

    /// The Endpoints named as `key`, from the store.
    pub fn endpoints_of(&self, key: &Key) -> Option<Arc<Endpoints>> {
        let packed = self.endpoints.get(&ObjectRef::new(&key.name).within(&key.namespace))?;
        Some(Arc::new(packed.unpack()))
    }
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
    pub slices_by_owner: RwLock<HashMap<(String, String, String), NameSet>>,
    /// Nodes as the planner reads them, CPU per zone, and Pods per Node.
    pub nodes: RwLock<NodeIndex>,
    /// Services with `topology-mode: Auto`: planned again when the CPU share per
    /// zone changes.
    pub topology_auto: RwLock<BTreeSet<Key>>,
}

impl Indexes {
    /// The Pods a Service selects (from the index, then the store).
    pub fn members(&self, stores: &Stores, key: &Key) -> Vec<Arc<StoredPod>> {
        let names = read(&self.selectors).members(&key.namespace, &key.name);
        names
            .iter()
            .filter_map(|name| stores.pods.get(&ObjectRef::new(name).within(&key.namespace)))
            .map(|packed| Arc::new(packed.unpack()))
            .collect()
    }

    /// Slices of `key` with `managed_by`, from the store.
    pub fn slices_of(&self, stores: &Stores, key: &Key, managed_by: &str) -> Vec<Arc<EndpointSlice>> {
        let owner = (key.namespace.clone(), key.name.clone(), managed_by.to_string());
        let names = read(&self.slices_by_owner).get(&owner).cloned().unwrap_or_default();
        names
            .iter()
            .filter_map(|name| stores.slices.get(&ObjectRef::new(name).within(&key.namespace)))
            .map(|packed| Arc::new(packed.unpack()))
            .collect()
    }
}

pub(crate) fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Starts the five watches; returns the stores, the indexes, a signal that turns
/// true once every watch has listed and been routed, and the watch tasks.
pub fn start_watches(
    client: &Client,
    queues: Queues,
    tracker: Arc<WriteTracker>,
    migration: Migration,
) -> (Stores, Arc<Indexes>, watch::Receiver<bool>, Vec<tokio::task::JoinHandle<()>>) {
    let indexes = Arc::new(Indexes::default());
    let (svc_reader, svc_writer) = reflector::store::<Packed<Service>>();
    let (pod_reader, pod_writer) = reflector::store::<Packed<StoredPod>>();
    let (node_reader, node_writer) = reflector::store::<Node>();
    let (slice_reader, slice_writer) = reflector::store::<Packed<EndpointSlice>>();
    let (ep_reader, ep_writer) = reflector::store::<Packed<Endpoints>>();
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

    // Pages of 100, not kube's (and client-go's) 500: each watch holds a page
    // decoded in full, managedFields and all, until its objects are trimmed into
    // the store; five watches listing at once held ~25 MiB in `make bench`, the
    // largest part of the peak RSS. Consistent lists, unlike kube-runtime's
    // streaming lists (which read the watch cache at any resourceVersion).
    let all = watcher::Config::default().page_size(LIST_PAGE);
    let mut managers = vec![labels::SVCPLANE_SLICE_CONTROLLER, labels::SVCPLANE_MIRRORING_CONTROLLER];
    if migration != Migration::Off {
        managers.extend([labels::UPSTREAM_SLICE_CONTROLLER, labels::UPSTREAM_MIRRORING_CONTROLLER]);
    }
    let managed = all.clone().labels(&format!("{} in ({})", labels::MANAGED_BY, managers.join(",")));

    // Services: index selectors, trigger all three controllers.
    {
        let (indexes, queues, synced) = (indexes.clone(), queues.clone(), synced.clone());
        let stream = reflector::reflector(
            svc_writer,
            // Trimmed as they are packed.
            watcher(Api::<Packed<Service>>::all(client.clone()), all.clone()).default_backoff(),
        );
        tasks.push(tokio::spawn(route(stream, "services", stores.services.clone(), synced, move |change| {
            match change {
                Change::Applied(packed) => {
                    let svc = packed.unpack();
                    let key = Key::of(&svc);
                    write(&indexes.selectors).upsert_service(&svc);
                    let mut auto = write(&indexes.topology_auto);
                    if topology_hints_enabled(&svc) {
                        auto.insert(key.clone());
                    } else {
                        auto.remove(&key);
                    }
                    drop(auto);
                    queues.all(&key);
                }
                Change::Deleted(packed) => {
                    let key = Key::of(packed.as_ref());
                    write(&indexes.selectors).remove_service(&key.namespace, &key.name);
                    write(&indexes.topology_auto).remove(&key);
                    queues.all(&key);
                }
            }
        })));
    }

    // Pods: update membership, trigger the Services the Pod was or is in.
    {
        let (indexes, queues, synced) = (indexes.clone(), queues.clone(), synced.clone());
        let stream = reflector::reflector(
            pod_writer,
            // Trimmed as they are packed.
            watcher(Api::<Packed<StoredPod>>::all(client.clone()), all.clone()).default_backoff(),
        );
        tasks.push(tokio::spawn(route(stream, "pods", stores.pods.clone(), synced, move |change| {
            let (packed, deleted) = match change {
                Change::Applied(pod) => (pod, false),
                Change::Deleted(pod) => (pod, true),
            };
            let (ns, name) = (packed.namespace().unwrap_or_default(), packed.name_any());
            let affected = if deleted {
                write(&indexes.nodes).remove_pod(&ns, &name);
                write(&indexes.selectors).remove_pod(&ns, &name)
            } else {
                let pod = packed.unpack();
                let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
                write(&indexes.nodes).upsert_pod(&ns, &name, node);
                write(&indexes.selectors).upsert_pod(&ns, &name, &pod)
            };
            for svc in affected {
                queues.pod_changed(&Key { namespace: ns.clone(), name: svc });
            }
        })));
    }

    // Nodes: the Services of the Pods on a Node whose zone or existence changed,
    // and every topology-mode Auto Service when the CPU share per zone changed.
    // Upstream follows only the latter (and only for overloaded zones): a Node
    // relabelled, or deleted and created again, leaves its Pods' endpoints stale
    // there (kubernetes#123401); svcplane does not.
    {
        let (indexes, queues, synced) = (indexes.clone(), queues.clone(), synced.clone());
        let stream = reflector::reflector(
            node_writer,
            watcher(Api::<Node>::all(client.clone()), all.clone()).default_backoff().modify(trim::trim_node),
        );
        tasks.push(tokio::spawn(route(stream, "nodes", stores.nodes.clone(), synced, move |change| {
            let change = match change {
                Change::Applied(node) => {
                    write(&indexes.nodes).upsert_node(&node.name_any(), NodeInfo::of(&node))
                }
                Change::Deleted(node) => write(&indexes.nodes).remove_node(&node.name_any()),
            };
            let Some(q) = &queues.slices else { return };
            let selectors = read(&indexes.selectors);
            for (namespace, pod) in &change.pods {
                for name in selectors.services_of_pod(namespace, pod) {
                    q.add(Key { namespace: namespace.clone(), name });
                }
            }
            drop(selectors);
            if change.shares_changed {
                read(&indexes.topology_auto).iter().for_each(|key| q.add(key.clone()));
            }
        })));
    }

    // svcplane's slices: index by owner, trigger the owning controller.
    {
        let (indexes, queues, synced, store, tracker) =
            (indexes.clone(), queues.clone(), synced.clone(), stores.slices.clone(), tracker.clone());
        let stream = reflector::reflector(
            slice_writer,
            // Trimmed as they are packed.
            watcher(Api::<Packed<EndpointSlice>>::all(client.clone()), managed).default_backoff(),
        );
        tasks.push(tokio::spawn(route(stream, "endpointslices", store, synced, move |change| {
            let (slice, deleted) = match change {
                Change::Applied(s) => (s.unpack(), false),
                Change::Deleted(s) => (s.unpack(), true),
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
                tracker.observed_deletion((controller.clone(), &key), &slice.name_any());
            }
            {
                let mut by_owner = write(&indexes.slices_by_owner);
                let owner = (key.namespace.clone(), key.name.clone(), managed_by.clone());
                if deleted {
                    // An owner without slices is forgotten: a deleted Service
                    // leaves nothing here.
                    if let Some(names) = by_owner.get_mut(&owner)
                        && names.remove(&slice.name_any())
                        && names.is_empty()
                    {
                        by_owner.remove(&owner);
                    }
                } else {
                    by_owner.entry(owner).or_default().insert(&slice.name_any());
                }
            }
            // The echo of svcplane's own write changes nothing to plan: the
            // sync that wrote it planned that state (upstream skips it too).
            // Except in a take-over, where the sync after svcplane's slices are
            // written is the one that deletes kube-controller-manager's.
            let echo = !deleted
                && controller.is_some_and(|controller| {
                    tracker.observed(
                        (controller, &key),
                        &slice.name_any(),
                        slice.resource_version().as_deref(),
                    )
                });
            if echo && migration != Migration::TakeOver {
                return;
            }
            // kube-controller-manager's slices are watched only while migrating:
            // their changes move the take-over, the hand-back and the shadow.
            match managed_by.as_str() {
                labels::SVCPLANE_SLICE_CONTROLLER | labels::UPSTREAM_SLICE_CONTROLLER => {
                    queues.slices.iter().for_each(|q| q.add(key.clone()))
                }
                labels::SVCPLANE_MIRRORING_CONTROLLER | labels::UPSTREAM_MIRRORING_CONTROLLER => {
                    queues.mirroring.iter().for_each(|q| q.add(key.clone()))
                }
                _ => {}
            }
        })));
    }

    // Endpoints: mirroring (user-written) and the Endpoints controller (its own).
    {
        let (queues, synced, store, tracker) =
            (queues.clone(), synced.clone(), stores.endpoints.clone(), tracker.clone());
        let stream = reflector::reflector(
            ep_writer,
            // Trimmed as they are packed.
            watcher(Api::<Packed<Endpoints>>::all(client.clone()), all).default_backoff(),
        );
        tasks.push(tokio::spawn(route(stream, "endpoints", store, synced, move |change| match change {
            // Mirroring follows every change of a hand-written Endpoints. The
            // Endpoints controller, as upstream's, only follows deletions (to write
            // its own object again): syncing on an add would delete a user's
            // Endpoints that arrives before its selectorless Service.
            Change::Applied(ep) => {
                let key = Key::of(ep.as_ref());
                // Only to forget the write this event shows (its sync never
                // follows an add or update, echo or not).
                tracker.observed(
                    (ControllerKind::endpoints, &key),
                    &key.name,
                    ep.resource_version().as_deref(),
                );
                queues.mirroring.iter().for_each(|q| q.add(key.clone()));
                // In shadow mode the Endpoints controller compares with the object
                // kube-controller-manager writes: its changes change the verdict.
                if migration == Migration::Shadow {
                    queues.endpoints.iter().for_each(|q| q.add(key.clone()));
                }
            }
            Change::Deleted(ep) => {
                let key = Key::of(ep.as_ref());
                tracker.observed_deletion((ControllerKind::endpoints, &key), &key.name);
                queues.endpoints_deleted(&key);
            }
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

/// One object's change, as every router handles it.
#[derive(Debug)]
pub(crate) enum Change<K> {
    /// Created or changed: a watch event, or an object of a (re-)list.
    Applied(Arc<K>),
    /// Deleted: a watch event, or an object the store held before a re-list that
    /// the re-list did not return (upstream's informer delivers a tombstone for it).
    Deleted(Arc<K>),
}

/// Turns watcher events into [`Change`]s, so that a re-list reaches the same
/// bookkeeping as watch events. The reflector fills its store from a (re-)list
/// only at `InitDone`, so that is when the listed objects are routed, from the
/// store itself, not as each `InitApply` arrives: the indexes change with the
/// store, and nothing holds a second copy of a list in flight. On `Init` it
/// remembers what the store held; whatever of that the list did not return was
/// deleted while the watch was down, and is reported as [`Change::Deleted`] with
/// its last known state (upstream's informer delivers a tombstone for it).
pub(crate) struct Relist<K: Resource<DynamicType = ()>> {
    /// During a (re-)list, what the store held before it.
    before: HashMap<ObjectRef<K>, Arc<K>>,
}

impl<K: Resource<DynamicType = ()> + Clone> Default for Relist<K> {
    fn default() -> Self {
        Self { before: HashMap::new() }
    }
}

impl<K: Resource<DynamicType = ()> + Clone> Relist<K> {
    /// The changes `event` makes; `store` is the reflector's store, which has
    /// applied `event` already. An applied object is the store's own `Arc`, so
    /// what the indexes keep of it is not a second copy.
    pub(crate) fn changes(&mut self, event: watcher::Event<K>, store: &Store<K>) -> Vec<Change<K>> {
        match event {
            watcher::Event::Apply(obj) => {
                let stored = store.get(&ObjectRef::from_obj(&obj));
                vec![Change::Applied(stored.unwrap_or_else(|| Arc::new(obj)))]
            }
            watcher::Event::Delete(obj) => vec![Change::Deleted(Arc::new(obj))],
            // Also the start again of a list interrupted by an error: the store
            // still holds what it held before the first attempt.
            watcher::Event::Init => {
                self.before =
                    store.state().into_iter().map(|obj| (ObjectRef::from_obj(obj.as_ref()), obj)).collect();
                Vec::new()
            }
            watcher::Event::InitApply(_) => Vec::new(),
            watcher::Event::InitDone => {
                let listed = store.state();
                for obj in &listed {
                    self.before.remove(&ObjectRef::from_obj(obj.as_ref()));
                }
                let mut gone: Vec<(ObjectRef<K>, Arc<K>)> =
                    std::mem::take(&mut self.before).into_iter().collect();
                gone.sort_by(|(a, _), (b, _)| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                let applied = listed.into_iter().map(Change::Applied);
                applied.chain(gone.into_iter().map(|(_, obj)| Change::Deleted(obj))).collect()
            }
        }
    }
}

/// Drives one reflector stream (whose store is `store`), routing each change
/// through [`Relist`]; signals `synced` after the first complete list. Watch errors
/// are retried by the backoff; they are logged.
async fn route<K, S>(
    stream: S,
    what: &'static str,
    store: Store<K>,
    synced: Arc<SyncedCount>,
    mut on_change: impl FnMut(Change<K>) + Send,
) where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    S: futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send,
{
    let mut first = true;
    let mut relist = Relist::default();
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                let done = matches!(event, watcher::Event::InitDone);
                for change in relist.changes(event, &store) {
                    if let Change::Deleted(obj) = &change
                        && done
                    {
                        tracing::debug!(watch = what, name = %obj.name_any(), "deleted while the watch was down");
                    }
                    on_change(change);
                }
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

/// Last Service trigger time seen, and last Ready transition per Pod, sorted by
/// Pod name. A sorted Vec, not a BTreeMap: most Services have a few Pods, and a
/// BTreeMap allocates a node of eleven entries for one (~450 bytes per Service
/// and controller; 4 MiB of `make bench`'s 5000 Services).
type ServiceTriggerState = (Option<Timestamp>, Vec<(Box<str>, Timestamp)>);

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
        let mut seen: Vec<(Box<str>, Timestamp)> = Vec::with_capacity(pods.len());
        for pod in pods {
            let ready_time = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                .and_then(|c| c.last_transition_time.as_ref())
                .map(|t| t.0);
            if let Some(t) = ready_time {
                let name = pod.metadata.name.as_deref().unwrap_or_default();
                let last = last_pods.binary_search_by(|(n, _)| (**n).cmp(name)).ok().map(|i| last_pods[i].1);
                if last.is_none_or(|last| t > last) {
                    min = Some(min.map_or(t, |m| m.min(t)));
                }
                seen.push((Box::from(name), t));
            }
        }
        seen.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
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

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::Service, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    use super::*;

    fn mk_service(name: &str, version: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn ready_at(name: &str, seconds: i64) -> Arc<StoredPod> {
        use crate::stored_pod::{StoredCondition, StoredPodStatus};
        let at = Timestamp::from_second(seconds).expect("timestamp");
        Arc::new(StoredPod {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            spec: None,
            status: Some(StoredPodStatus {
                conditions: Some(vec![StoredCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    last_transition_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at)),
                }]),
                ..Default::default()
            }),
        })
    }

    #[test]
    fn trigger_time_is_the_creation_first_then_the_earliest_new_ready_transition_else_none() {
        let times = TriggerTimes::default();
        let key = Key { namespace: "ns".into(), name: "web".into() };
        let mut svc = mk_service("web", "1");
        let created = Timestamp::from_second(100).unwrap();
        svc.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(created));
        let t = |s: i64| Some(Timestamp::from_second(s).unwrap());
        assert_eq!(times.compute(&key, &svc, &[ready_at("b", 150), ready_at("a", 120)]), Some(created));
        assert_eq!(times.compute(&key, &svc, &[ready_at("b", 150), ready_at("a", 120)]), None, "nothing new");
        let (c, b, a) = (ready_at("c", 300), ready_at("b", 200), ready_at("a", 120));
        assert_eq!(
            times.compute(&key, &svc, &[c.clone(), b.clone(), a.clone()]),
            t(200),
            "b's and c's are new"
        );
        assert_eq!(times.compute(&key, &svc, &[a, b, c]), None, "order of the Pods does not matter");
        times.forget(&key);
        assert_eq!(times.compute(&key, &svc, &[]), Some(created), "a forgotten Service starts again");
    }

    /// Each change as "applied name@version" or "deleted name@version".
    fn names(changes: &[Change<Service>]) -> Vec<String> {
        let at = |s: &Service| format!("{}@{}", s.name_any(), s.resource_version().unwrap_or_default());
        changes
            .iter()
            .map(|c| match c {
                Change::Applied(s) => format!("applied {}", at(s)),
                Change::Deleted(s) => format!("deleted {}", at(s)),
            })
            .collect()
    }

    /// kube-runtime's reflector store, holding `objects`, and a [`Relist`] that
    /// has seen them listed.
    fn listed(objects: &[Service]) -> (reflector::store::Writer<Service>, Relist<Service>) {
        let (reader, mut writer) = reflector::store::<Service>();
        let mut relist = Relist::default();
        let mut events = vec![watcher::Event::Init];
        events.extend(objects.iter().cloned().map(watcher::Event::InitApply));
        events.push(watcher::Event::InitDone);
        for event in events {
            writer.apply_watcher_event(&event);
            relist.changes(event, &reader);
        }
        (writer, relist)
    }

    /// Feeds `events` to the store, then to `relist`, as [`route`] sees them.
    fn feed(
        (writer, relist): &mut (reflector::store::Writer<Service>, Relist<Service>),
        events: Vec<watcher::Event<Service>>,
    ) -> Vec<String> {
        let reader = writer.as_reader();
        let mut out = Vec::new();
        for event in events {
            writer.apply_watcher_event(&event);
            out.extend(names(&relist.changes(event, &reader)));
        }
        out
    }

    #[test]
    fn an_applied_object_is_the_stores_own_not_a_second_copy() {
        let (mut writer, mut relist) = listed(&[]);
        let event = watcher::Event::Apply(mk_service("a", "2"));
        writer.apply_watcher_event(&event);
        let reader = writer.as_reader();
        let changes = relist.changes(event, &reader);
        let stored = reader.get(&ObjectRef::new("a").within("ns")).expect("stored");
        assert!(matches!(&changes[..], [Change::Applied(obj)] if Arc::ptr_eq(obj, &stored)));
    }

    #[test]
    fn the_first_list_applies_every_object_once_the_store_holds_it() {
        let mut stage = listed(&[]);
        let changes = feed(
            &mut stage,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(mk_service("a", "1")),
                watcher::Event::InitApply(mk_service("b", "2")),
            ],
        );
        assert!(changes.is_empty(), "routed before the store held them: {changes:?}");
        let mut done = feed(&mut stage, vec![watcher::Event::InitDone]);
        done.sort();
        assert_eq!(done, ["applied a@1", "applied b@2"]);
    }

    #[test]
    fn watch_events_pass_through_as_they_are() {
        let mut stage = listed(&[mk_service("a", "1")]);
        let changes = feed(
            &mut stage,
            vec![watcher::Event::Apply(mk_service("a", "3")), watcher::Event::Delete(mk_service("a", "4"))],
        );
        assert_eq!(changes, ["applied a@3", "deleted a@4"]);
    }

    #[test]
    fn an_object_the_relist_did_not_return_is_deleted_with_its_last_known_state() {
        // Issue 18: "b" was deleted while the watch was down; the re-list simply
        // does not return it. It must reach the routers as a deletion, carrying
        // what the store last held (the slice router reads its owner labels).
        let mut stage = listed(&[mk_service("a", "1"), mk_service("b", "2"), mk_service("c", "3")]);
        let mut changes = feed(
            &mut stage,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(mk_service("a", "5")),
                watcher::Event::InitApply(mk_service("c", "3")),
                watcher::Event::InitDone,
            ],
        );
        let deleted = changes.pop();
        changes.sort();
        assert_eq!(
            (changes, deleted),
            (vec!["applied a@5".into(), "applied c@3".into()], Some("deleted b@2".into()))
        );
    }

    #[test]
    fn a_relist_that_returns_nothing_deletes_everything_in_order() {
        let mut stage = listed(&[mk_service("b", "2"), mk_service("a", "1")]);
        let changes = feed(&mut stage, vec![watcher::Event::Init, watcher::Event::InitDone]);
        assert_eq!(changes, ["deleted a@1", "deleted b@2"]);
    }

    #[test]
    fn a_list_interrupted_and_started_again_routes_only_what_the_second_attempt_returned() {
        // The first attempt returned "new" and failed; by the second attempt "new"
        // is gone again. Nothing was routed for it, so nothing is to be undone.
        let mut stage = listed(&[mk_service("a", "1")]);
        let changes = feed(
            &mut stage,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(mk_service("new", "7")),
                watcher::Event::Init,
                watcher::Event::InitApply(mk_service("a", "1")),
                watcher::Event::InitDone,
            ],
        );
        assert_eq!(changes, ["applied a@1"]);
    }

    #[test]
    fn a_second_relist_compares_with_the_store_again() {
        let mut stage = listed(&[mk_service("a", "1")]);
        let first = feed(&mut stage, vec![watcher::Event::Init, watcher::Event::InitDone]);
        assert_eq!(first, ["deleted a@1"]);
        let second = feed(
            &mut stage,
            vec![
                watcher::Event::Init,
                watcher::Event::InitApply(mk_service("b", "2")),
                watcher::Event::InitDone,
            ],
        );
        assert_eq!(second, ["applied b@2"], "nothing left over from the first re-list");
    }
}
