//! The desired mirrored endpoints of one Endpoints object, grouped by (address
//! type, port set), and the comparison with an existing slice. Pure.
//!
//! Upstream: `desiredCalc`, `addressToEndpoint`, `epPortsToEpsPorts`,
//! `newAddrTypePortMapKey`, `totalChanges` and `k8s.io/endpointslice/util`'s
//! `EndpointSet` / `EndpointsEqualBeyondHash`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort as CorePort, Endpoints};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice,
};

use crate::endpoints::repack::{PortIdentity, repack_subsets};
use crate::ip;
use crate::pod::DEFAULT_PROTOCOL;
use crate::slice_keys::{EndpointIdentity, PortSet, equal_beyond_identity};

/// `addressType` of IPv4 slices.
pub(super) const IPV4: &str = "IPv4";
/// `addressType` of IPv6 slices.
pub(super) const IPV6: &str = "IPv6";

/// Upstream's `addrTypePortMapKey`: address type plus the port set, order-insensitive
/// (a sorted multiset, as upstream hashes the sorted list).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct SliceKey {
    pub(super) address_type: String,
    ports: PortSet,
}

impl SliceKey {
    fn new(address_type: &str, ports: &[SlicePort]) -> SliceKey {
        SliceKey { address_type: address_type.to_owned(), ports: PortSet::of(ports) }
    }

    /// The key of an existing slice.
    pub(super) fn of_slice(slice: &EndpointSlice) -> SliceKey {
        SliceKey::new(&slice.address_type, slice.ports.as_deref().unwrap_or(&[]))
    }
}

/// Desired endpoints of one (address type, port set).
#[derive(Clone, Debug, Default)]
pub(super) struct DesiredGroup {
    /// The slice's ports, sorted by field (upstream: by hash; order is not semantic).
    pub(super) ports: Vec<SlicePort>,
    /// Endpoints, de-duplicated by upstream's endpoint identity.
    pub(super) endpoints: EndpointSet,
}

/// Everything computed from the Endpoints alone.
#[derive(Debug, Default)]
pub(super) struct DesiredState {
    /// Groups by key; both address types exist for every subset, possibly empty
    /// (upstream `initPorts`), which makes their stale slices deleted and counted.
    pub(super) groups: BTreeMap<SliceKey, DesiredGroup>,
    /// Addresses that did not parse as IPs.
    pub(super) invalid_addresses: usize,
    /// Addresses not mirrored: invalid ones plus those over the per-subset cap.
    pub(super) addresses_skipped: usize,
}

impl DesiredState {
    /// Upstream `reconcile`'s first half: repack, then per subset add ready and
    /// then not-ready addresses until `max_per_subset` valid ones were added.
    pub(super) fn from_endpoints(endpoints: &Endpoints, max_per_subset: usize) -> DesiredState {
        let mut state = DesiredState::default();
        let subsets = repack_subsets(endpoints.subsets.as_deref().unwrap_or(&[]), PortIdentity::Decoded);
        for subset in &subsets {
            let ports = slice_ports(subset.ports.as_deref().unwrap_or(&[]));
            let keys = [IPV4, IPV6].map(|family| SliceKey::new(family, &ports));
            for key in &keys {
                state.groups.entry(key.clone()).or_default().ports = ports.clone();
            }
            let listed = crate::endpoints::repack::listed_addresses(subset);
            let mut added = 0usize;
            for (address, ready) in &listed {
                // Invalid addresses do not use up the cap; addresses after the cap
                // are not even looked at (so not reported as invalid).
                if added >= max_per_subset {
                    break;
                }
                match address_to_endpoint(address, *ready) {
                    Some((family, endpoint)) => {
                        let key = if family == IPV4 { &keys[0] } else { &keys[1] };
                        if let Some(group) = state.groups.get_mut(key) {
                            group.endpoints.insert(endpoint);
                        }
                        added += 1;
                    }
                    None => state.invalid_addresses += 1,
                }
            }
            state.addresses_skipped += listed.len() - added;
        }
        state
    }
}

