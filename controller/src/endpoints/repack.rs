//! `RepackSubsets` from `pkg/api/v1/endpoints`: the canonical layout of Endpoints
//! subsets. Pure.
//!
//! Subsets are expanded to (address, port, ready) triples and regrouped so that
//! every subset holds the ports that share exactly the same (address, ready) set.
//! Both the Endpoints controller (before comparing with what is stored) and the
//! mirroring controller (before mirroring user-written Endpoints) rely on it.
//!
//! Orders: addresses are sorted as upstream (IP text byte-wise, then targetRef
//! UID, a missing targetRef first). Upstream sorts ports and subsets by an FNV hash
//! of a Go-specific dump of each object; svcplane sorts them by their fields
//! instead. The order is not semantic (no consumer relies on it), and every
//! comparison in this crate repacks both sides first, so it is order-insensitive.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset};

/// Identity of an address inside a repack: upstream's `addressKey{ip, uid}`.
type AddressKey = (String, String);

/// The (address number, ready) members behind one port: ports with equal members
/// share a subset.
type MemberKey = Vec<(usize, bool)>;

/// A port as a map key. Upstream keys on the Go struct value, whose `appProtocol`
/// is a pointer: two decoded ports with an `appProtocol` are therefore never equal,
/// even with identical values. `occurrence` reproduces that (see
/// [`PortIdentity`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SubsetPortKey {
    name: String,
    port: i32,
    protocol: String,
    app_protocol: Option<String>,
    occurrence: Option<(usize, usize)>,
}

/// How ports that carry an `appProtocol` are told apart while repacking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PortIdentity {
    /// Objects decoded from the API (user-written Endpoints, the stored object):
    /// each port with an `appProtocol` is its own key, as the Go pointer is unique.
    Decoded,
    /// Subsets built by the Endpoints controller from one Service: the pointer is
    /// shared per Service port, so equal values are the same key.
    ByValue,
}

/// Repacks `subsets` into the canonical layout (upstream `RepackSubsets`).
///
/// Subsets without addresses vanish; a subset without ports keeps its addresses
/// (upstream's sentinel port) and comes back without ports unless the same
/// address set also backs real ports. An address listed both ready and not ready
/// for one port ends up not ready. The first occurrence of an (IP, UID) address
/// is the one kept whole (hostname, nodeName, targetRef).
pub(crate) fn repack_subsets(subsets: &[EndpointSubset], identity: PortIdentity) -> Vec<EndpointSubset> {
    let mut addresses: Vec<EndpointAddress> = Vec::new();
    let mut address_index: HashMap<AddressKey, usize> = HashMap::new();
    // Port (None = the sentinel for a subset without ports) -> address -> ready.
    let mut ports: Vec<(Option<SubsetPortKey>, Option<EndpointPort>)> = Vec::new();
    let mut port_index: HashMap<Option<SubsetPortKey>, usize> = HashMap::new();
    let mut members: Vec<BTreeMap<usize, bool>> = Vec::new();

    for (subset_no, subset) in subsets.iter().enumerate() {
        let listed = listed_addresses(subset);
        let subset_ports: Vec<(Option<SubsetPortKey>, Option<&EndpointPort>)> = match subset.ports.as_deref()
        {
            None | Some([]) => vec![(None, None)],
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(port_no, p)| (Some(port_key(p, identity, (subset_no, port_no))), Some(p)))
                .collect(),
        };
        for (key, port) in subset_ports {
            for (address, ready) in &listed {
                let addr_key = (address.ip.clone(), uid_of(address).to_owned());
                let addr_no = *address_index.entry(addr_key).or_insert_with(|| {
                    addresses.push((*address).clone());
                    addresses.len() - 1
                });
                let port_no = *port_index.entry(key.clone()).or_insert_with(|| {
                    ports.push((key.clone(), port.cloned()));
                    members.push(BTreeMap::new());
                    ports.len() - 1
                });
                // Not ready always trumps ready.
                let entry = members[port_no].entry(addr_no).or_insert(*ready);
                if *entry {
                    *entry = *ready;
                }
            }
        }
    }

    // Group ports by their exact (address, ready) membership.
    let mut groups: Vec<(MemberKey, Vec<EndpointPort>)> = Vec::new();
    for (port_no, set) in members.iter().enumerate() {
        let member_key: MemberKey = set.iter().map(|(a, r)| (*a, *r)).collect();
        let group = match groups.iter_mut().position(|(k, _)| *k == member_key) {
            Some(at) => &mut groups[at].1,
            None => {
                groups.push((member_key, Vec::new()));
                let last = groups.len() - 1;
                &mut groups[last].1
            }
        };
        // Upstream keeps only ports > 0; the sentinel (and any invalid port) only
        // forces the group to exist.
        if let (Some(key), Some(port)) = &ports[port_no]
            && key.port > 0
        {
            group.push(port.clone());
        }
    }

    let mut repacked: Vec<EndpointSubset> = groups
        .into_iter()
        .map(|(member_key, mut group_ports)| {
            let mut ready: Vec<EndpointAddress> = Vec::new();
            let mut not_ready: Vec<EndpointAddress> = Vec::new();
            for (addr_no, is_ready) in member_key {
                let address = addresses[addr_no].clone();
                if is_ready {
                    ready.push(address);
                } else {
                    not_ready.push(address);
                }
            }
            sort_addresses(&mut ready);
            sort_addresses(&mut not_ready);
            group_ports.sort_by_key(port_sort_key);
            EndpointSubset {
                addresses: non_empty(ready),
                not_ready_addresses: non_empty(not_ready),
                ports: non_empty(group_ports),
            }
        })
        .collect();
    repacked.sort_by_cached_key(subset_sort_key);
    repacked
}

