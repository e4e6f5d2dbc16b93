//! The allocator of one replica: turns a [`Plan`] into `AllocationClaim`s,
//! one claim transaction per admission call.
//!
//! Calls the API: creates and deletes claims (and LISTs the Service of a
//! superseded create). A create that fails with 409 AlreadyExists means
//! another replica (or request) holds the value: a dynamic pick then tries
//! another value, a static request is denied naming the holder. A denied
//! request deletes the claims it created. Named `Allocator`, not `Store`: it
//! caches no objects, and kube's `reflector::Store` (used by `watches.rs`) does.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use svcplane_ipam::{IpFamily, IpamError, NodePortAssignment, NodePortError};
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use crate::admit::{Assigned, Denial, IpNeed, Plan, PortNeeds, service_values};
use crate::blocks::{self, BlockKind};
use crate::claim::{AllocationClaim, Owner, Value, build_claim, claim_owner};
use crate::index::{ClaimRecord, Index, assigned_ports, lock, requested_ports};
use crate::metrics::Metrics;
use crate::retention;
use crate::service_ip_pools::{IpPickError, ServiceRef};

/// How long a create waits for the watches to fold the delete of its
/// namesake (see `await_retention_of_namesake`); they take milliseconds.
const NAMESAKE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How often that wait looks at the index.
const NAMESAKE_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// How many claim conflicts one dynamic pick tolerates before giving up.
const MAX_PICK_ATTEMPTS: usize = 32;

/// Tries to write the claim of a value handed out from a block, and the
/// pause after the first failure (doubled each time).
const DEFERRED_WRITE_ATTEMPTS: u32 = 6;
const DEFERRED_WRITE_BACKOFF: Duration = Duration::from_millis(200);

/// How long an admission call waits for a block it had to create, and how
/// often it looks whether the watch delivered it.
const BLOCK_WAIT: Duration = Duration::from_secs(2);
const BLOCK_POLL: Duration = Duration::from_millis(2);

/// The allocator of one replica: its index and the claims API.
#[derive(Clone)]
pub struct Allocator {
    index: Arc<Mutex<Index>>,
    claims: Api<AllocationClaim>,
    client: Client,
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    /// `--webhook-block-size`; 0: every value is claimed inside the call.
    block_size: u16,
    /// Wakes the block keeper after a hand-out.
    blocks_used: Arc<Notify>,
    /// Held while this replica creates a block.
    acquiring: Arc<tokio::sync::Mutex<()>>,
    /// Admission calls waiting for a value from a block: how many values
    /// the next acquisition should bring.
    waiting: Arc<AtomicUsize>,
}

/// One admission call counted in [`Allocator::waiting`] while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One admission call's claims: what it created, so a denial can undo it,
/// and what it holds pending in the index until it ends.
struct Txn<'a> {
    owner: &'a Owner,
    dry_run: bool,
    validating: bool,
    created: Vec<(Value, Option<String>)>,
    pending: Vec<Value>,
    /// Handed out from this replica's blocks: claimed after the answer.
    deferred: Vec<Value>,
}

/// What a claim create found: the owner holds the value (with the uid of
/// the claim when this create made it), or `Err(holder)`, another Service.
type ClaimOutcome = Result<Option<String>, Owner>;

impl Txn<'_> {
    /// Records `outcome` for `value`; `Err(holder)` when another Service holds it.
    fn note(&mut self, value: Value, outcome: ClaimOutcome) -> Result<(), Owner> {
        if let Some(uid) = outcome? {
            self.created.push((value, Some(uid)));
        }
        Ok(())
    }
}

impl Allocator {
    /// An allocator over `index`; `ready` turns true once every watch has listed.
    pub fn new(
        client: Client,
        index: Arc<Mutex<Index>>,
        metrics: Arc<Metrics>,
        ready: watch::Receiver<bool>,
    ) -> Self {
        lock(&index).set_replica(blocks::replica_name());
        let (block_size, blocks_used, acquiring, waiting) =
            (0, Arc::default(), Arc::default(), Arc::default());
        let claims = Api::all(client.clone());
        Self { index, claims, client, metrics, ready, block_size, blocks_used, acquiring, waiting }
    }

    /// Hands out dynamic values from blocks of `size` (0: never); the block
    /// keeper (`block_keeper.rs`) must run beside it.
    pub fn with_blocks(mut self, size: u16) -> Self {
        self.block_size = size;
        self
    }

