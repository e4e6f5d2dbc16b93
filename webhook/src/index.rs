//! The in-memory allocation index of one replica: ipam bitmaps over the
//! current pools, plus who holds each value.
//!
//! Input: claims (from the claim watch), the values of Services (from the
//! Service watch), pool changes (ServiceCIDRs or flags), and this replica's
//! in-flight picks. Output: candidate values and holder look-ups. No I/O:
//! `watches.rs` feeds it and `allocator.rs` turns picks into claims.
//!
//! A bit is set exactly when its value is claimed, held by a Service, or
//! pending in a request of this replica, in every pool that contains it
//! (ServiceCIDRs may overlap). The pool of a ServiceCIDR being deleted stays
//! until it is gone: its values stay valid and marked, but none is handed
//! out. The bitmap is only an index for picking candidates quickly; the claim
//! objects are the truth, and a pick is only kept once its claim create
//! succeeded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use ipnetwork::IpNetwork;
use svcplane_ipam::{
    ClusterIpAllocator, IpFamily, IpamError, NodePortAllocator, NodePortAssignment, NodePortError,
    NodePortNeeds, ServicePort, assign_node_ports,
};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use crate::admit::{service_owner, service_values};
use crate::blocks::{BlockId, BlockKind, BlockRecord, MIN_FREE_BLOCKS};
use crate::claim::{AllocationClaim, Owner, Value, claim_owner};
use crate::pools::{Draining, PoolConfig};
use crate::retention::{Retained, Retention};
use crate::service_ip_pools::{IpPickError, PoolSet, ServiceIPPool, ServiceRef};

/// What the index knows about a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRecord {
    /// The Service the claim was made for.
    pub owner: Owner,
    /// The claim object's uid, for delete preconditions.
    pub uid: Option<String>,
}

impl ClaimRecord {
    /// The value a claim object holds and what the index keeps of it;
    /// `None` for a claim whose spec names no value.
    pub fn of(claim: &AllocationClaim) -> Option<(Value, Self)> {
        let record = Self { owner: claim_owner(claim), uid: claim.uid() };
        Value::from_spec(&claim.spec).map(|value| (value, record))
    }
}

/// A claim this replica created for a request that no Service has been seen
/// holding yet: the request may still fail after admission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unconfirmed {
    /// The Service the request was for.
    pub owner: Owner,
    /// The claim object's uid.
    pub uid: Option<String>,
    /// When the claim was created.
    pub since: Instant,
}

/// Who holds a value, for denials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// A claim names this Service.
    Claim(Owner),
    /// A Service carries the value without (yet) a claim.
    Service(Owner),
    /// Another request in flight on this replica.
    Pending,
    /// A claim retained for a deleted Service's re-creation.
    Retained(Retention),
}

impl Holder {
    /// The holder as a denial names it.
    pub fn describe(&self) -> String {
        match self {
            Holder::Claim(owner) | Holder::Service(owner) => owner.to_string(),
            Holder::Pending => "a concurrent request".to_owned(),
            Holder::Retained(retention) => retention.describe(),
        }
    }
}

/// Why a requested value cannot be had.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Outside every pool that gives values.
    #[error(transparent)]
    NotInRange(IpamError),
    /// Only in pools that give no new values (a ServiceCIDR being deleted).
    #[error("{ip} is in {cidr}, but {why}: no new ClusterIP is allocated from it")]
    Draining {
        /// The requested IP.
        ip: IpAddr,
        /// The draining CIDR it is in.
        cidr: IpNetwork,
        /// Which ServiceCIDR, and why.
        why: Draining,
    },
}

/// Usage of one pool, for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    /// `10.96.0.0/16` or `30000-32767`.
    pub pool: String,
    /// Values set in the bitmap.
    pub used: usize,
    /// Values free.
    pub free: usize,
}

/// The allocation index of one replica.
#[derive(Debug)]
pub struct Index {
    config: PoolConfig,
    ips: Vec<ClusterIpAllocator>,
    ports: NodePortAllocator,
    claims: HashMap<Value, ClaimRecord>,
    held: HashMap<Value, BTreeSet<Owner>>,
    services: HashMap<Owner, BTreeSet<Value>>,
    pending: HashMap<Value, usize>,
    unconfirmed: HashMap<Value, Unconfirmed>,
    service_ip_pools: PoolSet,
    /// The claims retained for deleted Services (see `retention.rs`).
    pub(crate) retained: Retained,
    /// Every replica's blocks (see `blocks.rs`), and the block of each of
    /// their values: all marked taken, only this replica's handed out.
    blocks: BTreeMap<BlockId, BlockRecord>,
    block_of: HashMap<Value, BlockId>,
    /// Values handed out from this replica's blocks whose claim is not
    /// written yet, with the Service they went to.
    deferred: HashMap<Value, Owner>,
    /// This replica process's name as a block holder.
    replica: String,
    /// Claims this replica is creating whose watch event it waits for, with
    /// the uid the watch delivered (see `Allocator::yields_to_a_block`).
    awaiting_echo: HashMap<Value, Option<String>>,
}

impl Index {
    /// An empty index over `config`'s pools.
    pub fn new(config: PoolConfig) -> Result<Self, IpamError> {
        let (ips, ports) = build_allocators(&config)?;
        let (claims, held, services, pending, unconfirmed, service_ip_pools) = Default::default();
        let retained = Retained::default();
        let (blocks, block_of, deferred, replica, awaiting_echo) = Default::default();
        Ok(Self {
            config,
            ips,
            ports,
            claims,
            held,
            services,
            pending,
            unconfirmed,
            service_ip_pools,
            retained,
            blocks,
            block_of,
            deferred,
            replica,
            awaiting_echo,
        })
    }

    /// The index a replica's watches build from listing `claims` and
    /// `services`: what the repair pass and `svcplane ipam status` count
    /// usage from, so they count as the webhook does.
    pub fn listed(
        config: PoolConfig,
        claims: &[AllocationClaim],
        services: &[Service],
    ) -> Result<Self, IpamError> {
        let mut index = Self::new(config)?;
        index.replace_claims(claims.iter().filter_map(ClaimRecord::of));
        index.replace_services(services.iter().map(|s| (service_owner(s), service_values(s))));
        Ok(index)
    }

    /// The current pools.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Replaces the pools and re-marks every known value: O(values), only on
    /// a pool change.
    pub fn set_pools(&mut self, config: PoolConfig) -> Result<(), IpamError> {
        if config == self.config {
            return Ok(());
        }
        let (ips, ports) = build_allocators(&config)?;
        self.config = config;
        self.ips = ips;
        self.ports = ports;
        // Whether a pool lies inside a ServiceCIDR may have changed.
        self.service_ip_pools.rebuild(&self.config.cidrs);
        self.remark_all();
        Ok(())
    }

