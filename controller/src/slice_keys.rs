//! How both slice planners (EndpointSlice and mirroring) tell port sets and
//! endpoints apart: upstream's hashes (`k8s.io/endpointslice/util`:
//! `NewPortMapKey`, `hashEndpoint`, `EndpointsEqualBeyondHash`), as sortable keys
//! instead of hashes, so plans do not depend on map order. Pure.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};

/// An order-insensitive port set (upstream `PortMapKey`, a hash of the ports
/// with their pointers followed): every field counts as it is, so a missing
/// name differs from an empty one; a missing and an empty list are equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSet(Vec<PortFields>);

/// name, port, protocol, appProtocol.
type PortFields = (Option<String>, Option<i32>, Option<String>, Option<String>);

impl PortSet {
    /// The set of `ports`.
    pub fn of(ports: &[EndpointPort]) -> PortSet {
        let mut set: Vec<_> = ports
            .iter()
            .map(|p| (p.name.clone(), p.port, p.protocol.clone(), p.app_protocol.clone()))
            .collect();
        set.sort();
        PortSet(set)
    }

    /// Sorts `ports` in key order: upstream stores them in hash order, and any
    /// fixed order will do (order is not compared); this one keeps new slices
    /// deterministic.
    pub fn sort(ports: &mut [EndpointPort]) {
        ports.sort_by_key(|p| PortSet::of(std::slice::from_ref(p)));
    }
}

/// An endpoint's identity (upstream `hashEndpoint`): sorted addresses, hostname
/// and the target's namespace and name. UID, node, zone and conditions are not
/// part of it, so a recreated Pod with the same name and IP is an in-place change.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointIdentity {
    addresses: Vec<String>,
    hostname: String,
    namespace: String,
    name: String,
}

impl EndpointIdentity {
    /// The identity of `endpoint`.
    pub fn of(endpoint: &Endpoint) -> EndpointIdentity {
        let mut addresses = endpoint.addresses.clone();
        addresses.sort();
        let target = endpoint.target_ref.as_ref();
        EndpointIdentity {
            addresses,
            hostname: endpoint.hostname.clone().unwrap_or_default(),
            namespace: target.and_then(|t| t.namespace.clone()).unwrap_or_default(),
            name: target.and_then(|t| t.name.clone()).unwrap_or_default(),
        }
    }
}

/// Upstream `EndpointsEqualBeyondHash`: same node, zone, conditions (an unset
/// condition differs from a set one) and targetRef ignoring resourceVersion.
/// Addresses and hostname are the identity; hints are compared apart.
pub fn equal_beyond_identity(a: &Endpoint, b: &Endpoint) -> bool {
    let conditions = |e: &Endpoint| e.conditions.clone().unwrap_or_default();
    // Go compares the struct by value: an empty string equals an absent field.
    let target = |e: &Endpoint| {
        let present = |s: Option<String>| s.filter(|s| !s.is_empty());
        e.target_ref.clone().map(|t| ObjectReference {
            api_version: present(t.api_version),
            field_path: present(t.field_path),
            kind: present(t.kind),
            name: present(t.name),
            namespace: present(t.namespace),
            resource_version: None,
            uid: present(t.uid),
        })
    };
    a.node_name == b.node_name && a.zone == b.zone && conditions(a) == conditions(b) && target(a) == target(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: Option<&str>, port: i32) -> EndpointPort {
        EndpointPort {
            name: name.map(Into::into),
            port: Some(port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }
    }

    #[test]
    fn port_sets_ignore_order_and_tell_a_missing_name_from_an_empty_one() {
        let (a, b) = (port(Some("a"), 1), port(Some("b"), 2));
        assert_eq!(PortSet::of(&[a.clone(), b.clone()]), PortSet::of(&[b, a]));
        assert_ne!(PortSet::of(&[port(None, 1)]), PortSet::of(&[port(Some(""), 1)]));
        assert_eq!(PortSet::of(&[]), PortSet::default());
    }

    #[test]
    fn identity_is_addresses_hostname_and_target_name_only() {
        let endpoint = |ips: &[&str], node: &str, uid: &str| Endpoint {
            addresses: ips.iter().map(|s| s.to_string()).collect(),
            node_name: Some(node.into()),
            target_ref: Some(ObjectReference {
                namespace: Some("ns".into()),
                name: Some("pod".into()),
                uid: Some(uid.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (a, b) =
            (endpoint(&["10.0.0.1", "fd00::1"], "n1", "u1"), endpoint(&["fd00::1", "10.0.0.1"], "n2", "u2"));
        assert_eq!(EndpointIdentity::of(&a), EndpointIdentity::of(&b));
        assert!(!equal_beyond_identity(&a, &b), "node and uid differ");
        let mut c = a.clone();
        c.target_ref.as_mut().unwrap().resource_version = Some("9".into());
        c.target_ref.as_mut().unwrap().field_path = Some(String::new());
        assert!(equal_beyond_identity(&a, &c), "resourceVersion ignored, empty equals absent");
    }
}