/// Sorts addresses as upstream's `LessEndpointAddress`: IP text byte-wise, then a
/// missing targetRef first, then targetRef UID.
pub(crate) fn sort_addresses(addresses: &mut [EndpointAddress]) {
    addresses.sort_by(|a, b| {
        a.ip.as_bytes()
            .cmp(b.ip.as_bytes())
            .then_with(|| a.target_ref.is_some().cmp(&b.target_ref.is_some()))
            .then_with(|| uid_of(a).cmp(uid_of(b)))
    });
}

fn uid_of(address: &EndpointAddress) -> &str {
    address.target_ref.as_ref().and_then(|r| r.uid.as_deref()).unwrap_or("")
}

fn port_key(port: &EndpointPort, identity: PortIdentity, at: (usize, usize)) -> SubsetPortKey {
    SubsetPortKey {
        name: port.name.clone().unwrap_or_default(),
        port: port.port,
        protocol: port.protocol.clone().unwrap_or_default(),
        app_protocol: port.app_protocol.clone(),
        occurrence: match identity {
            PortIdentity::Decoded if port.app_protocol.is_some() => Some(at),
            _ => None,
        },
    }
}

type PortSortKey = (String, i32, String, Option<String>);

fn port_sort_key(port: &EndpointPort) -> PortSortKey {
    (
        port.name.clone().unwrap_or_default(),
        port.port,
        port.protocol.clone().unwrap_or_default(),
        port.app_protocol.clone(),
    )
}

fn subset_sort_key(subset: &EndpointSubset) -> (Vec<PortSortKey>, Vec<String>, Vec<String>) {
    let ips =
        |list: &Option<Vec<EndpointAddress>>| list.iter().flatten().map(|a| a.ip.clone()).collect::<Vec<_>>();
    (
        subset.ports.iter().flatten().map(port_sort_key).collect(),
        ips(&subset.addresses),
        ips(&subset.not_ready_addresses),
    )
}

fn non_empty<T>(list: Vec<T>) -> Option<Vec<T>> {
    (!list.is_empty()).then_some(list)
}