    /// Replaces all claims (after a relist).
    pub fn replace_claims(&mut self, claims: impl IntoIterator<Item = (Value, ClaimRecord)>) {
        let old: Vec<Value> = self.claims.keys().copied().collect();
        self.claims = claims.into_iter().collect();
        for value in old.into_iter().chain(self.claims.keys().copied().collect::<Vec<_>>()) {
            self.sync(value);
        }
    }

    /// Records a claim the watch saw or this replica just created.
    pub fn apply_claim(&mut self, value: Value, record: ClaimRecord) {
        self.claims.insert(value, record);
        self.sync(value);
    }

    /// Forgets a deleted claim.
    pub fn delete_claim(&mut self, value: Value) {
        self.claims.remove(&value);
        self.unconfirmed.remove(&value);
        self.retained.forget(value);
        self.sync(value);
    }

    /// The claim on `value`, if any.
    pub fn claim(&self, value: Value) -> Option<&ClaimRecord> {
        self.claims.get(&value)
    }

    /// Every claim (for tests).
    pub fn claims(&self) -> impl Iterator<Item = (&Value, &ClaimRecord)> {
        self.claims.iter()
    }

    /// Replaces the values of all Services (after a relist).
    pub fn replace_services(&mut self, services: impl IntoIterator<Item = (Owner, BTreeSet<Value>)>) {
        let owners: Vec<Owner> = self.services.keys().cloned().collect();
        for owner in owners {
            self.delete_service(&owner);
        }
        for (owner, values) in services {
            self.apply_service(owner, values);
        }
    }

    /// Records the values a Service carries now.
    pub fn apply_service(&mut self, owner: Owner, values: BTreeSet<Value>) {
        let old = self.services.insert(owner.clone(), values.clone()).unwrap_or_default();
        for gone in old.difference(&values) {
            if let Some(holders) = self.held.get_mut(gone) {
                holders.remove(&owner);
                if holders.is_empty() {
                    self.held.remove(gone);
                }
            }
            self.sync(*gone);
        }
        for new in values.difference(&old) {
            self.held.entry(*new).or_default().insert(owner.clone());
            // A Service holds it now: that keeps it taken, whatever became
            // of the write of its claim.
            self.deferred.remove(new);
            self.sync(*new);
        }
    }

    /// The values the Service `owner` carried when last seen.
    pub fn service_values(&self, owner: &Owner) -> BTreeSet<Value> {
        self.services.get(owner).cloned().unwrap_or_default()
    }

    /// Remembers a claim this replica just created for a request, until a
    /// Service of that owner is seen holding it.
    pub fn track_unconfirmed(&mut self, value: Value, owner: &Owner, uid: Option<String>, now: Instant) {
        self.unconfirmed.insert(value, Unconfirmed { owner: owner.clone(), uid, since: now });
    }

    /// Claims still under a generateName placeholder (`prefix*`) whose value
    /// exactly one Service matching the placeholder carries: the claim, its uid
    /// and the Service to re-key it to. O(claims); for the periodic sweep
    /// that catches what the Service watch's own re-key missed (a replica
    /// restarted, or the claim was listed after the Service).
    pub fn held_placeholders(&self) -> Vec<(Value, Option<String>, Owner)> {
        self.claims
            .iter()
            .filter(|(_, claim)| claim.owner.name.ends_with('*'))
            .filter_map(|(value, claim)| {
                let holders = self.held.get(value)?;
                let mut matching = holders.iter().filter(|o| claim.owner.matches(o));
                match (matching.next(), matching.next()) {
                    (Some(real), None) => Some((*value, claim.uid.clone(), real.clone())),
                    _ => None,
                }
            })
            .collect()
    }

    /// Whether any Service carries `value`.
    pub fn is_held(&self, value: Value) -> bool {
        self.held.contains_key(&value)
    }

    /// Whether a Service matching `owner` carries `value`.
    fn held_by(&self, value: Value, owner: &Owner) -> bool {
        self.held.get(&value).is_some_and(|holders| holders.iter().any(|o| o.matches(owner)))
    }

    /// Drops the tracked claims a Service of their owner now holds (or that
    /// are gone or re-made), and returns those older than `bound`, still the
    /// same claim object and held by no Service: their request failed after
    /// admission. They stay tracked until [`Index::delete_claim`].
    pub fn expired_unconfirmed(&mut self, now: Instant, bound: Duration) -> Vec<(Value, Option<String>)> {
        let mut expired = Vec::new();
        let values: Vec<Value> = self.unconfirmed.keys().copied().collect();
        for value in values {
            let Some(entry) = self.unconfirmed.get(&value) else { continue };
            let same_claim = self.claims.get(&value).is_some_and(|c| c.uid == entry.uid);
            if !same_claim || self.held_by(value, &entry.owner) {
                self.unconfirmed.remove(&value);
            } else if now.saturating_duration_since(entry.since) >= bound && !self.held.contains_key(&value) {
                expired.push((value, entry.uid.clone()));
            }
        }
        expired
    }

    /// The claims this replica made for `owner` (exactly this name, never a
    /// `prefix*` placeholder) that no Service holds yet, except `keep`: a new
    /// create of the same namespace/name supersedes an earlier attempt that
    /// never persisted (a retried create of a bad manifest).
    pub fn superseded_by(&self, owner: &Owner, keep: &BTreeSet<Value>) -> Vec<(Value, Option<String>)> {
        if owner.name.ends_with('*') {
            return Vec::new();
        }
        self.unconfirmed
            .iter()
            .filter(|(value, entry)| {
                entry.owner == *owner
                    && !keep.contains(value)
                    && !self.held.contains_key(value)
                    && !self.pending.contains_key(value)
                    && self.claims.get(value).is_some_and(|c| c.uid == entry.uid)
            })
            .map(|(value, entry)| (*value, entry.uid.clone()))
            .collect()
    }

    /// Forgets a deleted Service.
    pub fn delete_service(&mut self, owner: &Owner) {
        self.apply_service(owner.clone(), BTreeSet::new());
        self.services.remove(owner);
    }

    /// Who holds `value`, other than `me`; `None` when it is free or only
    /// `me` holds it.
    pub fn other_holder(&self, value: Value, me: &Owner) -> Option<Holder> {
        if let Some(claim) = self.claims.get(&value) {
            let retained = self.retained.get(value).filter(|_| !self.is_held(value)).cloned();
            let holder = retained.map_or_else(|| Holder::Claim(claim.owner.clone()), Holder::Retained);
            return (!claim.owner.matches(me)).then_some(holder);
        }
        if let Some(holders) = self.held.get(&value)
            && let Some(other) = holders.iter().find(|owner| !owner.matches(me))
        {
            return Some(Holder::Service(other.clone()));
        }
        let deferred_elsewhere = self.deferred.get(&value).is_some_and(|owner| !owner.matches(me));
        (deferred_elsewhere || self.pending.contains_key(&value)).then_some(Holder::Pending)
    }