/// Upstream `addressToEndpoint`: the canonical IP, `ready` from the list it came
/// from, serving/terminating unset, nodeName, non-empty hostname and targetRef
/// copied as they are. `None` for an invalid IP.
fn address_to_endpoint(address: &EndpointAddress, ready: bool) -> Option<(&'static str, Endpoint)> {
    let (parsed, canonical) = ip::canonicalize(&address.ip)?;
    let family = match parsed {
        IpAddr::V4(_) => IPV4,
        IpAddr::V6(_) => IPV6,
    };
    let endpoint = Endpoint {
        addresses: vec![canonical],
        conditions: Some(EndpointConditions { ready: Some(ready), serving: None, terminating: None }),
        hostname: address.hostname.clone().filter(|h| !h.is_empty()),
        node_name: address.node_name.clone(),
        target_ref: address.target_ref.clone(),
        ..Endpoint::default()
    };
    Some((family, endpoint))
}

/// Upstream `epPortsToEpsPorts`, field for field. A missing name becomes `""` and
/// a missing protocol `TCP`, as the apiserver's defaulting of the Endpoints would
/// have made them (Go copies the strings, so never a nil pointer).
fn slice_ports(ports: &[CorePort]) -> Vec<SlicePort> {
    let mut converted: Vec<SlicePort> = ports
        .iter()
        .map(|p| SlicePort {
            name: Some(p.name.clone().unwrap_or_default()),
            port: Some(p.port),
            protocol: Some(p.protocol.clone().unwrap_or_else(|| DEFAULT_PROTOCOL.to_owned())),
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    PortSet::sort(&mut converted);
    converted
}

/// Upstream's `EndpointSet` with a stable order: a later endpoint with the same
/// identity replaces the earlier one in place.
#[derive(Clone, Debug, Default)]
pub(super) struct EndpointSet {
    order: Vec<Endpoint>,
    index: HashMap<EndpointIdentity, usize>,
}

impl EndpointSet {
    fn insert(&mut self, endpoint: Endpoint) {
        let identity = EndpointIdentity::of(&endpoint);
        match self.index.get(&identity) {
            Some(&at) => self.order[at] = endpoint,
            None => {
                self.index.insert(identity, self.order.len());
                self.order.push(endpoint);
            }
        }
    }

    fn get(&self, endpoint: &Endpoint) -> Option<&Endpoint> {
        self.index.get(&EndpointIdentity::of(endpoint)).map(|&at| &self.order[at])
    }

    /// Number of distinct endpoints.
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    /// True when no endpoint is desired.
    pub(super) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Endpoints in insertion order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.order.iter()
    }
}

/// Upstream `totalsByAction` for one slice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Totals {
    /// Desired endpoints not in the slice. Upstream computes this as desired minus
    /// matches, which a slice with duplicate endpoints can drive negative; the sign
    /// matters for "is anything different".
    pub(super) added: isize,
    /// Endpoints in the slice whose fields differ from the desired ones.
    pub(super) updated: usize,
    /// Endpoints in the slice that are not desired.
    pub(super) removed: usize,
}

/// Upstream `totalChanges`: how far an existing slice is from the desired set.
pub(super) fn total_changes(slice: &EndpointSlice, desired: &EndpointSet) -> Totals {
    let mut totals = Totals::default();
    let mut matches = 0isize;
    for endpoint in slice.endpoints.iter().flatten() {
        match desired.get(endpoint) {
            None => totals.removed += 1,
            Some(want) => {
                matches += 1;
                if !equal_beyond_identity(want, endpoint) {
                    totals.updated += 1;
                }
            }
        }
    }
    totals.added = isize::try_from(desired.len()).unwrap_or(isize::MAX) - matches;
    totals
}