/// A subset's addresses with their readiness: `addresses` (ready) first, then
/// `notReadyAddresses`, in the order written.
pub(crate) fn listed_addresses(subset: &EndpointSubset) -> Vec<(&EndpointAddress, bool)> {
    subset
        .addresses
        .iter()
        .flatten()
        .map(|a| (a, true))
        .chain(subset.not_ready_addresses.iter().flatten().map(|a| (a, false)))
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ObjectReference;

    use super::*;

    fn addr(ip: &str, uid: Option<&str>) -> EndpointAddress {
        EndpointAddress {
            ip: ip.to_owned(),
            target_ref: uid.map(|u| ObjectReference { uid: Some(u.to_owned()), ..Default::default() }),
            ..Default::default()
        }
    }

    fn port(name: &str, number: i32) -> EndpointPort {
        EndpointPort {
            name: Some(name.to_owned()),
            port: number,
            protocol: Some("TCP".to_owned()),
            app_protocol: None,
        }
    }

    fn subset(ready: &[&str], not_ready: &[&str], ports: &[EndpointPort]) -> EndpointSubset {
        let list = |ips: &[&str]| non_empty(ips.iter().map(|ip| addr(ip, None)).collect());
        EndpointSubset {
            addresses: list(ready),
            not_ready_addresses: list(not_ready),
            ports: non_empty(ports.to_vec()),
        }
    }

    fn ips(list: &Option<Vec<EndpointAddress>>) -> Vec<&str> {
        list.iter().flatten().map(|a| a.ip.as_str()).collect()
    }

    #[test]
    fn empty_input_repacks_to_nothing() {
        assert!(repack_subsets(&[], PortIdentity::Decoded).is_empty());
    }

    #[test]
    fn subsets_without_addresses_vanish() {
        let got = repack_subsets(&[subset(&[], &[], &[port("p", 80)])], PortIdentity::Decoded);
        assert!(got.is_empty());
    }

    #[test]
    fn one_address_in_two_subsets_gets_both_ports() {
        let got = repack_subsets(
            &[subset(&["1.1.1.1"], &[], &[port("a", 80)]), subset(&["1.1.1.1"], &[], &[port("b", 81)])],
            PortIdentity::Decoded,
        );
        assert_eq!(got.len(), 1);
        assert_eq!(ips(&got[0].addresses), ["1.1.1.1"]);
        assert_eq!(got[0].ports.as_ref().map(Vec::len), Some(2));
    }

    #[test]
    fn not_ready_trumps_ready_for_the_same_port() {
        let got = repack_subsets(
            &[subset(&["1.1.1.1"], &[], &[port("a", 80)]), subset(&[], &["1.1.1.1"], &[port("a", 80)])],
            PortIdentity::Decoded,
        );
        assert_eq!(got.len(), 1);
        assert!(got[0].addresses.is_none());
        assert_eq!(ips(&got[0].not_ready_addresses), ["1.1.1.1"]);
    }

    #[test]
    fn addresses_sort_by_ip_text_not_numerically() {
        let got = repack_subsets(
            &[subset(&["10.0.0.2", "10.0.0.10", "10.0.0.1"], &[], &[port("a", 80)])],
            PortIdentity::Decoded,
        );
        assert_eq!(ips(&got[0].addresses), ["10.0.0.1", "10.0.0.10", "10.0.0.2"]);
    }

    #[test]
    fn same_ip_different_uid_stays_two_addresses() {
        let mut s = subset(&[], &[], &[port("a", 80)]);
        s.addresses = Some(vec![addr("1.1.1.1", Some("b")), addr("1.1.1.1", Some("a"))]);
        let got = repack_subsets(&[s], PortIdentity::Decoded);
        let uids: Vec<&str> = got[0].addresses.iter().flatten().map(uid_of).collect();
        assert_eq!(uids, ["a", "b"]);
    }

    #[test]
    fn portless_subset_keeps_its_addresses() {
        let got = repack_subsets(&[subset(&["1.1.1.1"], &[], &[])], PortIdentity::Decoded);
        assert_eq!(got.len(), 1);
        assert!(got[0].ports.is_none());
    }

    #[test]
    fn decoded_ports_with_app_protocol_are_never_merged_across_subsets() {
        let mut p = port("a", 80);
        p.app_protocol = Some("h2c".to_owned());
        let input = [
            subset(&["1.1.1.1"], &[], std::slice::from_ref(&p)),
            subset(&["2.2.2.2"], &[], std::slice::from_ref(&p)),
        ];
        assert_eq!(repack_subsets(&input, PortIdentity::Decoded).len(), 2);
        assert_eq!(repack_subsets(&input, PortIdentity::ByValue).len(), 1);
    }

    #[test]
    fn repack_is_idempotent() {
        let input = [
            subset(&["1.1.1.1", "2.2.2.2"], &["3.3.3.3"], &[port("a", 80), port("b", 81)]),
            subset(&["2.2.2.2"], &[], &[port("c", 82)]),
        ];
        let once = repack_subsets(&input, PortIdentity::Decoded);
        assert_eq!(repack_subsets(&once, PortIdentity::Decoded), once);
    }
}