    /// Whether `value` may be requested: it lies in a pool that gives new
    /// values. Else the pool it is outside of, or the draining pool it is in
    /// (kube-apiserver's `MetaAllocator` only allocates a requested IP from a
    /// ready ServiceCIDR not being deleted, and refuses it otherwise: `the
    /// provided network does not match the current range`).
    pub fn check_in_range(&self, value: Value) -> Result<(), RangeError> {
        let ip = match value {
            Value::Ip(ip) => ip,
            Value::Port(port) if self.ports.contains(port) => return Ok(()),
            Value::Port(_) => {
                let range = self.ports.range().to_string();
                return Err(RangeError::NotInRange(IpamError::NotInRange {
                    value: value.to_string(),
                    range,
                }));
            }
        };
        let mut draining = None;
        for pool in self.ips.iter().filter(|pool| pool.contains(ip)) {
            match self.config.draining(pool.cidr()) {
                None => return Ok(()),
                Some(why) => draining = draining.or(Some((pool.cidr(), why))),
            }
        }
        if let Some((cidr, why)) = draining {
            return Err(RangeError::Draining { ip, cidr, why: why.clone() });
        }
        // Every range that gives values, both families on a dual-stack
        // cluster, so the user sees all valid choices.
        let range = self
            .ips
            .iter()
            .filter(|pool| self.config.draining(pool.cidr()).is_none())
            .map(|pool| pool.cidr().to_string())
            .collect::<Vec<_>>()
            .join(",");
        Err(RangeError::NotInRange(IpamError::NotInRange { value: value.to_string(), range }))
    }

    /// Whether `value` lies in any pool, draining ones included: repair's
    /// out-of-range test (kube-apiserver's `RepairIPAddress` counts every
    /// ServiceCIDR that still exists, being deleted or not).
    pub fn covers(&self, value: Value) -> bool {
        match value {
            Value::Ip(ip) => self.ips.iter().any(|pool| pool.contains(ip)),
            Value::Port(port) => self.ports.contains(port),
        }
    }

    /// Marks `value` as pending for a request (a static value being claimed).
    pub fn hold_pending(&mut self, value: Value) {
        *self.pending.entry(value).or_default() += 1;
        self.sync(value);
    }

    /// Ends one pending hold on `value`.
    pub fn release_pending(&mut self, value: Value) {
        if let Some(count) = self.pending.get_mut(&value) {
            *count -= 1;
            if *count == 0 {
                self.pending.remove(&value);
            }
        }
        self.sync(value);
    }

    /// Picks a free IP of `family` (dynamic, upstream's strategy) and holds
    /// it pending. The pools of the family that give new values are tried in
    /// ServiceCIDR order (`kubernetes` first), moving on from a full one.
    /// kube-apiserver tries them in Go map order, i.e. unspecified; a fixed
    /// order allocates the same and is predictable. Overlapping pools are
    /// safe: a taken IP is marked in every pool that contains it.
    pub fn pick_ip(&mut self, family: IpFamily) -> Result<IpAddr, IpamError> {
        let mut full = Vec::new();
        let config = &self.config;
        let usable = |pool: &&mut ClusterIpAllocator| {
            pool.family() == family && config.draining(pool.cidr()).is_none()
        };
        let mut picked = None;
        for pool in self.ips.iter_mut().filter(usable) {
            match pool.allocate_next() {
                Ok(ip) => {
                    picked = Some(ip);
                    break;
                }
                Err(_) => full.push(pool.cidr().to_string()),
            }
        }
        if let Some(ip) = picked {
            *self.pending.entry(Value::Ip(ip)).or_default() += 1;
            // Marks it in the other pools that contain it.
            self.sync(Value::Ip(ip));
            return Ok(ip);
        }
        if full.is_empty() {
            full.push(format!("no {family} Service CIDR"));
        }
        Err(IpamError::Full { range: full.join(",") })
    }

    /// Picks the nodePorts and healthCheckNodePort of `ports` with ipam's
    /// [`assign_node_ports`] and holds them pending. A requested value that
    /// [`Index::other_holder`] gives to nobody else counts as free for `me`
    /// (a reinvocation, the validating call after the mutating one, or an
    /// update of a Service that carries it): the same rule a requested
    /// ClusterIP is checked by.
    pub fn pick_node_ports(
        &mut self,
        ports: &[ServicePort],
        needs: NodePortNeeds,
        me: &Owner,
    ) -> Result<NodePortAssignment, NodePortError> {
        // Unmark this owner's own requested ports for the duration of the
        // (synchronous) assignment, then restore the bits.
        let mine: Vec<u16> = requested_ports(ports, needs)
            .into_iter()
            .filter(|port| self.other_holder(Value::Port(*port), me).is_none())
            .collect();
        for port in &mine {
            self.ports.release(*port);
        }
        let result = assign_node_ports(&mut self.ports, ports, needs);
        if let Ok(assignment) = &result {
            for port in assigned_ports(assignment) {
                *self.pending.entry(Value::Port(port)).or_default() += 1;
            }
        }
        for port in mine {
            self.sync(Value::Port(port));
        }
        result
    }

    /// Picks one more free NodePort (after a claim conflict) and holds it
    /// pending.
    pub fn pick_port(&mut self) -> Result<u16, IpamError> {
        let port = self.ports.allocate_next()?;
        *self.pending.entry(Value::Port(port)).or_default() += 1;
        Ok(port)
    }

    /// Pool usage for metrics.
    pub fn usage(&self) -> Vec<PoolUsage> {
        // Values only a block holds are reserved ahead, not used.
        let reserved: Vec<Value> = self.block_of.keys().filter(|v| !self.is_taken(**v)).copied().collect();
        let usage = |pool: String, used: usize, free: usize, reserved: usize| PoolUsage {
            pool,
            used: used - reserved.min(used),
            free: free + reserved.min(used),
        };
        let ips = self.ips.iter().map(|p| {
            let mine = reserved.iter().filter(|v| matches!(v, Value::Ip(ip) if p.contains(*ip))).count();
            usage(p.cidr().to_string(), p.used(), p.free(), mine)
        });
        let p = &self.ports;
        let ports_reserved = reserved.iter().filter(|v| matches!(v, Value::Port(_))).count();
        let ports = [usage(p.range().to_string(), p.used(), p.free(), ports_reserved)];
        ips.chain(ports).chain(self.service_ip_pool_usage()).collect()
    }

