//! The claim store: turns a [`Plan`] into claim objects, and keeps this
//! replica's [`Index`] in step with the cluster.
//!
//! Calls the API: creates and deletes `AllocationClaim`s, and watches
//! claims, Services and ServiceCIDRs. A claim create that fails with 409
//! AlreadyExists means another replica (or request) holds the value: a
//! dynamic pick then tries another value, a static request is denied naming
//! the holder.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{StreamExt, future::join_all};
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use svcplane_ipam::{IpamError, NodePortAssignment, NodePortError};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::admit::{Assigned, Denial, Plan, service_values};
use crate::claim::{AllocationClaim, Owner, Value, build_claim, claim_owner};
use crate::index::{ClaimRecord, Index, PoolConfig};
use crate::metrics::Metrics;

/// How many claim conflicts one dynamic pick tolerates before giving up.
const MAX_PICK_ATTEMPTS: usize = 32;

/// The claim store of one replica.
#[derive(Clone)]
pub struct Store {
    index: Arc<Mutex<Index>>,
    claims: Api<AllocationClaim>,
    client: Client,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
}

/// What a request created, so a denial can undo it.
#[derive(Default)]
struct Txn {
    created: Vec<(Value, Option<String>)>,
    pending: Vec<Value>,
}

enum ClaimOutcome {
    Mine,
    Taken(Owner),
}

impl Store {
    /// A store over `index`; `ready` turns true once every watch has listed.
    pub fn new(
        client: Client,
        index: Arc<Mutex<Index>>,
        metrics: Arc<Metrics>,
        ready: watch::Receiver<bool>,
    ) -> Self {
        Self { index, claims: Api::all(client.clone()), client, metrics, ready }
    }

