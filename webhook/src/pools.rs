//! Where values come from: the Service CIDRs and the NodePort range.
//!
//! Input: the `--webhook-service-cidrs` / `--webhook-node-port-range` flags
//! and the cluster's ServiceCIDR objects. Output: a [`PoolConfig`]. No I/O:
//! the ServiceCIDR watch and the repair pass feed [`pools_from`].

use std::borrow::Borrow;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::ResourceExt;
use svcplane_ipam::{IpFamily, PortRange};

/// The pools values come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Service CIDRs; the family of the first is the cluster's default family.
    pub cidrs: Vec<IpNetwork>,
    /// The NodePort range (also used for health-check NodePorts).
    pub node_ports: PortRange,
}

impl PoolConfig {
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
}

/// The pools from ServiceCIDR objects that are not being deleted (the
/// `kubernetes` one first, then by name), or `fallback` when they give no
/// CIDR. The NodePort range is always `fallback`'s.
pub fn pools_from<C: Borrow<ServiceCIDR>>(cidrs: &[C], fallback: &PoolConfig) -> PoolConfig {
    let mut ordered: Vec<&ServiceCIDR> =
        cidrs.iter().map(Borrow::borrow).filter(|c| c.metadata.deletion_timestamp.is_none()).collect();
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
    use k8s_openapi::api::networking::v1::ServiceCIDRSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    #[test]
    fn service_cidrs_give_the_pools_kubernetes_first_else_the_flags_do() {
        let mk = |name: &str, cidr: &str| ServiceCIDR {
            metadata: kube::core::ObjectMeta { name: Some(name.into()), ..Default::default() },
            spec: Some(ServiceCIDRSpec { cidrs: Some(cidr.split(',').map(str::to_owned).collect()) }),
            ..Default::default()
        };
        let flags = PoolConfig {
            cidrs: parse_cidrs(" 10.96.0.0/16, ").unwrap(),
            node_ports: "30000-30099".parse().unwrap(),
        };
        let pools = pools_from(&[mk("b", "10.2.0.0/24"), mk("kubernetes", "fd00::/108,10.0.0.0/24")], &flags);
        assert_eq!(pools.cidrs, parse_cidrs("fd00::/108,10.0.0.0/24,10.2.0.0/24").unwrap());
        assert_eq!(
            (pools.families(), pools.node_ports),
            (vec![IpFamily::IPv6, IpFamily::IPv4], flags.node_ports)
        );
        let mut deleted = mk("kubernetes", "10.0.0.0/24");
        deleted.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(pools_from(&[deleted, mk("bad", "not-a-cidr")], &flags), flags, "deleted or unparsable");
        assert!(parse_cidrs("10.0.0.0/8,nope").unwrap_err().starts_with("nope: "));
    }
}