    /// Makes the bit of `value` match whether anyone holds it.
    fn sync(&mut self, value: Value) {
        let held = self.is_taken(value);
        // A block reserves the value in the ServiceCIDRs and the NodePort
        // range it came from, never in a ServiceIPPool: a tenant's pool
        // keeps its capacity.
        let wanted = held || self.block_of.contains_key(&value);
        let mark = |pool: &mut ClusterIpAllocator, ip: IpAddr, wanted: bool| {
            if wanted && !pool.has(ip) {
                // In range and free, so this cannot fail.
                let _ = pool.allocate(ip);
            } else if !wanted {
                pool.release(ip);
            }
        };
        match value {
            // Every pool that contains it: overlapping CIDRs (a /24 inside a
            // /16, a larger one added to extend the range) must not hand it
            // out again from the other one.
            Value::Ip(ip) => {
                for pool in self.ips.iter_mut().filter(|pool| pool.contains(ip)) {
                    mark(pool, ip, wanted);
                }
                let service_ip_pools = self.service_ip_pools.bitmaps.iter_mut().map(|(_, b)| b);
                for pool in service_ip_pools.filter(|pool| pool.contains(ip)) {
                    mark(pool, ip, held);
                }
            }
            Value::Port(port) => {
                if wanted && !self.ports.has(port) {
                    let _ = self.ports.allocate(port);
                } else if !wanted {
                    self.ports.release(port);
                }
            }
        }
    }

    /// Whether a claim, a Service, a request in flight or a hand-out from a
    /// block holds `value` (a block alone does not).
    fn is_taken(&self, value: Value) -> bool {
        self.claims.contains_key(&value)
            || self.held.contains_key(&value)
            || self.pending.contains_key(&value)
            || self.deferred.contains_key(&value)
    }
}

/// ServiceIPPools (`service_ip_pools.rs`): their bitmaps sit beside the
/// ServiceCIDRs' and every taken IP is marked in both.
impl Index {
    /// Replaces the ServiceIPPool objects (the pool watch's complete store).
    pub fn set_service_ip_pools(&mut self, objects: Vec<ServiceIPPool>) {
        self.service_ip_pools.objects = objects;
        self.service_ip_pools.rebuild(&self.config.cidrs);
        self.remark_all();
    }

    /// Records a Namespace's labels (`None`: deleted), for namespaceSelectors.
    pub fn set_namespace_labels(&mut self, name: &str, labels: Option<BTreeMap<String, String>>) {
        let namespaces = &mut self.service_ip_pools.namespace_labels;
        match labels {
            Some(labels) => namespaces.insert(name.to_owned(), labels),
            None => namespaces.remove(name),
        };
    }

    /// Replaces every Namespace's labels (after a relist).
    pub fn replace_namespace_labels(&mut self, labels: BTreeMap<String, BTreeMap<String, String>>) {
        self.service_ip_pools.namespace_labels = labels;
    }

    /// The pools, usable or not, in precedence order (for `ipam status`).
    pub fn service_ip_pools(&self) -> &PoolSet {
        &self.service_ip_pools
    }

    /// Picks a free IP of `family` for `service` and holds it pending: from
    /// the pools that select it when there are any, else from the
    /// ServiceCIDRs outside every pool (the pools are reserved for the
    /// Services they select).
    pub fn pick_ip_for(&mut self, family: IpFamily, service: ServiceRef<'_>) -> Result<IpAddr, IpPickError> {
        if self.service_ip_pools.selects(family, service) {
            let ip = self.service_ip_pools.pick(family, service).map_err(IpPickError::Pools)?;
            self.hold_pending(Value::Ip(ip));
            return Ok(ip);
        }
        // Each pick inside a pool is set aside (held) so the next pick moves
        // on, then freed: O(pool addresses) at worst, when the rest is full.
        let mut set_aside = Vec::new();
        let picked = loop {
            match self.pick_ip(family) {
                Ok(ip) if self.service_ip_pools.pool_of(ip).is_some() => set_aside.push(Value::Ip(ip)),
                other => break other,
            }
        };
        for value in set_aside {
            self.release_pending(value);
        }
        picked.map_err(IpPickError::Range)
    }

    /// Whether `service` may have the IP it requested: `Err` when the IP is
    /// in a pool that does not select it.
    pub fn check_pool_access(&self, ip: IpAddr, service: ServiceRef<'_>) -> Result<(), String> {
        self.service_ip_pools.check_access(ip, service)
    }

    /// The usage of each usable pool's CIDR, named `tenant-a (10.96.8.0/24)`.
    fn service_ip_pool_usage(&self) -> impl Iterator<Item = PoolUsage> + '_ {
        let pools = &self.service_ip_pools;
        pools.bitmaps.iter().map(|(def, b)| PoolUsage {
            pool: pools.defs[*def].label(b.cidr()),
            used: b.used(),
            free: b.free(),
        })
    }

    /// Marks every known value again after the bitmaps were rebuilt.
    fn remark_all(&mut self) {
        let values: BTreeSet<Value> = (self.claims.keys().chain(self.held.keys()))
            .chain(self.pending.keys().chain(self.deferred.keys()))
            .chain(self.block_of.keys())
            .copied()
            .collect();
        for value in values {
            self.sync(value);
        }
    }
}

/// Blocks (`blocks.rs`): every replica's are marked taken; this replica hands
/// out the free values of its own, recording each as deferred until its
/// claim is written.
impl Index {
    /// Names this replica process as a block holder.
    pub fn set_replica(&mut self, name: String) {
        self.replica = name;
    }

    /// This replica process's name as a block holder.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Records a block the watch saw or this replica just created.
    pub fn apply_block(&mut self, id: BlockId, mut record: BlockRecord) {
        // The create's response may come after the watch delivered it.
        let seen = self.blocks.get(&id).is_some_and(|old| old.seen && old.uid == record.uid);
        record.seen |= seen;
        self.blocks.insert(id, record);
        for value in id.values() {
            self.block_of.entry(value).or_insert(id);
            self.sync(value);
        }
    }

    /// Forgets a deleted block; its values stay taken where anything else
    /// holds them (a value handed out from it, deferred or claimed).
    pub fn delete_block(&mut self, id: BlockId) {
        if self.blocks.remove(&id).is_none() {
            return;
        }
        for value in id.values() {
            if self.block_of.get(&value) == Some(&id) {
                self.block_of.remove(&value);
            }
            self.sync(value);
        }
    }

    /// Replaces every block (after a relist).
    pub fn replace_blocks(&mut self, blocks: impl IntoIterator<Item = (BlockId, BlockRecord)>) {
        let old: Vec<BlockId> = self.blocks.keys().copied().collect();
        for id in old {
            self.delete_block(id);
        }
        for (id, record) in blocks {
            self.apply_block(id, record);
        }
    }