    /// Whether the index has been rebuilt from the cluster.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Turns true once the index has been rebuilt from the cluster (for a
    /// readiness probe outside the webhook server).
    pub fn ready_signal(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// The index (for metrics and tests).
    pub fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    /// Claims every value of `plan` (or, on dry-run, only picks them) and
    /// returns what was assigned. On a denial nothing stays claimed.
    pub async fn reserve(&self, plan: &Plan, dry_run: bool) -> Result<Assigned, Denial> {
        if plan.supersede && !dry_run {
            self.release_superseded(plan).await;
        }
        let mut txn = Txn::default();
        let result = self.reserve_in(plan, dry_run, &mut txn).await;
        if result.is_err() {
            self.undo(&txn).await;
        } else if dry_run {
            self.metrics.dry_runs.inc();
        }
        let mut index = self.index();
        if result.is_ok() {
            let now = Instant::now();
            for (value, uid) in &txn.created {
                index.track_unconfirmed(*value, &plan.owner, uid.clone(), now);
            }
        }
        for value in txn.pending {
            index.release_pending(value);
        }
        result
    }

    async fn reserve_in(&self, plan: &Plan, dry_run: bool, txn: &mut Txn) -> Result<Assigned, Denial> {
        let mut assigned = Assigned::default();
        for need in &plan.ips {
            let ip = match need.requested {
                Some(ip) => {
                    self.claim_static(Value::Ip(ip), &need.field, &plan.owner, dry_run, txn).await?;
                    ip
                }
                None => {
                    let pick = |index: &mut Index| index.pick_ip(need.family).map(Value::Ip);
                    let value = self.claim_dynamic(pick, &need.field, &plan.owner, dry_run, txn).await?;
                    let Value::Ip(ip) = value else { return Err(wrong_kind(&need.field)) };
                    ip
                }
            };
            assigned.ips.push(ip);
        }
        if let Some(needs) = &plan.ports {
            let picked = self.index().pick_node_ports(&needs.ports, needs.needs, &plan.owner);
            let mut assignment = match picked {
                Ok(assignment) => assignment,
                Err(error) => return Err(self.port_denial(error, &plan.owner, needs.spec_index.as_slice())),
            };
            let requested: BTreeSet<u16> = needs
                .ports
                .iter()
                .filter_map(|p| p.requested_node_port)
                .chain(needs.needs.health_check.flatten())
                .collect();
            let distinct: BTreeSet<u16> = ports_of(&assignment);
            txn.pending.extend(distinct.iter().map(|p| Value::Port(*p)));
            if !dry_run {
                let outcomes =
                    join_all(distinct.iter().map(|port| self.create_claim(Value::Port(*port), &plan.owner)))
                        .await;
                for (port, outcome) in distinct.iter().zip(outcomes) {
                    let field = port_field(&assignment, &needs.spec_index, *port);
                    match outcome {
                        Ok((ClaimOutcome::Mine, uid)) => {
                            if uid.is_some() {
                                txn.created.push((Value::Port(*port), uid));
                            }
                        }
                        Ok((ClaimOutcome::Taken(holder), _)) if requested.contains(port) => {
                            return Err(Denial::invalid(
                                field,
                                format!("{port} is already allocated to {holder}"),
                            ));
                        }
                        Ok((ClaimOutcome::Taken(_), _)) => {
                            // Lost a race with another replica: pick again.
                            self.metrics.claim_conflicts.inc();
                            let pick = |index: &mut Index| index.pick_port().map(Value::Port);
                            let value = self.claim_dynamic(pick, &field, &plan.owner, false, txn).await?;
                            let Value::Port(new) = value else { return Err(wrong_kind(&field)) };
                            replace_port(&mut assignment, *port, new);
                        }
                        Err(error) => return Err(store_denial(&field, &error)),
                    }
                }
            }
            assigned.node_ports = Some(assignment);
        }
        if !dry_run {
            self.metrics.allocations.inc_by(txn.created.len() as u64);
        }
        Ok(assigned)
    }

    async fn claim_static(
        &self,
        value: Value,
        field: &str,
        owner: &Owner,
        dry_run: bool,
        txn: &mut Txn,
    ) -> Result<(), Denial> {
        {
            let mut index = self.index();
            index.check_in_range(value).map_err(|error| Denial::invalid(field, error.to_string()))?;
            if let Some(holder) = index.other_holder(value, owner) {
                return Err(Denial::invalid(
                    field,
                    format!("{value} is already allocated to {}", holder.describe()),
                ));
            }
            index.hold_pending(value);
            txn.pending.push(value);
        }
        if dry_run {
            return Ok(());
        }
        match self.create_claim(value, owner).await {
            Ok((ClaimOutcome::Mine, uid)) => {
                if uid.is_some() {
                    txn.created.push((value, uid));
                }
                Ok(())
            }
            Ok((ClaimOutcome::Taken(holder), _)) => {
                Err(Denial::invalid(field, format!("{value} is already allocated to {holder}")))
            }
            Err(error) => Err(store_denial(field, &error)),
        }
    }

    async fn claim_dynamic(
        &self,
        pick: impl Fn(&mut Index) -> Result<Value, IpamError>,
        field: &str,
        owner: &Owner,
        dry_run: bool,
        txn: &mut Txn,
    ) -> Result<Value, Denial> {
        for _ in 0..MAX_PICK_ATTEMPTS {
            let value = pick(&mut self.index()).map_err(|error| full_denial(field, &error))?;
            txn.pending.push(value);
            if dry_run {
                return Ok(value);
            }
            match self.create_claim(value, owner).await {
                Ok((ClaimOutcome::Mine, uid)) => {
                    if uid.is_some() {
                        txn.created.push((value, uid));
                    }
                    return Ok(value);
                }
                Ok((ClaimOutcome::Taken(_), _)) => {
                    self.metrics.claim_conflicts.inc();
                }
                Err(error) => return Err(store_denial(field, &error)),
            }
        }
        Err(Denial {
            field: field.to_owned(),
            message: "too many allocation conflicts, retry".to_owned(),
            code: 500,
        })
    }

    /// Creates the claim of `value` for `owner`. Returns the new claim's uid,
    /// `Mine` without a uid when `owner` already held it, or the holder.
    async fn create_claim(
        &self,
        value: Value,
        owner: &Owner,
    ) -> Result<(ClaimOutcome, Option<String>), kube::Error> {
        if let Some(claim) = self.index().claim(value)
            && claim.owner.matches(owner)
        {
            return Ok((ClaimOutcome::Mine, None));
        }
        match self.claims.create(&PostParams::default(), &build_claim(value, owner)).await {
            Ok(created) => {
                let uid = created.uid();
                self.index().apply_claim(value, ClaimRecord { owner: owner.clone(), uid: uid.clone() });
                Ok((ClaimOutcome::Mine, uid))
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                match self.claims.get_opt(&value.claim_name()).await? {
                    Some(existing) => {
                        let holder = claim_owner(&existing);
                        self.index()
                            .apply_claim(value, ClaimRecord { owner: holder.clone(), uid: existing.uid() });
                        if holder.matches(owner) {
                            Ok((ClaimOutcome::Mine, None))
                        } else {
                            Ok((ClaimOutcome::Taken(holder), None))
                        }
                    }
                    // Released in between: report it as taken so the
                    // caller picks again rather than loop on one value.
                    None => Ok((ClaimOutcome::Taken(owner.clone()), None)),
                }
            }
            Err(error) => Err(error),
        }
    }

    /// Releases what an earlier create of the same namespace/name claimed on
    /// this replica and no Service holds, keeping the values this request
    /// asks for (a reinvocation of the same request).
    async fn release_superseded(&self, plan: &Plan) {
        let mut keep: BTreeSet<Value> = plan.ips.iter().filter_map(|n| n.requested).map(Value::Ip).collect();
        if let Some(needs) = &plan.ports {
            keep.extend(
                needs
                    .ports
                    .iter()
                    .filter_map(|p| p.requested_node_port)
                    .chain(needs.needs.health_check.flatten())
                    .map(Value::Port),
            );
        }
        let superseded = self.index().superseded_by(&plan.owner, &keep);
        if superseded.is_empty() {
            return;
        }
        // The watch may lag behind an earlier create that did persist: ask the
        // apiserver (a quorum LIST, as RBAC grants list but not get).
        let services: Api<Service> = Api::namespaced(self.client.clone(), &plan.owner.namespace);
        let params = ListParams::default().fields(&format!("metadata.name={}", plan.owner.name));
        let persisted: BTreeSet<Value> = match services.list(&params).await {
            Ok(list) => list.items.iter().flat_map(service_values).collect(),
            Err(error) => {
                warn!(owner = %plan.owner, %error, "could not check for an earlier create; releasing nothing");
                return;
            }
        };
        for (value, uid) in superseded.into_iter().filter(|(value, _)| !persisted.contains(value)) {
            match delete_claim(&self.claims, value, uid).await {
                Ok(()) => {
                    debug!(owner = %plan.owner, %value, "released a failed earlier create's claim");
                    self.index().delete_claim(value);
                }
                Err(error) => warn!(owner = %plan.owner, %value, %error, "release failed; will retry"),
            }
        }
    }

    async fn undo(&self, txn: &Txn) {
        for (value, uid) in &txn.created {
            if let Err(error) = delete_claim(&self.claims, *value, uid.clone()).await {
                warn!(%value, %error, "could not undo claim; the repair loop will release it");
            }
            self.index().delete_claim(*value);
        }
    }

    fn port_denial(&self, error: NodePortError, owner: &Owner, spec_index: &[usize]) -> Denial {
        let field = renumber_field(&error.field, spec_index);
        match &error.source {
            IpamError::Allocated { value, .. } => {
                let holder = value
                    .parse()
                    .ok()
                    .and_then(|port| self.index().other_holder(Value::Port(port), owner))
                    .map(|holder| holder.describe())
                    .unwrap_or_else(|| "another port of this Service".to_owned());
                Denial::invalid(field, format!("{value} is already allocated to {holder}"))
            }
            IpamError::Full { .. } => full_denial(&field, &error.source),
            other => Denial::invalid(field, other.to_string()),
        }
    }
}

fn wrong_kind(field: &str) -> Denial {
    Denial { field: field.to_owned(), message: "internal error: wrong value kind".to_owned(), code: 500 }
}

fn full_denial(field: &str, error: &IpamError) -> Denial {
    let what = if field.contains("clusterIP") { "ClusterIP" } else { "NodePort" };
    let message = match error {
        IpamError::Full { range } => format!("failed to allocate a {what}: pool {range} is full"),
        other => other.to_string(),
    };
    Denial { field: field.to_owned(), message, code: 422 }
}

fn store_denial(field: &str, error: &kube::Error) -> Denial {
    Denial {
        field: field.to_owned(),
        message: format!("failed to record the allocation: {error}"),
        code: 500,
    }
}

/// ipam names fields by the index in the list it was given; map that back
/// to the index in `spec.ports`.
fn renumber_field(field: &str, spec_index: &[usize]) -> String {
    let Some(rest) = field.strip_prefix("spec.ports[") else { return field.to_owned() };
    let Some((number, tail)) = rest.split_once(']') else { return field.to_owned() };
    match number.parse::<usize>().ok().and_then(|i| spec_index.get(i)) {
        Some(real) => format!("spec.ports[{real}]{tail}"),
        None => field.to_owned(),
    }
}

fn ports_of(assignment: &NodePortAssignment) -> BTreeSet<u16> {
    assignment.node_ports.iter().flatten().chain(&assignment.health_check_node_port).copied().collect()
}

fn port_field(assignment: &NodePortAssignment, spec_index: &[usize], port: u16) -> String {
    match assignment.node_ports.iter().position(|p| *p == Some(port)) {
        Some(i) => format!("spec.ports[{}].nodePort", spec_index.get(i).copied().unwrap_or(i)),
        None => "spec.healthCheckNodePort".to_owned(),
    }
}

fn replace_port(assignment: &mut NodePortAssignment, old: u16, new: u16) {
    for port in assignment.node_ports.iter_mut().flatten() {
        if *port == old {
            *port = new;
        }
    }
    if assignment.health_check_node_port == Some(old) {
        assignment.health_check_node_port = Some(new);
    }
}

/// Deletes the claim of `value`, only if it is still the object with `uid`
/// (so a claim re-made for a new Service is never deleted by mistake).
/// A missing claim is not an error.
pub async fn delete_claim(
    claims: &Api<AllocationClaim>,
    value: Value,
    uid: Option<String>,
) -> Result<(), kube::Error> {
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions { uid: Some(uid), resource_version: None }),
        ..DeleteParams::default()
    };
    match claims.delete(&value.claim_name(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(error) => Err(error),
    }
}