    /// `--webhook-block-size`.
    pub fn block_size(&self) -> u16 {
        self.block_size
    }

    /// Notified after each hand-out from a block.
    pub fn blocks_used(&self) -> Arc<Notify> {
        self.blocks_used.clone()
    }

    /// Held while this replica creates a block.
    pub(crate) fn acquiring(&self) -> &tokio::sync::Mutex<()> {
        &self.acquiring
    }

    /// How many admission calls wait for a value from a block.
    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The claims API.
    pub(crate) fn claims_api(&self) -> &Api<AllocationClaim> {
        &self.claims
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

    /// The index (for the handler's IP families, and for tests).
    pub fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    /// Claims every value of `plan` (or, on dry-run, only picks them) and
    /// returns what was assigned. On a denial nothing stays claimed.
    pub async fn reserve(&self, plan: &Plan, dry_run: bool) -> Result<Assigned, Denial> {
        if plan.supersede {
            self.await_retention_of_namesake(&plan.owner).await;
        }
        if plan.supersede && !dry_run {
            self.release_superseded(plan).await;
        }
        let (validating, created, pending, deferred) = (plan.validating, Vec::new(), Vec::new(), Vec::new());
        let mut txn = Txn { owner: &plan.owner, dry_run, validating, created, pending, deferred };
        let result = self.reserve_in(plan, &mut txn).await;
        if result.is_err() {
            self.undo(&txn).await;
        } else if dry_run {
            self.metrics.dry_runs.inc();
        } else if !txn.deferred.is_empty() {
            self.metrics.block_handouts.inc_by(txn.deferred.len() as u64);
            let (allocator, owner, values) = (self.clone(), plan.owner.clone(), txn.deferred.clone());
            tokio::spawn(async move { allocator.write_deferred(&owner, values).await });
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

    async fn reserve_in(&self, plan: &Plan, txn: &mut Txn<'_>) -> Result<Assigned, Denial> {
        let mut assigned = Assigned::default();
        for need in &plan.ips {
            let service = ServiceRef { namespace: &plan.owner.namespace, labels: &plan.labels };
            let ip = match need.requested {
                Some(ip) => {
                    let access = self.index().check_pool_access(ip, service);
                    access.map_err(|why| Denial::invalid(&need.field, why))?;
                    self.claim_static(Value::Ip(ip), &need.field, txn).await.map(|()| ip)?
                }
                None => match self.claim_retained_ip(need, txn).await {
                    Some(ip) => ip,
                    None => match self.take_ip_from_block(need.family, service, txn).await {
                        Some(ip) => ip,
                        None => {
                            let pick = |index: &mut Index| index.pick_ip_for(need.family, service);
                            let family = need.family;
                            let reusable = move |index: &Index, value: Value| match value {
                                Value::Ip(ip) => {
                                    IpFamily::of(ip) == family && index.check_in_range(value).is_ok()
                                }
                                Value::Port(_) => false,
                            };
                            match self.claim_dynamic(pick, Value::Ip, &reusable, &need.field, txn).await {
                                Ok(ip) => ip,
                                // A dry run answers with the value the real
                                // request would take over, releasing nothing.
                                Err(denial) if txn.dry_run => {
                                    let index = self.index();
                                    match index.retained.oldest(|value| reusable(&index, value)) {
                                        Some((Value::Ip(ip), _)) => ip,
                                        _ => return Err(denial),
                                    }
                                }
                                Err(denial) => return Err(denial),
                            }
                        }
                    },
                },
            };
            assigned.ips.push(ip);
        }
        if let Some(needs) = &plan.ports {
            let picked = self.pick_node_ports(needs, &plan.owner, txn.dry_run).await;
            let mut assignment = picked.map_err(|error| {
                port_denial(&self.index(), &error, &plan.owner, needs.spec_index.as_slice())
            })?;
            let requested = requested_ports(&needs.ports, needs.needs);
            self.swap_in_block_ports(&mut assignment, &requested, txn).await;
            let mut distinct = assigned_ports(&assignment);
            distinct.retain(|port| !txn.deferred.contains(&Value::Port(*port)));
            txn.pending.extend(distinct.iter().map(|p| Value::Port(*p)));
            if !txn.dry_run {
                let mut dynamic = self.dynamic_ports(&assignment, &requested, &plan.owner);
                dynamic.retain(|port| distinct.contains(port));
                dynamic.iter().for_each(|port| self.expect_echo(Value::Port(*port)));
                let creates = distinct.iter().map(|port| self.claim_unless_vouched(Value::Port(*port), txn));
                for (port, outcome) in distinct.iter().zip(join_all(creates).await) {
                    let field = port_field(&assignment, &needs.spec_index, *port);
                    match outcome.map(|outcome| txn.note(Value::Port(*port), outcome)) {
                        Ok(Ok(())) if !dynamic.contains(port) => {}
                        Ok(Ok(())) if !self.yields_to_a_block(Value::Port(*port), txn).await => {}
                        Ok(Ok(())) => {
                            // Picked one at a time inside another replica's
                            // block: that replica may hand it out; pick again.
                            self.metrics.claim_conflicts.inc();
                            let pick = |index: &mut Index| index.pick_port();
                            let reusable = |_: &Index, value: Value| matches!(value, Value::Port(_));
                            let new = self.claim_dynamic(pick, Value::Port, reusable, &field, txn).await?;
                            replace_port(&mut assignment, *port, new);
                        }
                        Ok(Err(holder)) if requested.contains(port) => {
                            return Err(taken_denial(field, port, holder));
                        }
                        Ok(Err(_)) => {
                            // Lost a race with another replica: pick again.
                            self.index().end_echo(Value::Port(*port));
                            self.metrics.claim_conflicts.inc();
                            let pick = |index: &mut Index| index.pick_port();
                            let reusable = |_: &Index, value: Value| matches!(value, Value::Port(_));
                            let new = self.claim_dynamic(pick, Value::Port, reusable, &field, txn).await?;
                            replace_port(&mut assignment, *port, new);
                        }
                        Err(error) => {
                            let mut index = self.index();
                            dynamic.iter().for_each(|port| index.end_echo(Value::Port(*port)));
                            return Err(store_denial(&field, &error));
                        }
                    }
                }
            }
            assigned.node_ports = Some(assignment);
        }
        if !txn.dry_run {
            self.metrics.allocations.inc_by(txn.created.len() as u64);
        }
        Ok(assigned)
    }

    async fn claim_static(&self, value: Value, field: &str, txn: &mut Txn<'_>) -> Result<(), Denial> {
        {
            let mut index = self.index();
            index.check_in_range(value).map_err(|error| Denial::invalid(field, error.to_string()))?;
            if let Some(holder) = index.other_holder(value, txn.owner) {
                return Err(taken_denial(field, value, holder.describe()));
            }
            index.hold_pending(value);
            txn.pending.push(value);
        }
        if txn.dry_run {
            return Ok(());
        }
        match self.claim_unless_vouched(value, txn).await {
            Ok(outcome) => txn.note(value, outcome).map_err(|holder| taken_denial(field, value, holder)),
            Err(error) => Err(store_denial(field, &error)),
        }
    }

    /// Waits (at most [`NAMESAKE_WAIT`]) until the watches have folded the
    /// delete of a Service of this create's namespace/name, if the index
    /// still shows one holding values, and the retention (or release) of
    /// each of those values: `kubectl delete` then `create` comes within
    /// milliseconds, often before the watch has seen the delete, and the
    /// values are only handed back once retained. A create whose name really
    /// exists fails with AlreadyExists after this wait.
    async fn await_retention_of_namesake(&self, owner: &Owner) {
        let stale = self.index().service_values(owner);
        if stale.is_empty() {
            return;
        }
        let deadline = Instant::now() + NAMESAKE_WAIT;
        while Instant::now() < deadline {
            let settled = {
                let index = self.index();
                index.service_values(owner).is_empty()
                    && stale.iter().all(|value| {
                        index.retained.get(*value).is_some()
                            || index.claim(*value).is_none_or(|claim| claim.owner != *owner)
                    })
            };
            if settled {
                return;
            }
            tokio::time::sleep(NAMESAKE_POLL).await;
        }
    }

    /// The IP of `need`'s family retained for this Service since it was
    /// deleted, claimed as if requested; `None` when there is none or it
    /// cannot be had (then a new one is picked).
    async fn claim_retained_ip(&self, need: &IpNeed, txn: &mut Txn<'_>) -> Option<IpAddr> {
        let ip = self.index().retained.preferred_ip(txn.owner, need.family)?;
        self.claim_static(Value::Ip(ip), &need.field, txn).await.ok().map(|()| ip)
    }

    /// Assigns the nodePorts of `needs`: those retained for `owner` back on
    /// the same ports when it can have them, and when the range is otherwise
    /// full, after releasing the oldest retained port (not on dry-run).
    async fn pick_node_ports(
        &self,
        needs: &PortNeeds,
        owner: &Owner,
        dry_run: bool,
    ) -> Result<NodePortAssignment, NodePortError> {
        let (ports, with_retained) = retention::with_retained_ports(&self.index().retained, owner, needs);
        let preferred = self.index().pick_node_ports(&ports, with_retained, owner);
        if let Ok(assignment) = preferred {
            return Ok(assignment);
        }
        loop {
            let picked = self.index().pick_node_ports(&needs.ports, needs.needs, owner);
            let full = matches!(&picked, Err(error) if matches!(error.source, IpamError::Full { .. }));
            let reusable = |_: &Index, value: Value| matches!(value, Value::Port(_));
            if !full || dry_run || !self.release_oldest_retained(reusable).await {
                return picked;
            }
        }
    }

    /// Releases the retained claim whose window ends first among those
    /// `reusable` accepts, for a pool that is otherwise full; false when there
    /// is none. Every replica may try: the delete's preconditions let one win.
    async fn release_oldest_retained(&self, reusable: impl Fn(&Index, Value) -> bool) -> bool {
        let oldest = {
            let index = self.index();
            index.retained.oldest(|value| reusable(&index, value))
        };
        let Some((value, retention)) = oldest else { return false };
        match retention::release_claim(&self.claims, value, &retention).await {
            Ok(true) => {
                info!(%value, owner = %retention.owner, "released a retained value: its pool is otherwise full");
                self.index().delete_claim(value);
            }
            // Confirmed by its returning owner or released by another
            // replica meanwhile: the claim watch brings the news.
            Ok(false) => self.index().retained.forget(value),
            Err(error) => {
                warn!(%value, %error, "could not release a retained value");
                return false;
            }
        }
        true
    }

    /// Picks with `pick` (which holds the value pending) and claims, picking
    /// again after a conflict; `wrap` names the picked thing as a [`Value`].
    /// A full range first gives up its oldest `reusable` retained value (a
    /// full ServiceIPPool does not: see webhook/README.md).
    async fn claim_dynamic<T: Copy, E: PickDenial>(
        &self,
        pick: impl Fn(&mut Index) -> Result<T, E>,
        wrap: fn(T) -> Value,
        reusable: impl Fn(&Index, Value) -> bool,
        field: &str,
        txn: &mut Txn<'_>,
    ) -> Result<T, Denial> {
        for _ in 0..MAX_PICK_ATTEMPTS {
            let picked = pick(&mut self.index());
            let picked = match picked {
                Ok(picked) => picked,
                Err(error)
                    if error.is_range_full()
                        && !txn.dry_run
                        && self.release_oldest_retained(&reusable).await =>
                {
                    continue;
                }
                Err(error) => return Err(error.denial(field)),
            };
            let value = wrap(picked);
            txn.pending.push(value);
            if txn.dry_run {
                return Ok(picked);
            }
            self.expect_echo(value);
            let outcome = self.create_claim(value, txn.owner).await;
            match outcome.map(|outcome| txn.note(value, outcome)) {
                Ok(Ok(())) if !self.yields_to_a_block(value, txn).await => return Ok(picked),
                Ok(Ok(())) => {
                    self.metrics.claim_conflicts.inc();
                }
                Ok(Err(_)) => {
                    self.index().end_echo(value);
                    self.metrics.claim_conflicts.inc();
                }
                Err(error) => {
                    self.index().end_echo(value);
                    return Err(store_denial(field, &error));
                }
            }
        }
        Err(Denial { code: 500, ..Denial::invalid(field, "too many allocation conflicts, retry") })
    }

    /// Creates the claim of `value` for `owner`, unless the index shows
    /// `owner` already holds it. On 409 the index learns the real holder.
    async fn create_claim(&self, value: Value, owner: &Owner) -> Result<ClaimOutcome, kube::Error> {
        if let Some(claim) = self.index().claim(value)
            && claim.owner.matches(owner)
        {
            return Ok(Ok(None));
        }
        match self.claims.create(&PostParams::default(), &build_claim(value, owner)).await {
            Ok(created) => {
                let uid = created.uid();
                self.index().apply_claim(value, ClaimRecord { owner: owner.clone(), uid: uid.clone() });
                // A created claim without a uid is never undone (cannot happen).
                Ok(Ok(uid))
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Released in between: report it as taken so the caller
                // picks again rather than loop on one value.
                let Some(existing) = self.claims.get_opt(&value.claim_name()).await? else {
                    return Ok(Err(owner.clone()));
                };
                let holder = claim_owner(&existing);
                self.index().apply_claim(value, ClaimRecord { owner: holder.clone(), uid: existing.uid() });
                Ok(if holder.matches(owner) { Ok(None) } else { Err(holder) })
            }
            Err(error) => Err(error),
        }
    }

    /// Releases what an earlier create of the same namespace/name claimed on
    /// this replica and no Service holds, keeping the values this request
    /// asks for (a reinvocation of the same request).
    async fn release_superseded(&self, plan: &Plan) {
        let superseded = {
            let index = self.index();
            let mut superseded = index.superseded_by(&plan.owner, &requested_values(plan));
            // A Service deleted before this replica saw it confirmed left
            // its claims tracked as unconfirmed: retained, they are its own.
            superseded.retain(|(value, _)| index.retained.get(*value).is_none());
            superseded
        };
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
        let superseded = superseded.into_iter().filter(|(value, _)| !persisted.contains(value)).collect();
        release_claims(&self.claims, &self.index, superseded, "a failed earlier create claimed it").await;
    }

    /// A value of `family` from this replica's blocks for `service`, recorded
    /// in `txn` as deferred; `None` without blocks, on dry-run, or for a
    /// Service a ServiceIPPool of the family selects (pools are claimed one
    /// value at a time).
    async fn take_ip_from_block(
        &self,
        family: IpFamily,
        service: ServiceRef<'_>,
        txn: &mut Txn<'_>,
    ) -> Option<IpAddr> {
        if self.block_size == 0 || txn.dry_run || self.index().service_ip_pools().selects(family, service) {
            return None;
        }
        match self.take_or_acquire(BlockKind::Ip(family), txn.owner).await {
            Some(value @ Value::Ip(ip)) => {
                txn.deferred.push(value);
                Some(ip)
            }
            _ => None,
        }
    }

    /// A value of `kind` from this replica's blocks for `owner`. When they
    /// have none left (a burst outran the keeper), creates a block now and
    /// waits for the watch to deliver it (see `BlockRecord::seen`), so that
    /// in block mode dynamic values come from blocks only: a value picked
    /// one at a time could lie in a block another replica just created.
    /// `None` when blocks are not worthwhile or none could be had.
    async fn take_or_acquire(&self, kind: BlockKind, owner: &Owner) -> Option<Value> {
        let deadline = Instant::now() + BLOCK_WAIT;
        let _waiting = Waiting::enter(&self.waiting);
        loop {
            let now = SystemTime::now();
            let (taken, worthwhile, awaited) = {
                let mut index = self.index();
                let taken = index.take_from_block(kind, owner, now);
                (taken, index.blocks_worthwhile(kind, self.block_size), index.awaits_block(kind, now))
            };
            self.blocks_used.notify_one();
            if taken.is_some() || !worthwhile || Instant::now() >= deadline {
                return taken;
            }
            if awaited {
                tokio::time::sleep(BLOCK_POLL).await;
            } else if !crate::block_keeper::acquire(self, kind, self.block_size, self.waiting()).await {
                // Concurrent calls queue in `acquire`: the first creates a
                // block, the others find it and take from it.
                return None;
            }
        }
    }

    /// Replaces the dynamically picked nodePorts of `assignment` (neither
    /// requested nor retained for this Service) with values from this
    /// replica's blocks while they have some, recording those as deferred.
    async fn swap_in_block_ports(
        &self,
        assignment: &mut NodePortAssignment,
        requested: &BTreeSet<u16>,
        txn: &mut Txn<'_>,
    ) {
        if self.block_size == 0 || txn.dry_run {
            return;
        }
        for port in self.dynamic_ports(assignment, requested, txn.owner) {
            let Some(Value::Port(new)) = self.take_or_acquire(BlockKind::Port, txn.owner).await else {
                break;
            };
            replace_port(assignment, port, new);
            self.index().release_pending(Value::Port(port));
            txn.deferred.push(Value::Port(new));
        }
    }

    /// The nodePorts of `assignment` that were picked, not asked for:
    /// neither requested nor retained for `owner`'s re-creation.
    fn dynamic_ports(
        &self,
        assignment: &NodePortAssignment,
        requested: &BTreeSet<u16>,
        owner: &Owner,
    ) -> BTreeSet<u16> {
        let retained = self.index().retained.for_owner(owner);
        let mut ports = assigned_ports(assignment);
        ports.retain(|port| {
            !requested.contains(port) && !retained.iter().any(|(v, _)| *v == Value::Port(*port))
        });
        ports
    }

    /// Starts waiting for the echo of a claim picked one at a time, when
    /// blocks are on (see [`Allocator::yields_to_a_block`]).
    fn expect_echo(&self, value: Value) {
        if self.block_size > 0 {
            self.index().expect_echo(value);
        }
    }

    /// Whether the claim `txn` just created for `value`, a value picked one
    /// at a time while blocks are on, must give way to a block: it lies in
    /// another replica's block that existed before the claim. The watch
    /// delivers writes in order, so once it delivered this claim the index
    /// holds every block made before it; a block made after it never hands
    /// the value out (its holder waits for its own block's echo, by which
    /// time it has seen this claim). Giving way deletes the claim, and
    /// `txn` forgets it. Without blocks, or when the echo does not come in
    /// time, the claim stands.
    async fn yields_to_a_block(&self, value: Value, txn: &mut Txn<'_>) -> bool {
        if self.block_size == 0 {
            return false;
        }
        let uid = txn.created.iter().find(|(v, _)| *v == value).and_then(|(_, uid)| uid.clone());
        let Some(uid) = uid else {
            self.index().end_echo(value);
            return false;
        };
        let deadline = Instant::now() + BLOCK_WAIT;
        while !self.index().echoed(value, &Some(uid.clone())) && Instant::now() < deadline {
            tokio::time::sleep(BLOCK_POLL).await;
        }
        let yields = {
            let mut index = self.index();
            index.end_echo(value);
            index.in_foreign_block(value)
        };
        if yields {
            if let Err(error) = delete_claim(&self.claims, value, Some(uid)).await {
                warn!(%value, %error, "could not give way to a block; the repair loop will release the claim");
            }
            self.index().delete_claim(value);
            txn.created.retain(|(v, _)| *v != value);
        }
        yields
    }

    /// Creates the claim of `value` for the request, unless it needs none:
    /// this replica handed it out from its block to the same Service (its
    /// claim is on the way), or, in the validating call, it lies in another
    /// replica's block unclaimed, so that replica handed it out (a mutating
    /// call on this replica claims any requested value before it gets here).
    async fn claim_unless_vouched(&self, value: Value, txn: &Txn<'_>) -> Result<ClaimOutcome, kube::Error> {
        let vouched = {
            let index = self.index();
            index.claim(value).is_none()
                && (index.is_deferred_for(value, txn.owner)
                    || (txn.validating && index.in_foreign_block(value)))
        };
        if vouched {
            return Ok(Ok(None));
        }
        self.create_claim(value, txn.owner).await
    }

    /// Writes the claims of values handed out from blocks to `owner`, after
    /// the answer. A claim another request made meanwhile (a user asked for
    /// the value on another replica before this one's watch saw it) is
    /// counted in `block_conflicts`: the apiserver's own allocator then
    /// refuses one of the two Services. A write that keeps failing is left to
    /// repair, which adopts a value a Service holds; the value stays taken
    /// here until a Service is seen holding it.
    async fn write_deferred(&self, owner: &Owner, values: Vec<Value>) {
        join_all(values.into_iter().map(|value| self.write_one_deferred(owner, value))).await;
    }

    async fn write_one_deferred(&self, owner: &Owner, value: Value) {
        let mut backoff = DEFERRED_WRITE_BACKOFF;
        for attempt in 0..DEFERRED_WRITE_ATTEMPTS {
            match self.create_claim(value, owner).await {
                Ok(Ok(uid)) => {
                    let mut index = self.index();
                    if uid.is_some() {
                        self.metrics.allocations.inc();
                        index.track_unconfirmed(value, owner, uid, Instant::now());
                    }
                    index.undefer(value);
                    return;
                }
                // A claim picked one at a time elsewhere gives way to the
                // block within its echo (`yields_to_a_block`): try again.
                Ok(Err(holder)) if attempt + 1 < DEFERRED_WRITE_ATTEMPTS => {
                    debug!(%value, %owner, %holder, "the value handed out is claimed by another request; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Ok(Err(holder)) => {
                    self.metrics.block_conflicts.inc();
                    error!(%value, %owner, %holder, "a value handed out from this replica's block was claimed by another request first; the apiserver refuses one of the two Services");
                    self.index().undefer(value);
                    return;
                }
                Err(error) => {
                    warn!(%value, %owner, %error, "could not write the claim of a value handed out from a block; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }

    async fn undo(&self, txn: &Txn<'_>) {
        for value in &txn.deferred {
            self.index().undefer(*value);
        }
        for (value, uid) in &txn.created {
            if let Err(error) = delete_claim(&self.claims, *value, uid.clone()).await {
                warn!(%value, %error, "could not undo claim; the repair loop will release it");
            }
            self.index().delete_claim(*value);
        }
    }
}

/// Deletes the claim of `value`, only if it is still the object with `uid`
/// (so a claim re-made for a new Service is never deleted by mistake).
/// A missing or re-made claim is not an error: `Ok(false)`, so that only the
/// caller whose delete succeeded acts on it.
pub async fn delete_claim(
    claims: &Api<AllocationClaim>,
    value: Value,
    uid: Option<String>,
) -> Result<bool, kube::Error> {
    delete_claim_named(claims, &value.claim_name(), uid).await
}

/// [`delete_claim`] by the object's name (a value's claim or a block).
pub(crate) async fn delete_claim_named(
    claims: &Api<AllocationClaim>,
    name: &str,
    uid: Option<String>,
) -> Result<bool, kube::Error> {
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions { uid: Some(uid), resource_version: None }),
        ..DeleteParams::default()
    };
    match claims.delete(name, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

/// Deletes each claim and forgets it in `index` (`why` says why, for the
/// log); a failed delete is logged and left to the caller's next pass.
pub(crate) async fn release_claims(
    claims: &Api<AllocationClaim>,
    index: &Mutex<Index>,
    values: Vec<(Value, Option<String>)>,
    why: &str,
) {
    for (value, uid) in values {
        match delete_claim(claims, value, uid).await {
            Ok(_) => {
                debug!(%value, why, "released a claim");
                lock(index).delete_claim(value);
            }
            Err(error) => warn!(%value, %error, why, "release failed; will retry"),
        }
    }
}

/// The values `plan` names itself: a reinvocation keeps them.
fn requested_values(plan: &Plan) -> BTreeSet<Value> {
    let ips = plan.ips.iter().filter_map(|need| need.requested).map(Value::Ip);
    let ports = plan.ports.iter().flat_map(|needs| requested_ports(&needs.ports, needs.needs));
    ips.chain(ports.map(Value::Port)).collect()
}

/// The denial of a NodePort assignment, naming the field in `spec.ports`
/// numbering and, for a taken port, its holder.
fn port_denial(index: &Index, error: &NodePortError, owner: &Owner, spec_index: &[usize]) -> Denial {
    let field = renumber_field(&error.field, spec_index);
    match &error.source {
        IpamError::Allocated { value, .. } => {
            let holder = value
                .parse()
                .ok()
                .and_then(|port| index.other_holder(Value::Port(port), owner))
                .map(|holder| holder.describe())
                .unwrap_or_else(|| "another port of this Service".to_owned());
            taken_denial(field, value, holder)
        }
        IpamError::Full { .. } => full_denial(&field, &error.source),
        other => Denial::invalid(field, other.to_string()),
    }
}

fn taken_denial(
    field: impl Into<String>,
    value: impl std::fmt::Display,
    holder: impl std::fmt::Display,
) -> Denial {
    Denial::invalid(field, format!("{value} is already allocated to {holder}"))
}

/// A failed pick as the denial of `field`.
trait PickDenial {
    fn denial(&self, field: &str) -> Denial;

    /// The ServiceCIDRs' (or the NodePort range's) values are all taken.
    fn is_range_full(&self) -> bool;
}

impl PickDenial for IpamError {
    fn denial(&self, field: &str) -> Denial {
        full_denial(field, self)
    }

    fn is_range_full(&self) -> bool {
        matches!(self, IpamError::Full { .. })
    }
}

/// A full ServiceIPPool is named with its usage, without ipam's wording:
/// `spec.clusterIPs[0]: pool tenant-a (10.96.8.0/24) is full; 254 of 254 used`.
impl PickDenial for IpPickError {
    fn denial(&self, field: &str) -> Denial {
        match self {
            IpPickError::Range(error) => full_denial(field, error),
            IpPickError::Pools(full) => Denial::invalid(field, full.to_string()),
        }
    }

    fn is_range_full(&self) -> bool {
        matches!(self, IpPickError::Range(error) if error.is_range_full())
    }
}

fn full_denial(field: &str, error: &IpamError) -> Denial {
    let what = if field.contains("clusterIP") { "ClusterIP" } else { "NodePort" };
    let message = match error {
        IpamError::Full { range } => format!("failed to allocate a {what}: pool {range} is full"),
        other => other.to_string(),
    };
    Denial::invalid(field, message)
}

fn store_denial(field: &str, error: &kube::Error) -> Denial {
    Denial { code: 500, ..Denial::invalid(field, format!("failed to record the allocation: {error}")) }
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

/// The field that carries `port` in the Service: its first nodePort entry,
/// else the healthCheckNodePort.
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

#[cfg(test)]
mod tests {
    use svcplane_ipam::{IpFamily, NodePortNeeds, Protocol, ServicePort};

    use super::*;
    use crate::admit::{IpNeed, PortNeeds};
    use crate::index::tests::{mk_index, owner};

    #[test]
    fn ports_are_named_and_replaced_in_spec_ports_numbering() {
        assert_eq!(renumber_field("spec.ports[1].nodePort", &[0, 3]), "spec.ports[3].nodePort");
        assert_eq!(renumber_field("spec.ports[5].nodePort", &[0, 3]), "spec.ports[5].nodePort");
        let mut ports = NodePortAssignment {
            node_ports: vec![None, Some(30001), Some(30001)],
            health_check_node_port: Some(30002),
        };
        assert_eq!(port_field(&ports, &[2, 4, 5], 30001), "spec.ports[4].nodePort", "the first entry");
        assert_eq!(port_field(&ports, &[2, 4, 5], 30002), "spec.healthCheckNodePort");
        replace_port(&mut ports, 30001, 30009);
        assert_eq!(ports.node_ports, [None, Some(30009), Some(30009)], "every entry sharing it");
    }

    #[test]
    fn a_reinvocation_keeps_the_values_the_request_names() {
        let ip = "10.0.0.9".parse().unwrap();
        let need = |requested| IpNeed { field: String::new(), family: IpFamily::IPv4, requested };
        let port =
            |requested_node_port| ServicePort { port: 80, protocol: Protocol::Tcp, requested_node_port };
        let plan = Plan {
            ips: vec![need(Some(ip)), need(None)],
            ports: Some(PortNeeds {
                spec_index: vec![0, 1],
                ports: vec![port(Some(30001)), port(None)],
                needs: NodePortNeeds { allocate_node_ports: true, health_check: Some(Some(30002)) },
            }),
            ..Plan::default()
        };
        assert_eq!(requested_values(&plan), [Value::Ip(ip), Value::Port(30001), Value::Port(30002)].into());
    }

    #[test]
    fn a_port_denial_names_the_spec_field_and_the_holder() {
        let mut index = mk_index("10.0.0.0/24", "30000-30001");
        index.apply_claim(Value::Port(30001), ClaimRecord { owner: owner("db"), uid: None });
        let deny = |field: &str, source| {
            port_denial(&index, &NodePortError { field: field.into(), source }, &owner("web"), &[0, 2])
        };
        let taken =
            deny("spec.ports[1].nodePort", IpamError::Allocated { value: "30001".into(), range: "".into() });
        assert_eq!(taken.to_string(), "spec.ports[2].nodePort: 30001 is already allocated to ns/db");
        let full = deny("spec.ports", IpamError::Full { range: "30000-30001".into() });
        assert_eq!(
            (full.to_string(), full.code),
            ("spec.ports: failed to allocate a NodePort: pool 30000-30001 is full".into(), 422)
        );
    }
}
