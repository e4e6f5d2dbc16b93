//! NodePorts for one Service at create time, as kube-apiserver assigns them.
//!
//! Input: plain per-port structs, whether new NodePorts are wanted, and the
//! health-check request. Output: the nodePort of every port and the
//! healthCheckNodePort, or a field error. No Kubernetes types, no I/O.
//!
//! Rules from upstream `initNodePorts` / `allocHealthCheckNodePort`
//! (pkg/registry/core/service/storage/alloc.go):
//! - entries with the same service `port` number share one nodePort, so
//!   `53/TCP` and `53/UDP` take a single bit; a nodePort requested on any of
//!   them is used for all;
//! - the same requested nodePort on entries with *different* `port` numbers
//!   is allocated twice, so the second one fails as "already allocated";
//! - without `allocate_node_ports` (LoadBalancer with
//!   `allocateLoadBalancerNodePorts: false`) only requested values are taken;
//! - the health-check port comes from the same range.
//!
//! All-or-nothing: on error every port taken by the call is released again,
//! as upstream's transaction revert does.

use std::collections::HashMap;
use std::fmt;

use crate::error::IpamError;
use crate::ports::NodePortAllocator;

/// Transport protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// One `spec.ports[]` entry, reduced to what NodePort assignment reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `spec.ports[i].port`.
    pub port: u16,
    /// `spec.ports[i].protocol`. Sharing is keyed by `port` alone, as upstream.
    pub protocol: Protocol,
    /// `spec.ports[i].nodePort` when the user set one.
    pub requested_node_port: Option<u16>,
}

/// What the Service needs besides its port list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodePortNeeds {
    /// Allocate nodePorts for ports that request none: true for NodePort,
    /// and for LoadBalancer unless `allocateLoadBalancerNodePorts: false`.
    pub allocate_node_ports: bool,
    /// `Some(requested)` when a healthCheckNodePort is needed
    /// (LoadBalancer with `externalTrafficPolicy: Local`).
    pub health_check: Option<Option<u16>>,
}

/// The result of a successful assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePortAssignment {
    /// `spec.ports[i].nodePort`, `None` where no nodePort applies.
    pub node_ports: Vec<Option<u16>>,
    /// `spec.healthCheckNodePort`, when needed.
    pub health_check_node_port: Option<u16>,
}

/// An assignment failure, naming the field as the apiserver does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePortError {
    /// `spec.ports[1].nodePort`, `spec.healthCheckNodePort`, or `spec.ports`
    /// for a dynamic allocation that found the range full.
    pub field: String,
    /// The allocator's refusal.
    pub source: IpamError,
}

impl fmt::Display for NodePortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.source)
    }
}

impl std::error::Error for NodePortError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Assigns the nodePorts and healthCheckNodePort of one new Service.
/// On error nothing stays allocated.
pub fn assign_node_ports(
    allocator: &mut NodePortAllocator,
    ports: &[ServicePort],
    needs: NodePortNeeds,
) -> Result<NodePortAssignment, NodePortError> {
    let mut taken = Vec::new();
    let result = assign(allocator, ports, needs, &mut taken);
    if result.is_err() {
        for port in taken {
            allocator.release(port);
        }
    }
    result
}

fn assign(
    allocator: &mut NodePortAllocator,
    ports: &[ServicePort],
    needs: NodePortNeeds,
    taken: &mut Vec<u16>,
) -> Result<NodePortAssignment, NodePortError> {
    let mut by_service_port: HashMap<u16, u16> = HashMap::new();
    let mut node_ports = Vec::with_capacity(ports.len());
    for (index, entry) in ports.iter().enumerate() {
        let field = || format!("spec.ports[{index}].nodePort");
        if entry.requested_node_port.is_none() && !needs.allocate_node_ports {
            // Don't allocate new ports, but do respect specific requests.
            node_ports.push(None);
            continue;
        }
        let assigned = match (by_service_port.get(&entry.port), entry.requested_node_port) {
            (Some(&shared), None) => shared,
            (Some(&shared), Some(requested)) if requested == shared => shared,
            (Some(_), Some(requested)) => {
                take(allocator, requested, field, taken)?;
                requested
            }
            (None, _) => {
                // Any entry with the same `port` may carry the request.
                let requested = ports
                    .iter()
                    .filter(|other| other.port == entry.port)
                    .find_map(|other| other.requested_node_port);
                let port = match requested {
                    Some(requested) => {
                        take(allocator, requested, field, taken)?;
                        requested
                    }
                    None => {
                        let port = allocator
                            .allocate_next()
                            .map_err(|source| NodePortError { field: "spec.ports".to_owned(), source })?;
                        taken.push(port);
                        port
                    }
                };
                by_service_port.insert(entry.port, port);
                port
            }
        };
        node_ports.push(Some(assigned));
    }

    let health_check_node_port = match needs.health_check {
        None => None,
        Some(Some(requested)) => {
            take(allocator, requested, || "spec.healthCheckNodePort".to_owned(), taken)?;
            Some(requested)
        }
        Some(None) => {
            let port = allocator
                .allocate_next()
                .map_err(|source| NodePortError { field: "spec.healthCheckNodePort".to_owned(), source })?;
            taken.push(port);
            Some(port)
        }
    };
    Ok(NodePortAssignment { node_ports, health_check_node_port })
}