pub(crate) fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    // A panic while holding the lock leaves a consistent-enough index (each
    // method keeps its own invariant), so poisoning is ignored.
    index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The pools from ServiceCIDR objects (the `kubernetes` one first), or
/// `fallback` when there are none.
pub fn pools_from(cidrs: &BTreeMap<String, ServiceCIDR>, fallback: &PoolConfig) -> PoolConfig {
    let mut ordered: Vec<&ServiceCIDR> =
        cidrs.values().filter(|c| c.metadata.deletion_timestamp.is_none()).collect();
    ordered.sort_by_key(|c| (c.name_any() != "kubernetes", c.name_any()));
    let parsed: Vec<IpNetwork> = ordered
        .iter()
        .flat_map(|c| c.spec.as_ref().and_then(|s| s.cidrs.clone()).unwrap_or_default())
        .filter_map(|cidr| cidr.parse().ok())
        .collect();
    if parsed.is_empty() {
        fallback.clone()
    } else {
        PoolConfig { cidrs: parsed, node_ports: fallback.node_ports }
    }
}

/// What the watches release on their own, without waiting for repair.
#[derive(Clone, Copy, Debug)]
pub struct ReleasePolicy {
    /// Delete a Service's claims when the watch sees it deleted, and the
    /// claims of values an update dropped (a type change) when it sees the
    /// update.
    pub on_service_change: bool,
    /// Age after which a claim this replica created, that no Service has been
    /// seen holding, is released (its request failed after admission).
    pub unconfirmed_grace: Duration,
}

