//! Where values come from: the Service CIDRs and the NodePort range.
//!
//! Input: the `--webhook-service-cidrs` / `--webhook-node-port-range` flags
//! and the cluster's ServiceCIDR objects. Output: a [`PoolConfig`]. No I/O:
//! the ServiceCIDR watch and the repair pass feed [`pools_from`].
//!
//! As kube-apiserver's `MetaAllocator` (`pkg/registry/core/service/
//! ipallocator/cidrallocator.go`, v1.37): a ServiceCIDR being deleted, or
//! whose `Ready` condition is False, gives no new values but stays a pool
//! until it is gone, so the values already in it stay valid (its finalizer
//! `networking.k8s.io/service-cidr-finalizer` keeps it while an IP only it
//! contains is in use). ServiceCIDRs naming the same CIDR share one pool,
//! usable if any of them is; overlapping CIDRs are separate pools.

use std::borrow::Borrow;
use std::fmt;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::ResourceExt;
use svcplane_ipam::{IpFamily, PortRange};

/// The pools values come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Service CIDRs, each once, in ServiceCIDR order (`kubernetes` first);
    /// the family of the first is the cluster's default family. Includes
    /// the draining ones.
    pub cidrs: Vec<IpNetwork>,
    /// The CIDRs of `cidrs` no new value comes from, and why.
    pub draining: Vec<(IpNetwork, Draining)>,
    /// The NodePort range (also used for health-check NodePorts).
    pub node_ports: PortRange,
}

/// Why a CIDR gives no new values while the values in it stay valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draining {
    /// The ServiceCIDR naming the CIDR (the first by name).
    pub service_cidr: String,
    /// Being deleted (else: its `Ready` condition is False).
    pub deleting: bool,
}

impl fmt::Display for Draining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.deleting { "is being deleted" } else { "is not ready" };
        write!(f, "ServiceCIDR {} {state}", self.service_cidr)
    }
}

impl PoolConfig {
    /// Pools from CIDRs that are all usable (the flags).
    pub fn new(cidrs: Vec<IpNetwork>, node_ports: PortRange) -> Self {
        Self { cidrs, draining: Vec::new(), node_ports }
    }

    /// The cluster's IP families in order, the default first.
    pub fn families(&self) -> Vec<IpFamily> {
        let mut families = Vec::new();
        for cidr in &self.cidrs {
            let family = if cidr.is_ipv4() { IpFamily::IPv4 } else { IpFamily::IPv6 };
            if !families.contains(&family) {
                families.push(family);
            }
        }
        families
    }

    /// Why `cidr` gives no new values, or `None` when it does.
    pub fn draining(&self, cidr: IpNetwork) -> Option<&Draining> {
        self.draining.iter().find(|(c, _)| *c == cidr).map(|(_, why)| why)
    }
}

/// The pools from ServiceCIDR objects (the `kubernetes` one first, then by
/// name), or `fallback` when they give no CIDR. A CIDR is draining when every
/// ServiceCIDR naming it is being deleted or not ready. The NodePort range is
/// always `fallback`'s.
pub fn pools_from<C: Borrow<ServiceCIDR>>(cidrs: &[C], fallback: &PoolConfig) -> PoolConfig {
    let mut ordered: Vec<&ServiceCIDR> = cidrs.iter().map(Borrow::borrow).collect();
    ordered.sort_by_key(|c| (c.name_any() != "kubernetes", c.name_any()));
    let mut config = PoolConfig::new(Vec::new(), fallback.node_ports);
    let mut usable = Vec::new();
    for service_cidr in ordered {
        let deleting = service_cidr.metadata.deletion_timestamp.is_some();
        let gives_values = !deleting && is_ready(service_cidr);
        let parsed = service_cidr.spec.iter().flat_map(|s| s.cidrs.iter().flatten());
        for cidr in parsed.filter_map(|cidr| cidr.parse::<IpNetwork>().ok()) {
            if !config.cidrs.contains(&cidr) {
                config.cidrs.push(cidr);
            }
            if gives_values {
                usable.push(cidr);
            } else if config.draining(cidr).is_none() {
                let why = Draining { service_cidr: service_cidr.name_any(), deleting };
                config.draining.push((cidr, why));
            }
        }
    }
    config.draining.retain(|(cidr, _)| !usable.contains(cidr));
    if config.cidrs.is_empty() { fallback.clone() } else { config }
}