fn take(
    allocator: &mut NodePortAllocator,
    port: u16,
    field: impl Fn() -> String,
    taken: &mut Vec<u16>,
) -> Result<(), NodePortError> {
    allocator.allocate(port).map_err(|source| NodePortError { field: field(), source })?;
    taken.push(port);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::PortRange;

    fn alloc() -> NodePortAllocator {
        NodePortAllocator::with_seed(PortRange::default(), 5)
    }

    fn mk_port(port: u16, protocol: Protocol, requested: Option<u16>) -> ServicePort {
        ServicePort { port, protocol, requested_node_port: requested }
    }

    const NODE_PORT: NodePortNeeds = NodePortNeeds { allocate_node_ports: true, health_check: None };

    #[test]
    fn same_port_on_tcp_and_udp_shares_one_node_port() {
        let mut allocator = alloc();
        let ports = [
            mk_port(53, Protocol::Tcp, None),
            mk_port(53, Protocol::Udp, None),
            mk_port(80, Protocol::Tcp, None),
        ];
        let got = assign_node_ports(&mut allocator, &ports, NODE_PORT).unwrap();
        assert_eq!(got.node_ports[0], got.node_ports[1]);
        assert_ne!(got.node_ports[0], got.node_ports[2]);
        assert_eq!(allocator.used(), 2);
    }

    #[test]
    fn a_request_on_the_later_entry_is_used_for_both() {
        let mut allocator = alloc();
        let ports = [mk_port(53, Protocol::Tcp, None), mk_port(53, Protocol::Udp, Some(30053))];
        let got = assign_node_ports(&mut allocator, &ports, NODE_PORT).unwrap();
        assert_eq!(got.node_ports, vec![Some(30053), Some(30053)]);
        assert_eq!(allocator.used(), 1);
    }

    #[test]
    fn same_request_on_different_ports_fails_and_rolls_back() {
        let mut allocator = alloc();
        let ports = [mk_port(53, Protocol::Tcp, Some(30053)), mk_port(5353, Protocol::Udp, Some(30053))];
        let err = assign_node_ports(&mut allocator, &ports, NODE_PORT).unwrap_err();
        assert_eq!(err.field, "spec.ports[1].nodePort");
        assert_eq!(
            err.to_string(),
            "spec.ports[1].nodePort: 30053 is already allocated in range 30000-32767"
        );
        assert_eq!(allocator.used(), 0, "the first allocation must be reverted");
    }

    #[test]
    fn no_new_ports_when_load_balancer_node_ports_are_off() {
        let mut allocator = alloc();
        let ports = [mk_port(80, Protocol::Tcp, None), mk_port(443, Protocol::Tcp, Some(31443))];
        let needs = NodePortNeeds { allocate_node_ports: false, health_check: Some(None) };
        let got = assign_node_ports(&mut allocator, &ports, needs).unwrap();
        assert_eq!(got.node_ports, vec![None, Some(31443)]);
        assert!(got.health_check_node_port.is_some());
        assert_eq!(allocator.used(), 2);
    }

    #[test]
    fn requested_health_check_port_out_of_range_rolls_back() {
        let mut allocator = alloc();
        let ports = [mk_port(80, Protocol::Tcp, None)];
        let needs = NodePortNeeds { allocate_node_ports: true, health_check: Some(Some(40000)) };
        let err = assign_node_ports(&mut allocator, &ports, needs).unwrap_err();
        assert_eq!(err.field, "spec.healthCheckNodePort");
        assert_eq!(err.source.reason(), "NotInRange");
        assert_eq!(allocator.used(), 0);
    }

    #[test]
    fn full_range_names_the_ports_field() {
        let mut allocator = NodePortAllocator::with_seed("30000-30000".parse().unwrap(), 1);
        let ports = [mk_port(80, Protocol::Tcp, None), mk_port(81, Protocol::Tcp, None)];
        let err = assign_node_ports(&mut allocator, &ports, NODE_PORT).unwrap_err();
        assert_eq!(err.to_string(), "spec.ports: range 30000-30000 is full");
        assert_eq!(allocator.used(), 0);
    }
}