/// How often the unconfirmed claims are checked against `unconfirmed_grace`.
const UNCONFIRMED_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Every how many checks the placeholder claims are swept (every 10 s): the
/// Service watch re-keys at once, the sweep only catches what it missed.
const PLACEHOLDER_SWEEP_EVERY: u32 = 20;

/// Keeps `index` in step with claims, Services and ServiceCIDRs until the
/// streams end; sets `ready` once all three have listed. Releases what
/// `release` says at once, and re-keys a `prefix*` placeholder claim to
/// the Service the apiserver named.
/// A failed watch is retried with kube-runtime's default backoff (as the
/// controllers' watches), so an apiserver outage does not spin.
pub async fn run_watches(
    client: Client,
    index: Arc<Mutex<Index>>,
    fallback: PoolConfig,
    ready: watch::Sender<bool>,
    release: ReleasePolicy,
) {
    let listed = Arc::new(Mutex::new([false; 3]));
    let mark = {
        let listed = listed.clone();
        move |which: usize| {
            let mut seen = listed.lock().unwrap_or_else(|p| p.into_inner());
            seen[which] = true;
            if seen.iter().all(|s| *s) {
                let _ = ready.send(true);
            }
        }
    };
    let claims = watch_claims(Api::all(client.clone()), index.clone(), mark.clone());
    let services = watch_services(client.clone(), index.clone(), mark.clone(), release.on_service_change);
    let unconfirmed = release_unconfirmed(Api::all(client.clone()), index.clone(), release.unconfirmed_grace);
    let cidrs = watch_cidrs(Api::all(client), index, fallback, mark);
    tokio::join!(claims, services, cidrs, unconfirmed);
}