/// kube-apiserver's `isReady`: the `Ready` condition, or ready when there is
/// none (kube-controller-manager may not run).
fn is_ready(service_cidr: &ServiceCIDR) -> bool {
    let conditions = service_cidr.status.iter().flat_map(|s| s.conditions.iter().flatten());
    conditions.filter(|c| c.type_ == "Ready").map(|c| c.status == "True").next().unwrap_or(true)
}

/// Parses a comma-separated CIDR list.
pub fn parse_cidrs(text: &str) -> Result<Vec<IpNetwork>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<IpNetwork>().map_err(|e| format!("{s}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::networking::v1::{ServiceCIDRSpec, ServiceCIDRStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    use super::*;

    fn mk(name: &str, cidr: &str) -> ServiceCIDR {
        ServiceCIDR {
            metadata: kube::core::ObjectMeta { name: Some(name.into()), ..Default::default() },
            spec: Some(ServiceCIDRSpec { cidrs: Some(cidr.split(',').map(str::to_owned).collect()) }),
            ..Default::default()
        }
    }

    fn deleting(name: &str, cidr: &str) -> ServiceCIDR {
        let mut service_cidr = mk(name, cidr);
        service_cidr.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        service_cidr
    }

    fn flags() -> PoolConfig {
        PoolConfig::new(parse_cidrs(" 10.96.0.0/16, ").unwrap(), "30000-30099".parse().unwrap())
    }

    fn draining(name: &str, deleting: bool) -> Draining {
        Draining { service_cidr: name.into(), deleting }
    }

    #[test]
    fn service_cidrs_give_the_pools_kubernetes_first_else_the_flags_do() {
        let flags = flags();
        let pools = pools_from(&[mk("b", "10.2.0.0/24"), mk("kubernetes", "fd00::/108,10.0.0.0/24")], &flags);
        assert_eq!(pools.cidrs, parse_cidrs("fd00::/108,10.0.0.0/24,10.2.0.0/24").unwrap());
        assert_eq!(
            (pools.families(), pools.node_ports, pools.draining),
            (vec![IpFamily::IPv6, IpFamily::IPv4], flags.node_ports, vec![])
        );
        assert_eq!(pools_from(&[mk("bad", "not-a-cidr")], &flags), flags, "unparsable");
        assert!(parse_cidrs("10.0.0.0/8,nope").unwrap_err().starts_with("nope: "));
    }

    #[test]
    fn a_service_cidr_being_deleted_stays_a_pool_that_gives_no_new_values() {
        // Issue 18 item 5: dropping it at once made every Service in it out of range.
        let pools =
            pools_from(&[mk("kubernetes", "10.0.0.0/24"), deleting("doomed", "10.1.0.0/24")], &flags());
        assert_eq!(pools.cidrs, parse_cidrs("10.0.0.0/24,10.1.0.0/24").unwrap());
        let doomed: IpNetwork = "10.1.0.0/24".parse().unwrap();
        assert_eq!(pools.draining, vec![(doomed, draining("doomed", true))]);
        assert_eq!(pools.draining(doomed).unwrap().to_string(), "ServiceCIDR doomed is being deleted");
        let only = pools_from(&[deleting("kubernetes", "10.0.0.0/24")], &flags());
        assert_eq!(only.cidrs, parse_cidrs("10.0.0.0/24").unwrap(), "never the flags while it exists");
    }

    #[test]
    fn a_cidr_drains_only_when_every_service_cidr_naming_it_does() {
        let pools = pools_from(
            &[deleting("a", "10.1.0.0/24"), mk("b", "10.1.0.0/24"), mk("kubernetes", "10.0.0.0/24")],
            &flags(),
        );
        assert_eq!((pools.cidrs.len(), pools.draining), (2, vec![]), "b still gives values");
        let mut not_ready = mk("c", "10.3.0.0/24");
        let condition = Condition {
            type_: "Ready".into(),
            status: "False".into(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            message: String::new(),
            observed_generation: None,
            reason: "Terminating".into(),
        };
        not_ready.status = Some(ServiceCIDRStatus { conditions: Some(vec![condition]) });
        let pools = pools_from(&[not_ready], &flags());
        assert_eq!(pools.draining, vec![("10.3.0.0/24".parse().unwrap(), draining("c", false))]);
    }
}