    /// Every block with its record.
    pub fn blocks(&self) -> impl Iterator<Item = (&BlockId, &BlockRecord)> {
        self.blocks.iter()
    }

    /// Whether `value` lies in another replica's block.
    pub fn in_foreign_block(&self, value: Value) -> bool {
        let holder = self.block_of.get(&value).and_then(|id| self.blocks.get(id));
        holder.is_some_and(|record| record.holder != self.replica)
    }

    /// Whether `value` was handed out from this replica's block to `owner`
    /// and its claim is not written yet.
    pub fn is_deferred_for(&self, value: Value, owner: &Owner) -> bool {
        self.deferred.get(&value).is_some_and(|o| o.matches(owner))
    }

    /// Starts waiting for the watch to deliver the claim of `value` about to
    /// be created.
    pub fn expect_echo(&mut self, value: Value) {
        self.awaiting_echo.insert(value, None);
    }

    /// The watch delivered a claim of `value` with `uid`.
    pub fn echo(&mut self, value: Value, uid: Option<String>) {
        if let Some(slot) = self.awaiting_echo.get_mut(&value) {
            *slot = uid;
        }
    }

    /// Whether the watch delivered the claim of `value` with `uid`.
    pub fn echoed(&self, value: Value, uid: &Option<String>) -> bool {
        self.awaiting_echo.get(&value).is_some_and(|seen| seen.is_some() && seen == uid)
    }

    /// Stops waiting for the claim of `value`.
    pub fn end_echo(&mut self, value: Value) {
        self.awaiting_echo.remove(&value);
    }

    /// Whether any handed-out value's claim is still to be written.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Whether `value` was handed out from a block and its claim is not written yet.
    pub fn is_deferred(&self, value: Value) -> bool {
        self.deferred.contains_key(&value)
    }

    /// Ends the deferral of `value`: its claim is written (or its request
    /// failed, and it is free in the block again).
    pub fn undefer(&mut self, value: Value) {
        self.deferred.remove(&value);
        self.sync(value);
    }

    /// Hands out a free value of `kind` from this replica's usable blocks to
    /// `owner`, recording it as deferred; `None` when they have none.
    pub fn take_from_block(&mut self, kind: BlockKind, owner: &Owner, now: SystemTime) -> Option<Value> {
        let seen = |id: &BlockId| self.blocks.get(id).is_some_and(|record| record.seen);
        let value = self
            .own_blocks(kind, now)
            .filter(seen)
            .flat_map(|id| id.values())
            .find(|v| self.free_in_block(*v))?;
        self.deferred.insert(value, owner.clone());
        self.sync(value);
        Some(value)
    }

    /// Whether this replica has a usable block of `kind` the watch has not
    /// delivered yet.
    pub fn awaits_block(&self, kind: BlockKind, now: SystemTime) -> bool {
        self.own_blocks(kind, now).any(|id| self.blocks.get(&id).is_some_and(|record| !record.seen))
    }

    /// How many values this replica's usable blocks of `kind` still have
    /// (delivered by the watch or not).
    pub fn own_free(&self, kind: BlockKind, now: SystemTime) -> usize {
        self.own_blocks(kind, now).flat_map(|id| id.values()).filter(|v| self.free_in_block(*v)).count()
    }

    /// This replica's blocks it should delete at `now`: no longer usable, or
    /// with no free value left. With `all`, every one of them. Never one
    /// with a value handed out whose claim is not written yet: deleted, the
    /// block would leave that value free to other replicas before its
    /// Service or its claim marks it taken there.
    pub fn own_blocks_to_return(&self, now: SystemTime, all: bool) -> Vec<(BlockId, Option<String>)> {
        self.blocks
            .iter()
            .filter(|(_, record)| record.holder == self.replica)
            .filter(|(id, _)| !id.values().any(|v| self.deferred.contains_key(&v)))
            .filter(|(id, record)| {
                all || !record.usable_at(now) || !id.values().any(|v| self.free_in_block(v))
            })
            .map(|(id, record)| (*id, record.uid.clone()))
            .collect()
    }

    /// Whether blocks of `kind` and `size` are worth holding: the pool they
    /// come from has at least [`MIN_FREE_BLOCKS`] blocks' worth free.
    pub fn blocks_worthwhile(&self, kind: BlockKind, size: u16) -> bool {
        self.block_pool(kind, size).is_some()
    }

    /// A block of `kind` and `size` for this replica to create: the aligned
    /// run around a dynamic pick (upstream's strategy, upper band first),
    /// overlapping no known block and at least half free. `None` when a few
    /// tries find none or blocks are not worthwhile.
    pub fn choose_block(&mut self, kind: BlockKind, size: u16) -> Option<BlockId> {
        let range = self.ports.range();
        for _ in 0..8 {
            let (value, cidr) = match self.block_pool(kind, size)? {
                Some(pool) => {
                    let pool = &mut self.ips[pool];
                    let ip = pool.allocate_next().ok()?;
                    pool.release(ip);
                    (Value::Ip(ip), Some(pool.cidr()))
                }
                None => {
                    let port = self.ports.allocate_next().ok()?;
                    self.ports.release(port);
                    (Value::Port(port), None)
                }
            };
            let Some(id) = BlockId::containing(value, size, cidr, range) else { continue };
            let in_service_ip_pool =
                |v: Value| matches!(v, Value::Ip(ip) if self.service_ip_pools.pool_of(ip).is_some());
            if id.values().any(|v| self.block_of.contains_key(&v) || in_service_ip_pool(v)) {
                continue;
            }
            if id.values().filter(|v| self.free_in_block(*v)).count() * 2 >= usize::from(id.size) {
                return Some(id);
            }
        }
        None
    }

    /// The pool blocks of `kind` come from: `Some(i)`, the first usable
    /// ServiceCIDR of the family (`self.ips[i]`), `None` the NodePort range;
    /// the outer `None` when it has too few free values.
    fn block_pool(&self, kind: BlockKind, size: u16) -> Option<Option<usize>> {
        let enough = |free: usize| free >= MIN_FREE_BLOCKS * usize::from(size);
        match kind {
            BlockKind::Port => enough(self.ports.free()).then_some(None),
            BlockKind::Ip(family) => self
                .ips
                .iter()
                .position(|p| p.family() == family && self.config.draining(p.cidr()).is_none())
                .filter(|i| enough(self.ips[*i].free()))
                .map(Some),
        }
    }

