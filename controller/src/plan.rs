//! What a planner wants done for one owner (a Service, or an Endpoints name):
//! the one plan type of all three controllers. Pure data and pure helpers.

use std::fmt;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Who a plan is for: the namespace and name of a Service, which are also those
/// of its Endpoints and the `kubernetes.io/service-name` of its slices. The
/// controllers' queues are keyed by it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl Key {
    /// The key of an object.
    pub fn of<K: kube::Resource>(obj: &K) -> Self {
        use kube::ResourceExt;
        Key { namespace: obj.namespace().unwrap_or_default(), name: obj.name_any() }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What to write for one owner. Applying it to what exists yields the desired
/// state; planning again on that state yields an empty plan. The shell applies
/// creates, then updates, then deletes, so an endpoint moving between slices is
/// never absent from all of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan<K> {
    /// Objects to create (slices carry `generateName`, not a name).
    pub create: Vec<K>,
    /// Existing objects with new content, written by name.
    pub update: Vec<K>,
    /// Existing objects to delete; a delete that finds nothing is not an error.
    pub delete: Vec<K>,
    /// Endpoint counts of this sync, for metrics.
    pub endpoints: EndpointCounts,
    /// Warning Events upstream records for this sync on the owner object.
    pub warnings: Vec<Warning>,
    /// Set when the writes are right but incomplete: the sync must fail after
    /// them so it is retried with backoff (upstream does this for Pods whose Node
    /// is not known yet).
    pub retry: Option<String>,
}

impl<K> Default for Plan<K> {
    fn default() -> Self {
        Plan {
            create: Vec::new(),
            update: Vec::new(),
            delete: Vec::new(),
            endpoints: EndpointCounts::default(),
            warnings: Vec::new(),
            retry: None,
        }
    }
}

/// How many endpoints a sync adds, changes, removes and wants (upstream's
/// per-sync metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounts {
    /// Desired, and in no existing object before.
    pub added: usize,
    /// Kept in an object but with changed fields (mirroring only).
    pub updated: usize,
    /// In an existing object, and not desired any more.
    pub removed: usize,
    /// In the desired state.
    pub desired: usize,
    /// Slices the desired endpoints need with perfect packing (upstream
    /// `numDesiredSlices`, summed over port sets).
    pub desired_slices: usize,
    /// Addresses not mirrored: invalid, or over the per-subset cap (mirroring only).
    pub skipped: usize,
}

/// A Warning Event to record on the owner object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// Upstream's Event reason.
    pub reason: &'static str,
    /// Upstream's Event message.
    pub message: String,
}

impl<K> Plan<K> {
    /// A plan that deletes `objects` and does nothing else.
    pub fn delete_all(objects: impl IntoIterator<Item = K>) -> Self {
        Plan { delete: objects.into_iter().collect(), ..Plan::default() }
    }

    /// True when nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }

    /// Drops the creates when the owner is being deleted: upstream never creates
    /// objects for an owner with a deletionTimestamp, which would race the garbage
    /// collector; updates and deletes still go out.
    pub fn without_creates_if_deleting(mut self, owner: &ObjectMeta) -> Self {
        if owner.deletion_timestamp.is_some() {
            self.create.clear();
        }
        self
    }
}

/// Upstream's recycling (`finalize` in `k8s.io/endpointslice`, `recycleSlices` in
/// endpointslice mirroring): while a create and a delete of the same address type
/// remain, the create takes the name of the slice that would be deleted and
/// becomes an update, so the number of slice objects churns less. The recycled
/// slice is a new object: it carries no resourceVersion, so the update is
/// unconditional (both upstream controllers copy only the name).
///
/// Deletes are taken in order, each by the last create of its address type;
/// `may_take` says which deletes may be recycled (the EndpointSlice controller
/// recycles only slices owned by the Service, never one a garbage collector is
/// about to remove for an older Service of the same name).
pub fn recycle_deletes(plan: &mut Plan<EndpointSlice>, may_take: impl Fn(&EndpointSlice) -> bool) {
    let mut kept = Vec::with_capacity(plan.delete.len());
    for target in std::mem::take(&mut plan.delete) {
        let pick = plan.create.iter().rposition(|c| c.address_type == target.address_type);
        match pick.filter(|_| may_take(&target)) {
            Some(at) => {
                let mut recycled = plan.create.remove(at);
                recycled.metadata.name = target.metadata.name;
                recycled.metadata.resource_version = None;
                plan.update.push(recycled);
            }
            None => kept.push(target),
        }
    }
    plan.delete = kept;
}