/// Releases the claims this replica created for requests that never
/// persisted: no Service of their owner holds them after `grace`. Also
/// re-keys placeholder claims the Service watch's own re-key missed.
async fn release_unconfirmed(claims: Api<AllocationClaim>, index: Arc<Mutex<Index>>, grace: Duration) {
    let mut tick = tokio::time::interval(UNCONFIRMED_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeps = 0_u32;
    loop {
        tick.tick().await;
        sweeps = sweeps.wrapping_add(1);
        if sweeps.is_multiple_of(PLACEHOLDER_SWEEP_EVERY) {
            let placeholders = lock(&index).held_placeholders();
            for (value, uid, owner) in placeholders {
                if rekey_claim(&claims, value, uid, &owner).await {
                    debug!(%owner, %value, "claim re-keyed from its generateName placeholder by the sweep");
                }
            }
        }
        let expired = lock(&index).expired_unconfirmed(Instant::now(), grace);
        for (value, uid) in expired {
            match delete_claim(&claims, value, uid).await {
                Ok(()) => {
                    debug!(%value, "released a claim no Service took up");
                    lock(&index).delete_claim(value);
                }
                Err(error) => warn!(%value, %error, "release failed; will retry"),
            }
        }
    }
}

/// Re-keys the placeholder claim of `value` (uid `uid`) to `owner`: delete
/// it with a uid precondition, then create it under the real name. Only the
/// replica whose delete succeeded creates, so replicas do not race.
async fn rekey_claim(
    claims: &Api<AllocationClaim>,
    value: Value,
    uid: Option<String>,
    owner: &Owner,
) -> bool {
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions { uid: Some(uid), resource_version: None }),
        ..DeleteParams::default()
    };
    match claims.delete(&value.claim_name(), &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => return false,
        Err(error) => {
            warn!(%owner, %value, %error, "could not re-key the placeholder claim");
            return false;
        }
    }
    match claims.create(&PostParams::default(), &build_claim(value, owner)).await {
        Ok(_) => true,
        Err(error) => {
            // The Service still carries the value, so the index keeps it
            // taken and repair re-adopts it.
            warn!(%owner, %value, %error, "could not re-create the claim under the Service's name");
            false
        }
    }
}

async fn watch_claims(api: Api<AllocationClaim>, index: Arc<Mutex<Index>>, mark: impl Fn(usize)) {
    let mut stream = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut buffer = Vec::new();
    while let Some(event) = stream.next().await {
        let record = |claim: &AllocationClaim| {
            Value::from_spec(&claim.spec)
                .map(|v| (v, ClaimRecord { owner: claim_owner(claim), uid: claim.uid() }))
        };
        match event {
            Ok(Event::Init) => buffer.clear(),
            Ok(Event::InitApply(claim)) => buffer.extend(record(&claim)),
            Ok(Event::InitDone) => {
                lock(&index).replace_claims(buffer.drain(..));
                mark(0);
            }
            Ok(Event::Apply(claim)) => {
                if let Some((value, record)) = record(&claim) {
                    lock(&index).apply_claim(value, record);
                }
            }
            Ok(Event::Delete(claim)) => {
                if let Some(value) = Value::from_spec(&claim.spec) {
                    lock(&index).delete_claim(value);
                }
            }
            Err(error) => warn!(%error, "AllocationClaim watch failed; retrying"),
        }
    }
}

fn owner_of(service: &Service) -> Owner {
    Owner { namespace: service.namespace().unwrap_or_default(), name: service.name_any() }
}

