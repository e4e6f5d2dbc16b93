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
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use svcplane_ipam::{
    ClusterIpAllocator, IpFamily, IpamError, NodePortAllocator, NodePortAssignment, NodePortError,
    NodePortNeeds, ServicePort, assign_node_ports,
};

use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;

use crate::admit::{service_owner, service_values};
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
}

impl Index {
    /// An empty index over `config`'s pools.
    pub fn new(config: PoolConfig) -> Result<Self, IpamError> {
        let (ips, ports) = build_allocators(&config)?;
        let (claims, held, services, pending, unconfirmed, service_ip_pools) = Default::default();
        let retained = Retained::default();
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
        self.pending.contains_key(&value).then_some(Holder::Pending)
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
        let ips =
            self.ips.iter().map(|p| PoolUsage { pool: p.cidr().to_string(), used: p.used(), free: p.free() });
        let p = &self.ports;
        let ports = [PoolUsage { pool: p.range().to_string(), used: p.used(), free: p.free() }];
        ips.chain(ports).chain(self.service_ip_pool_usage()).collect()
    }

    /// Makes the bit of `value` match whether anyone holds it.
    fn sync(&mut self, value: Value) {
        let wanted = self.claims.contains_key(&value)
            || self.held.contains_key(&value)
            || self.pending.contains_key(&value);
        match value {
            // Every pool that contains it: overlapping CIDRs (a /24 inside a
            // /16, a larger one added to extend the range) must not hand it
            // out again from the other one.
            Value::Ip(ip) => {
                let service_ip_pools = self.service_ip_pools.bitmaps.iter_mut().map(|(_, b)| b);
                for pool in self.ips.iter_mut().chain(service_ip_pools).filter(|pool| pool.contains(ip)) {
                    if wanted && !pool.has(ip) {
                        // In range and free, so this cannot fail.
                        let _ = pool.allocate(ip);
                    } else if !wanted {
                        pool.release(ip);
                    }
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
        let values: BTreeSet<Value> =
            self.claims.keys().chain(self.held.keys()).chain(self.pending.keys()).copied().collect();
        for value in values {
            self.sync(value);
        }
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
}