/// Number of endpoints in a slice.
pub fn endpoint_count(slice: &EndpointSlice) -> usize {
    slice.endpoints.as_ref().map_or(0, Vec::len)
}

/// No slices, for [`applied`].
#[cfg(test)]
pub(crate) const NO_SLICES: &[EndpointSlice] = &[];

/// What the apiserver would hold after `plan` is applied to `existing`, for the
/// planners' tests: deletes and updates by name (an update of a missing slice
/// panics), creates named `generateName` + a counter not used yet. Every write
/// gets a new resourceVersion. Sorted by name.
#[cfg(test)]
pub(crate) fn applied<S: std::borrow::Borrow<EndpointSlice>>(
    existing: &[S],
    plan: &Plan<EndpointSlice>,
) -> Vec<EndpointSlice> {
    use std::collections::BTreeMap;
    let name_of = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
    let mut state: BTreeMap<String, EndpointSlice> =
        existing.iter().map(|s| (name_of(s.borrow()), s.borrow().clone())).collect();
    let mut version = state.len();
    let mut written = |mut slice: EndpointSlice| {
        version += 1;
        slice.metadata.resource_version = Some(format!("w{version}"));
        slice
    };
    for slice in &plan.delete {
        state.remove(&name_of(slice));
    }
    for slice in &plan.update {
        assert!(state.contains_key(&name_of(slice)), "update of missing slice {}", name_of(slice));
        state.insert(name_of(slice), written(slice.clone()));
    }
    let mut counter = 0usize;
    for slice in &plan.create {
        assert!(slice.metadata.name.is_none(), "creates use generateName");
        let prefix = slice.metadata.generate_name.clone().unwrap_or_default();
        let name = loop {
            counter += 1;
            let candidate = format!("{prefix}{counter:05}");
            if !state.contains_key(&candidate) {
                break candidate;
            }
        };
        let mut created = written(slice.clone());
        created.metadata.name = Some(name.clone());
        state.insert(name, created);
    }
    state.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: Option<&str>, address_type: &str, rv: Option<&str>) -> EndpointSlice {
        EndpointSlice {
            address_type: address_type.into(),
            metadata: ObjectMeta {
                name: name.map(Into::into),
                resource_version: rv.map(Into::into),
                ..ObjectMeta::default()
            },
            ..EndpointSlice::default()
        }
    }

    #[test]
    fn recycling_pairs_each_delete_with_the_last_create_of_its_address_type() {
        let mut plan = Plan {
            create: vec![slice(None, "IPv4", None), slice(None, "IPv6", None), slice(None, "IPv4", None)],
            delete: vec![slice(Some("a"), "IPv4", Some("7")), slice(Some("b"), "FQDN", Some("8"))],
            ..Plan::default()
        };
        plan.create[2].metadata.generate_name = Some("last-".into());
        recycle_deletes(&mut plan, |_| true);
        assert_eq!(plan.update.len(), 1);
        let recycled = &plan.update[0];
        assert_eq!(recycled.metadata.name.as_deref(), Some("a"));
        assert_eq!(recycled.metadata.generate_name.as_deref(), Some("last-"), "the last IPv4 create");
        assert_eq!(recycled.metadata.resource_version, None, "unconditional, as upstream");
        assert_eq!(plan.create.len(), 2);
        assert_eq!(plan.delete, vec![slice(Some("b"), "FQDN", Some("8"))], "no create of its type");
    }

    #[test]
    fn a_delete_the_predicate_refuses_stays_a_delete() {
        let mut plan = Plan {
            create: vec![slice(None, "IPv4", None)],
            delete: vec![slice(Some("old-owner"), "IPv4", None)],
            ..Plan::default()
        };
        recycle_deletes(&mut plan, |s| s.metadata.name.as_deref() != Some("old-owner"));
        assert_eq!((plan.create.len(), plan.update.len(), plan.delete.len()), (1, 0, 1));
    }

    #[test]
    fn an_owner_being_deleted_gets_no_creates() {
        let plan = Plan { create: vec![1], update: vec![2], delete: vec![3], ..Plan::default() };
        let deleting = ObjectMeta {
            deletion_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            )),
            ..ObjectMeta::default()
        };
        assert_eq!(plan.clone().without_creates_if_deleting(&ObjectMeta::default()), plan);
        let kept = plan.without_creates_if_deleting(&deleting);
        assert_eq!((kept.create, kept.update, kept.delete), (vec![], vec![2], vec![3]));
    }
}