async fn watch_services(
    client: Client,
    index: Arc<Mutex<Index>>,
    mark: impl Fn(usize),
    release_on_delete: bool,
) {
    let claims: Api<AllocationClaim> = Api::all(client.clone());
    let api: Api<Service> = Api::all(client);
    let mut stream = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut buffer = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => buffer.clear(),
            Ok(Event::InitApply(service)) => buffer.push((owner_of(&service), service_values(&service))),
            Ok(Event::InitDone) => {
                lock(&index).replace_services(buffer.drain(..));
                mark(1);
            }
            Ok(Event::Apply(service)) => {
                let owner = owner_of(&service);
                let values = service_values(&service);
                let (dropped, placeholders) = {
                    let mut index = lock(&index);
                    let before = index.service_values(&owner);
                    index.apply_service(owner.clone(), values.clone());
                    let dropped: Vec<(Value, Option<String>)> = before
                        .difference(&values)
                        .filter(|v| !index.is_held(**v))
                        .filter_map(|v| {
                            index.claim(*v).filter(|c| c.owner.matches(&owner)).map(|c| (*v, c.uid.clone()))
                        })
                        .collect();
                    let placeholders: Vec<(Value, Option<String>)> = values
                        .iter()
                        .filter_map(|v| {
                            index
                                .claim(*v)
                                .filter(|c| c.owner.name.ends_with('*') && c.owner.matches(&owner))
                                .map(|c| (*v, c.uid.clone()))
                        })
                        .collect();
                    (dropped, placeholders)
                };
                if release_on_delete {
                    // A type change (NodePort -> ClusterIP, -> ExternalName) or a
                    // downgrade to single stack frees values at once, as in
                    // kube-apiserver.
                    for (value, uid) in dropped {
                        match delete_claim(&claims, value, uid).await {
                            Ok(()) => debug!(%owner, %value, "released on Service update"),
                            Err(error) => warn!(%owner, %value, %error, "release failed; repair will retry"),
                        }
                    }
                }
                for (value, uid) in placeholders {
                    if rekey_claim(&claims, value, uid, &owner).await {
                        debug!(%owner, %value, "claim re-keyed from its generateName placeholder");
                    }
                }
            }
            Ok(Event::Delete(service)) => {
                let owner = owner_of(&service);
                let values = service_values(&service);
                let to_release: Vec<(Value, Option<String>)> = {
                    let mut index = lock(&index);
                    index.delete_service(&owner);
                    values
                        .iter()
                        .filter_map(|v| {
                            index.claim(*v).filter(|c| c.owner.matches(&owner)).map(|c| (*v, c.uid.clone()))
                        })
                        .collect()
                };
                if release_on_delete {
                    for (value, uid) in to_release {
                        match delete_claim(&claims, value, uid).await {
                            Ok(()) => debug!(%owner, %value, "released on Service delete"),
                            Err(error) => warn!(%owner, %value, %error, "release failed; repair will retry"),
                        }
                    }
                }
            }
            Err(error) => warn!(%error, "Service watch failed; retrying"),
        }
    }
}

async fn watch_cidrs(
    api: Api<ServiceCIDR>,
    index: Arc<Mutex<Index>>,
    fallback: PoolConfig,
    mark: impl Fn(usize),
) {
    let mut stream = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
    let mut current: BTreeMap<String, ServiceCIDR> = BTreeMap::new();
    let mut buffer = BTreeMap::new();
    while let Some(event) = stream.next().await {
        let changed = match event {
            Ok(Event::Init) => {
                buffer.clear();
                false
            }
            Ok(Event::InitApply(cidr)) => {
                buffer.insert(cidr.name_any(), cidr);
                false
            }
            Ok(Event::InitDone) => {
                current = std::mem::take(&mut buffer);
                true
            }
            Ok(Event::Apply(cidr)) => {
                current.insert(cidr.name_any(), cidr);
                true
            }
            Ok(Event::Delete(cidr)) => {
                current.remove(&cidr.name_any());
                true
            }
            Err(error) => {
                warn!(%error, "ServiceCIDR watch failed; retrying");
                false
            }
        };
        if changed {
            let pools = pools_from(&current, &fallback);
            if let Err(error) = lock(&index).set_pools(pools.clone()) {
                warn!(%error, "ignoring unusable Service CIDRs");
            } else {
                info!(cidrs = ?pools.cidrs, node_ports = %pools.node_ports, "pools");
            }
            mark(2);
        }
    }
}

/// Parses a comma-separated CIDR list.
pub fn parse_cidrs(text: &str) -> Result<Vec<IpNetwork>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<IpNetwork>().map_err(|e| format!("{s}: {e}")))
        .collect()
}