    fn own_blocks(&self, kind: BlockKind, now: SystemTime) -> impl Iterator<Item = BlockId> + '_ {
        self.blocks
            .iter()
            .filter(move |(id, record)| {
                id.kind() == kind && record.holder == self.replica && record.usable_at(now)
            })
            .map(|(id, _)| *id)
    }

    /// Whether the holder of a block may hand out `value`: in a range that
    /// gives values, outside every ServiceIPPool, and held by nothing else.
    fn free_in_block(&self, value: Value) -> bool {
        let unheld = !(self.claims.contains_key(&value)
            || self.held.contains_key(&value)
            || self.pending.contains_key(&value)
            || self.deferred.contains_key(&value));
        let outside_pools = match value {
            Value::Ip(ip) => self.service_ip_pools.pool_of(ip).is_none(),
            Value::Port(_) => true,
        };
        unheld && outside_pools && self.check_in_range(value).is_ok()
    }
}

/// The nodePorts and healthCheckNodePort the request names itself.
pub(crate) fn requested_ports(ports: &[ServicePort], needs: NodePortNeeds) -> BTreeSet<u16> {
    ports.iter().filter_map(|port| port.requested_node_port).chain(needs.health_check.flatten()).collect()
}

/// Every distinct port of an assignment (two ports may share a nodePort).
pub(crate) fn assigned_ports(assignment: &NodePortAssignment) -> BTreeSet<u16> {
    assignment.node_ports.iter().flatten().chain(&assignment.health_check_node_port).copied().collect()
}

/// Locks the index of one replica, shared by the allocator, the watches and
/// the metrics collector.
pub(crate) fn lock(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    // A panic while holding the lock leaves a consistent-enough index (each
    // method keeps its own invariant), so poisoning is ignored.
    index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn build_allocators(config: &PoolConfig) -> Result<(Vec<ClusterIpAllocator>, NodePortAllocator), IpamError> {
    let ips =
        config.cidrs.iter().map(|cidr| ClusterIpAllocator::new(*cidr)).collect::<Result<Vec<_>, _>>()?;
    Ok((ips, NodePortAllocator::new(config.node_ports)))
}

#[cfg(test)]
pub(crate) mod tests {
    use svcplane_ipam::Protocol;

    use super::*;

    /// An index over `cidrs` (comma-separated) and the NodePort range `ports`.
    pub(crate) fn mk_index(cidrs: &str, ports: &str) -> Index {
        let cidrs = crate::pools::parse_cidrs(cidrs).unwrap();
        Index::new(PoolConfig::new(cidrs, ports.parse().unwrap())).unwrap()
    }

    /// The Service `ns/name`.
    pub(crate) fn owner(name: &str) -> Owner {
        Owner { namespace: "ns".into(), name: name.into() }
    }

    #[test]
    fn claims_services_and_pending_each_keep_a_value_taken() {
        let mut index = mk_index("10.0.0.0/29", "30000-30001");
        let ip: IpAddr = "10.0.0.3".parse().unwrap();
        index.apply_claim(Value::Ip(ip), ClaimRecord { owner: owner("a"), uid: None });
        index.apply_service(owner("b"), [Value::Ip(ip)].into());
        index.delete_claim(Value::Ip(ip));
        assert_eq!(index.other_holder(Value::Ip(ip), &owner("a")), Some(Holder::Service(owner("b"))));
        index.delete_service(&owner("b"));
        assert_eq!(index.other_holder(Value::Ip(ip), &owner("a")), None);
        assert_eq!(index.usage()[0].used, 0);
    }

    #[test]
    fn a_full_pool_names_its_cidr() {
        let mut index = mk_index("10.0.0.0/30", "30000-30001");
        let picks = [(); 3].map(|()| index.pick_ip(IpFamily::IPv4).map_err(|e| e.to_string()));
        assert_eq!(picks[2], Err("range 10.0.0.0/30 is full".into()));
    }

    #[test]
    fn own_claimed_node_port_is_free_for_its_owner_only() {
        let mut index = mk_index("10.0.0.0/24", "30000-30010");
        index.apply_claim(Value::Port(30005), ClaimRecord { owner: owner("web"), uid: None });
        let ports = [ServicePort { port: 80, protocol: Protocol::Tcp, requested_node_port: Some(30005) }];
        let needs = NodePortNeeds { allocate_node_ports: true, health_check: None };
        assert!(index.pick_node_ports(&ports, needs, &owner("other")).is_err());
        let got = index.pick_node_ports(&ports, needs, &owner("web")).unwrap();
        assert_eq!(got.node_ports, vec![Some(30005)]);
        index.release_pending(Value::Port(30005));
        assert!(index.claim(Value::Port(30005)).is_some());
        assert_eq!(index.usage()[1].used, 1);
    }

    /// The claim is the truth: a Service watch that lags behind a release
    /// (the old holder deleted, its claim released and the port claimed
    /// again for `web`) must not deny `web`'s validating call. A CI run of
    /// the rollout-restart test was denied `31065 is already allocated to
    /// another port of this Service` this way.
    #[test]
    fn a_node_port_claimed_for_its_owner_is_free_for_it_while_a_stale_holder_lingers() {
        let mut index = mk_index("10.0.0.0/24", "30000-30010");
        index.apply_service(owner("deleted"), [Value::Port(30005)].into());
        index.apply_claim(Value::Port(30005), ClaimRecord { owner: owner("web"), uid: None });
        let ports = [ServicePort { port: 80, protocol: Protocol::Tcp, requested_node_port: Some(30005) }];
        let needs = NodePortNeeds { allocate_node_ports: true, health_check: None };
        let got = index.pick_node_ports(&ports, needs, &owner("web")).unwrap();
        assert_eq!(got.node_ports, vec![Some(30005)]);
        assert!(index.pick_node_ports(&ports, needs, &owner("other")).is_err(), "claimed for web");
    }

    /// A Service that carries a nodePort without a claim yet (made before
    /// svcplane, not repaired yet) keeps it on update, as its ClusterIP.
    #[test]
    fn a_node_port_its_service_carries_without_a_claim_is_free_for_that_service() {
        let mut index = mk_index("10.0.0.0/24", "30000-30010");
        index.apply_service(owner("web"), [Value::Port(30005)].into());
        let ports = [ServicePort { port: 80, protocol: Protocol::Tcp, requested_node_port: Some(30005) }];
        let needs = NodePortNeeds { allocate_node_ports: true, health_check: None };
        assert_eq!(
            index.pick_node_ports(&ports, needs, &owner("web")).unwrap().node_ports,
            vec![Some(30005)]
        );
        let other = index.pick_node_ports(&ports, needs, &owner("other")).unwrap_err();
        assert!(other.to_string().contains("30005"), "{other}");
    }

    #[test]
    fn pool_change_keeps_known_values() {
        let mut index = mk_index("10.0.0.0/24", "30000-30010");
        index.apply_claim(Value::Port(30003), ClaimRecord { owner: owner("web"), uid: None });
        index.set_pools(mk_index("10.1.0.0/24", "30000-30020").config().clone()).unwrap();
        assert_eq!(index.usage()[1].used, 1);
        assert!(index.check_in_range(Value::Ip("10.0.0.5".parse().unwrap())).is_err());
    }

    /// Every IP the index hands out with `pick_ip` until it is full.
    fn pick_all(index: &mut Index) -> (Vec<IpAddr>, String) {
        let mut picked = Vec::new();
        loop {
            match index.pick_ip(IpFamily::IPv4) {
                Ok(ip) => picked.push(ip),
                Err(error) => return (picked, error.to_string()),
            }
        }
    }

    #[test]
    fn a_draining_pool_keeps_its_values_valid_but_gives_and_accepts_no_new_ones() {
        // Issue 18 item 5: a ServiceCIDR being deleted.
        let doomed: ipnetwork::IpNetwork = "10.1.0.0/24".parse().unwrap();
        let mut config = mk_index("10.0.0.0/30,10.1.0.0/24", "30000-30001").config().clone();
        let why = Draining { service_cidr: "doomed".into(), deleting: true };
        config.draining.push((doomed, why));
        let mut index = Index::new(config).unwrap();
        let held = Value::Ip("10.1.0.5".parse().unwrap());
        index.apply_service(owner("old"), [held].into());
        assert!(index.covers(held), "repair: not out of range while the ServiceCIDR exists");
        assert_eq!(
            index.check_in_range(Value::Ip("10.1.0.6".parse().unwrap())).unwrap_err().to_string(),
            "10.1.0.6 is in 10.1.0.0/24, but ServiceCIDR doomed is being deleted: no new ClusterIP is \
             allocated from it"
        );
        let (picked, full) = pick_all(&mut index);
        assert_eq!(picked.len(), 2, "only 10.0.0.0/30's two addresses: {picked:?}");
        assert_eq!(full, "range 10.0.0.0/30 is full");
        let outside = index.check_in_range(Value::Ip("10.9.0.1".parse().unwrap())).unwrap_err();
        assert_eq!(outside.to_string(), "10.9.0.1 is not in range 10.0.0.0/30", "valid choices only");
        // Gone: out of range as before.
        index.set_pools(mk_index("10.0.0.0/30", "30000-30001").config().clone()).unwrap();
        assert!(!index.covers(held));
        assert!(matches!(index.check_in_range(held), Err(RangeError::NotInRange(_))));
    }

    #[test]
    fn an_ip_taken_is_marked_in_every_pool_that_contains_it() {
        // The /27 extends the /28: the 14 addresses taken in the /28 are
        // taken in the /27 as well, so it has exactly 16 more to give.
        let mut index = mk_index("10.0.0.0/28", "30000-30001");
        let in_28: BTreeSet<Value> = (1..=14).map(|i| Value::Ip(IpAddr::from([10, 0, 0, i]))).collect();
        index.apply_service(owner("a"), in_28.clone());
        index.set_pools(mk_index("10.0.0.0/28,10.0.0.0/27", "30000-30001").config().clone()).unwrap();
        let (picked, full) = pick_all(&mut index);
        let picked: BTreeSet<Value> = picked.into_iter().map(Value::Ip).collect();
        assert_eq!((picked.len(), picked.intersection(&in_28).count()), (16, 0), "{picked:?}");
        assert_eq!(full, "range 10.0.0.0/28,10.0.0.0/27 is full");
        index.delete_service(&owner("a"));
        let used: Vec<usize> = index.usage().iter().map(|u| u.used).collect();
        assert_eq!(used, [0, 16, 0], "released in both pools");

        // The larger pool first: its picks are marked in the /28 as well.
        let mut index = mk_index("10.0.0.0/27,10.0.0.0/28", "30000-30001");
        let (picked, _) = pick_all(&mut index);
        assert_eq!(picked.iter().collect::<BTreeSet<_>>().len(), 30);
        assert_eq!(index.usage()[1].used, 14);
    }

    #[test]
    fn out_of_range_ip_names_every_range_of_a_dual_stack_pool() {
        let index = mk_index("10.0.0.0/24,fd00::/120", "30000-30010");
        let err = index.check_in_range(Value::Ip("10.9.0.1".parse().unwrap())).unwrap_err();
        assert!(err.to_string().contains("10.0.0.0/24,fd00::/120"), "{err}");
    }

    #[test]
    fn an_unconfirmed_claim_is_released_after_the_bound_unless_its_service_holds_it() {
        let mut index = mk_index("10.0.0.0/24", "30000-30010");
        let start = Instant::now();
        let bound = Duration::from_secs(30);
        let (kept, failed) = (Value::Port(30001), Value::Port(30002));
        for value in [kept, failed] {
            index.apply_claim(value, ClaimRecord { owner: owner("web-*"), uid: Some(format!("u{value}")) });
            index.track_unconfirmed(value, &owner("web-*"), Some(format!("u{value}")), start);
        }
        assert_eq!(index.expired_unconfirmed(start + Duration::from_secs(1), bound), vec![]);
        // The apiserver named the Service web-x7k2, and it holds one value.
        index.apply_service(owner("web-x7k2"), [kept].into());
        let later = start + Duration::from_secs(31);
        assert_eq!(index.expired_unconfirmed(later, bound), vec![(failed, Some("u30002".into()))]);
        index.delete_claim(failed);
        assert_eq!(index.expired_unconfirmed(later, bound), vec![]);
        assert!(index.claim(kept).is_some());
    }

    #[test]
    fn a_new_create_supersedes_only_unheld_claims_of_the_same_name() {
        let mut index = mk_index("10.0.0.0/24", "30000-30010");
        let now = Instant::now();
        let track = |index: &mut Index, value: Value, name: &str| {
            index.apply_claim(value, ClaimRecord { owner: owner(name), uid: Some(format!("u{value}")) });
            index.track_unconfirmed(value, &owner(name), Some(format!("u{value}")), now);
        };
        track(&mut index, Value::Port(30001), "web");
        track(&mut index, Value::Port(30002), "web");
        track(&mut index, Value::Port(30003), "api");
        track(&mut index, Value::Port(30004), "gen-*");
        index.apply_service(owner("web"), [Value::Port(30002)].into());
        let none = BTreeSet::new();
        assert_eq!(index.superseded_by(&owner("web"), &none), [(Value::Port(30001), Some("u30001".into()))]);
        assert_eq!(index.superseded_by(&owner("web"), &[Value::Port(30001)].into()), vec![]);
        assert_eq!(index.superseded_by(&owner("gen-*"), &none), vec![], "placeholders are never superseded");
    }

    #[test]
    fn a_placeholder_claim_held_by_its_named_service_is_found_for_re_keying() {
        let mut index = mk_index("10.0.0.0/24", "30000-30010");
        index.apply_claim(Value::Port(30001), ClaimRecord { owner: owner("gen-*"), uid: Some("u1".into()) });
        index.apply_claim(Value::Port(30002), ClaimRecord { owner: owner("gen-*"), uid: Some("u2".into()) });
        index.apply_service(owner("gen-abc"), [Value::Port(30001)].into());
        index.apply_service(owner("other"), [Value::Port(30002)].into());
        assert_eq!(index.held_placeholders(), [(Value::Port(30001), Some("u1".into()), owner("gen-abc"))]);
    }

    fn block(first: u16, holder: &str, now: SystemTime) -> (BlockId, BlockRecord) {
        let expires = Some(now + crate::blocks::BLOCK_LIFETIME);
        (
            BlockId { first: Value::Port(first), size: 16 },
            BlockRecord { holder: holder.into(), uid: None, expires, seen: true },
        )
    }

    #[test]
    fn only_the_holder_hands_out_a_blocks_values_and_skips_those_held_otherwise() {
        let now = SystemTime::now();
        let mut index = mk_index("10.0.0.0/24", "30000-30999");
        index.set_replica("me".into());
        let (mine, record) = block(30016, "me", now);
        index.apply_block(mine, record);
        let (theirs, record) = block(30032, "other", now);
        index.apply_block(theirs, record);
        index.apply_claim(Value::Port(30016), ClaimRecord { owner: owner("asked"), uid: None });
        index.apply_service(owner("bypass"), [Value::Port(30017)].into());
        index.hold_pending(Value::Port(30018));
        let handed = index.take_from_block(BlockKind::Port, &owner("web"), now);
        assert_eq!(handed, Some(Value::Port(30019)), "the first value nothing else holds");
        assert!(index.is_deferred_for(Value::Port(30019), &owner("web")));
        assert_eq!(index.other_holder(Value::Port(30019), &owner("db")), Some(Holder::Pending));
        assert_eq!(index.other_holder(Value::Port(30019), &owner("web")), None);
        assert_eq!(index.own_free(BlockKind::Port, now), 12);
        assert!(index.in_foreign_block(Value::Port(30040)) && !index.in_foreign_block(Value::Port(30020)));
        // Every other pick avoids both blocks.
        for _ in 0..(1000 - 32) {
            let port = index.pick_port().unwrap();
            assert!(!mine.contains(Value::Port(port)) && !theirs.contains(Value::Port(port)), "{port}");
        }
        assert!(index.pick_port().is_err(), "the blocks' values are taken for everyone else");
    }

    #[test]
    fn a_returned_block_frees_only_the_values_nothing_else_holds() {
        let now = SystemTime::now();
        let mut index = mk_index("10.0.0.0/24", "30000-30999");
        index.set_replica("me".into());
        let (id, record) = block(30016, "me", now);
        index.apply_block(id, record);
        let ports_used =
            |index: &Index| index.usage().iter().find(|u| u.pool == "30000-30999").map(|u| u.used);
        assert_eq!(ports_used(&index), Some(0), "reserved ahead is not used");
        let handed = index.take_from_block(BlockKind::Port, &owner("web"), now).unwrap();
        assert_eq!(ports_used(&index), Some(1));
        index.delete_block(id);
        assert!(index.ports.has(30016) && index.is_deferred(handed), "the handed-out value stays taken");
        assert!(!index.ports.has(30017), "a free value of the block is free again");
        index.undefer(handed);
        assert!(!index.ports.has(30016));
        assert_eq!(index.take_from_block(BlockKind::Port, &owner("web"), now), None, "no block left");
    }

    #[test]
    fn a_block_is_not_handed_out_from_near_its_expiry_and_is_returned_when_used_up() {
        let now = SystemTime::now();
        let mut index = mk_index("10.0.0.0/24", "30000-30999");
        index.set_replica("me".into());
        let (id, mut record) = block(30016, "me", now);
        record.expires = Some(now + crate::blocks::HANDOUT_MARGIN);
        index.apply_block(id, record);
        assert_eq!(index.take_from_block(BlockKind::Port, &owner("web"), now), None);
        assert_eq!(index.own_blocks_to_return(now, false), [(id, None)]);
        let (fresh, record) = block(30048, "me", now);
        index.apply_block(fresh, record);
        let handed: Vec<Value> =
            (0..16).map(|_| index.take_from_block(BlockKind::Port, &owner("web"), now).unwrap()).collect();
        assert_eq!(index.own_blocks_to_return(now, true), [(id, None)], "not while a claim is unwritten");
        for (i, value) in handed.into_iter().enumerate() {
            index.apply_claim(value, ClaimRecord { owner: owner(&format!("web-{i}")), uid: None });
            index.undefer(value);
        }
        assert_eq!(index.own_blocks_to_return(now, false), [(id, None), (fresh, None)], "used up");
        let (theirs, record) = block(30064, "other", now);
        index.apply_block(theirs, record);
        assert!(!index.own_blocks_to_return(now, true).iter().any(|(b, _)| *b == theirs), "never another's");
    }

    #[test]
    fn a_new_block_overlaps_no_known_block_and_only_a_roomy_pool_gets_blocks() {
        let now = SystemTime::now();
        let mut index = mk_index("10.0.0.0/24", "30000-30999");
        index.set_replica("me".into());
        for _ in 0..20 {
            let id = index.choose_block(BlockKind::Port, 16).unwrap();
            assert!(id.size == 16 || id == BlockId { first: Value::Port(30992), size: 8 }, "{id:?}");
            assert!(id.values().all(|v| !index.block_of.contains_key(&v)));
            index.apply_block(
                id,
                BlockRecord { holder: "x".into(), uid: None, expires: Some(now), seen: true },
            );
        }
        let ip_block = index.choose_block(BlockKind::Ip(IpFamily::IPv4), 4).unwrap();
        assert!(matches!(ip_block.first, Value::Ip(ip) if ip.to_string().starts_with("10.0.0.")));
        // A /24 has 254 addresses: fewer than 16 blocks of 32.
        assert!(!index.blocks_worthwhile(BlockKind::Ip(IpFamily::IPv4), 32));
        assert!(index.choose_block(BlockKind::Ip(IpFamily::IPv4), 32).is_none());
        let small = mk_index("10.0.0.0/24", "30000-30100");
        assert!(!small.blocks_worthwhile(BlockKind::Port, 16), "101 ports");
    }
}
