//! `svcplane ipam status` and `svcplane ipam who <ip|port>`.
//!
//! Reads Services (all namespaces), the webhook's AllocationClaims and
//! networking.k8s.io/v1 ServiceCIDRs; writes nothing. `status` counts usage
//! with the webhook's own index (a value is used when a Service carries it or
//! a claim names it, in every pool that contains it), so it shows what the
//! webhook and its `pool_allocated` gauges see, and it counts the claims no
//! Service carries (a request in flight, or a leak the repair pass releases
//! after `--webhook-repair-grace`). Pools are the ServiceCIDR objects when the
//! cluster has any, else `--service-cluster-ip-range`; the NodePort pool is
//! always `--service-node-port-range` (no API object holds it). Both defaults
//! are the webhook's. ServiceIPPools are listed with what they select; the
//! ServiceCIDR rows count their whole range, pools included.

use std::collections::BTreeSet;

use anyhow::Context as _;
use k8s_openapi::api::{core::v1::Service, networking::v1::ServiceCIDR};
use kube::{Api, ResourceExt, api::ListParams};
use serde::Serialize;
use svcplane_webhook::admit::{service_values, value_fields};
use svcplane_webhook::blocks::BlockId;
use svcplane_webhook::index::Index;
use svcplane_webhook::pools::{PoolConfig, parse_cidrs, pools_from};
use svcplane_webhook::service_ip_pools::{ServiceIPPool, describe_allocation};
use svcplane_webhook::{AllocationClaim, DEFAULT_NODE_PORT_RANGE, DEFAULT_SERVICE_CIDRS, Value};

use super::{OutputFormat, emit, table::Table};

/// `svcplane ipam` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct IpamArgs {
    #[command(subcommand)]
    pub command: IpamCommand,
    /// Service CIDRs used when the cluster has no ServiceCIDR objects
    /// (kube-apiserver --service-cluster-ip-range, comma-separated).
    #[arg(long, global = true, default_value = DEFAULT_SERVICE_CIDRS)]
    pub service_cluster_ip_range: String,
    /// The NodePort range (kube-apiserver --service-node-port-range).
    #[arg(long, global = true, default_value = DEFAULT_NODE_PORT_RANGE)]
    pub service_node_port_range: String,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// `svcplane ipam` subcommands.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum IpamCommand {
    /// Pools with used, free and utilisation.
    Status,
    /// What holds an IP (clusterIPs) or a port (nodePorts, healthCheckNodePort):
    /// Services and AllocationClaims.
    Who {
        /// An IP address or a port number.
        value: String,
    },
}

/// One pool's usage.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// The ServiceCIDR's name, or `flag` for a pool from the command line.
    pub source: String,
    /// `ClusterIP` or `NodePort`.
    pub kind: &'static str,
    /// The CIDR or port range.
    pub range: String,
    /// Allocatable values (the allocator's size: network/broadcast excluded).
    pub size: usize,
    /// Values a Service carries or a claim names.
    pub used: usize,
    /// `size - used`.
    pub free: usize,
    /// `used / size` in percent.
    pub utilisation: f64,
    /// Claims of values in this pool that no Service carries.
    pub claims_without_service: usize,
    /// Free values that webhook replicas' blocks reserve ahead (counted in
    /// `free`: only the block's holder hands them out, until it returns the
    /// block or the block expires).
    pub reserved_ahead: usize,
    /// Which Services draw from it: a ServiceIPPool's `serviceAllocation`.
    pub selects: String,
}

/// One holder of a value.
#[derive(Serialize, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// The field holding the value, e.g. `spec.ports[0].nodePort`; for a
    /// claim, `spec.value`.
    pub field: String,
    /// `Service`, or `AllocationClaim/<name>`.
    pub holder: String,
}

/// Runs `svcplane ipam`.
pub async fn run(args: IpamArgs, client: kube::Client) -> anyhow::Result<()> {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing Services")?
        .items;
    let claims = list_claims(&client).await?;
    match &args.command {
        IpamCommand::Status => {
            let cidrs = list_or_none(Api::<ServiceCIDR>::all(client.clone()), "ServiceCIDRs").await?;
            let flags = flag_pools(&args)?;
            let service_ip_pools =
                list_or_none(Api::<ServiceIPPool>::all(client.clone()), "ServiceIPPools").await?;
            let report = build_status(&cidrs, &flags, &service_ip_pools, &claims, &services)?;
            emit(args.output, &report, |pools| {
                let headers = [
                    "SOURCE",
                    "KIND",
                    "RANGE",
                    "SIZE",
                    "USED",
                    "FREE",
                    "UTILISATION",
                    "CLAIMS WITHOUT SERVICE",
                    "RESERVED AHEAD",
                    "SELECTS",
                ];
                let mut table = Table::new(&headers);
                for p in pools {
                    table.row(vec![
                        p.source.clone(),
                        p.kind.to_owned(),
                        p.range.clone(),
                        p.size.to_string(),
                        p.used.to_string(),
                        p.free.to_string(),
                        format!("{:.2}%", p.utilisation),
                        p.claims_without_service.to_string(),
                        p.reserved_ahead.to_string(),
                        p.selects.clone(),
                    ]);
                }
                table.render()
            })
        }
        IpamCommand::Who { value } => {
            let holders = find_holders(value, &services, &claims)?;
            emit(args.output, &holders, |holders| {
                let mut table = Table::new(&["NAMESPACE", "SERVICE", "FIELD", "HOLDER"]);
                for h in holders {
                    table.row(vec![
                        h.namespace.clone(),
                        h.service.clone(),
                        h.field.clone(),
                        h.holder.clone(),
                    ]);
                }
                table.render()
            })?;
            anyhow::ensure!(!holders.is_empty(), "no Service holds {value} and no AllocationClaim names it");
            Ok(())
        }
    }
}

/// The pools of the flags (the webhook's defaults unless given).
fn flag_pools(args: &IpamArgs) -> anyhow::Result<PoolConfig> {
    let cidrs = parse_cidrs(&args.service_cluster_ip_range)
        .map_err(|e| anyhow::anyhow!("--service-cluster-ip-range: {e}"))?;
    let ports = args
        .service_node_port_range
        .parse()
        .with_context(|| format!("--service-node-port-range {:?}", args.service_node_port_range))?;
    Ok(PoolConfig::new(cidrs, ports))
}

/// The AllocationClaims; none where the webhook's CRD is not installed.
async fn list_claims(client: &kube::Client) -> anyhow::Result<Vec<AllocationClaim>> {
    list_or_none(Api::<AllocationClaim>::all(client.clone()), "AllocationClaims").await
}

/// Every object of `api`; none where the apiserver does not serve the kind.
async fn list_or_none<K>(api: Api<K>, what: &str) -> anyhow::Result<Vec<K>>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("listing {what}")),
    }
}

/// Usage per pool as the webhook's index counts it (pure): the ranges of
/// `cidrs` (else `flags`), the NodePort range and the ServiceIPPools, each
/// value a Service carries or a claim names.
pub fn build_status(
    cidrs: &[ServiceCIDR],
    flags: &PoolConfig,
    service_ip_pools: &[ServiceIPPool],
    claims: &[AllocationClaim],
    services: &[Service],
) -> anyhow::Result<Vec<PoolStatus>> {
    let config = pools_from(cidrs, flags);
    let mut index = Index::listed(config.clone(), claims, services).context("building the pools")?;
    index.set_service_ip_pools(service_ip_pools.to_vec());
    let carried: BTreeSet<Value> = services.iter().flat_map(service_values).collect();
    let claimed: BTreeSet<Value> = claims.iter().filter_map(|c| Value::from_spec(&c.spec)).collect();
    let unheld: Vec<&Value> = claimed.iter().filter(|v| !carried.contains(v)).collect();
    let reserved: BTreeSet<Value> = claims
        .iter()
        .filter_map(|c| BlockId::of_claim(&c.spec))
        .flat_map(BlockId::values)
        .filter(|v| !carried.contains(v) && !claimed.contains(v))
        .collect();
    let service_cidr_of = |range: &str| {
        let names =
            |c: &&ServiceCIDR| c.spec.iter().flat_map(|s| s.cidrs.iter().flatten()).any(|c| c == range);
        cidrs.iter().find(names).map_or_else(|| "flag".to_owned(), ResourceExt::name_any)
    };
    let report = index.usage().into_iter().map(|usage| {
        // `tenant-a (10.96.8.0/24)`: one CIDR of a ServiceIPPool.
        let tenant = usage.pool.strip_suffix(')').and_then(|label| label.split_once(" ("));
        let (source, range, selects) = match tenant {
            Some((name, cidr)) => {
                let pool = service_ip_pools.iter().find(|p| p.name_any() == name);
                let allocation = pool.and_then(|p| p.spec.service_allocation.as_ref());
                (format!("ServiceIPPool/{name}"), cidr.to_owned(), describe_allocation(allocation))
            }
            None if usage.pool.contains('/') => {
                (service_cidr_of(&usage.pool), usage.pool.clone(), "Services no pool selects".to_owned())
            }
            None => ("flag".to_owned(), usage.pool.clone(), "every Service with a nodePort".to_owned()),
        };
        let network = parse_cidrs(&range).ok().and_then(|cidrs| cidrs.into_iter().next());
        let in_pool = |value: &&Value| match (value, network) {
            (Value::Ip(ip), Some(cidr)) => cidr.contains(*ip),
            (Value::Port(port), None) => config.node_ports.contains(*port),
            _ => false,
        };
        let size = usage.used + usage.free;
        PoolStatus {
            source,
            kind: if network.is_some() { "ClusterIP" } else { "NodePort" },
            size,
            used: usage.used,
            free: usage.free,
            utilisation: if size == 0 { 0.0 } else { usage.used as f64 * 100.0 / size as f64 },
            claims_without_service: unheld.iter().copied().filter(in_pool).count(),
            reserved_ahead: reserved.iter().filter(in_pool).count(),
            range,
            selects,
        }
    });
    Ok(report.collect())
}

/// Every Service field carrying `value`, an IP or a port, then every claim
/// naming it (pure).
pub fn find_holders(
    value: &str,
    services: &[Service],
    claims: &[AllocationClaim],
) -> anyhow::Result<Vec<Holder>> {
    let wanted = if let Ok(ip) = value.parse() {
        Value::Ip(ip)
    } else if let Ok(port) = value.parse() {
        Value::Port(port)
    } else {
        anyhow::bail!("{value:?} is neither an IP address nor a port number");
    };
    let mut holders = Vec::new();
    for svc in services {
        for (_, field) in value_fields(svc).into_iter().filter(|(v, _)| *v == wanted) {
            let (namespace, service) = (svc.namespace().unwrap_or_default(), svc.name_any());
            holders.push(Holder { namespace, service, field, holder: "Service".into() });
        }
    }
    for claim in claims.iter().filter(|c| Value::from_spec(&c.spec) == Some(wanted)) {
        holders.push(Holder {
            namespace: claim.spec.namespace.clone(),
            service: claim.spec.service.clone(),
            field: "spec.value".into(),
            holder: format!("AllocationClaim/{}", claim.name_any()),
        });
    }
    // A replica's block reserves the value ahead: only that replica hands it out.
    for claim in claims {
        if BlockId::of_claim(&claim.spec).is_some_and(|block| block.contains(wanted)) {
            holders.push(Holder {
                namespace: String::new(),
                service: claim.spec.service.clone(),
                field: format!("spec.value ({})", claim.spec.value),
                holder: format!(
                    "AllocationClaim/{} (block reserved ahead by webhook replica)",
                    claim.name_any()
                ),
            });
        }
    }
    Ok(holders)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use svcplane_webhook::Owner;
    use svcplane_webhook::blocks::build_block;
    use svcplane_webhook::claim::build_claim;

    use super::*;

    #[test]
    fn status_counts_a_blocks_free_values_as_reserved_ahead_and_not_as_leaked_claims() {
        let web = Owner { namespace: "ns".into(), name: "web".into() };
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": { "namespace": "ns", "name": "web" },
            "spec": { "type": "NodePort", "clusterIP": "10.0.0.10", "clusterIPs": ["10.0.0.10"],
                      "ports": [{ "port": 80, "nodePort": 30020 }] }
        }))
        .unwrap();
        let claims = [
            build_block(BlockId { first: Value::Port(30016), size: 32 }, "replica-a", SystemTime::now()),
            build_claim(Value::Port(30020), &web),
            // Handed out from the block, its Service not seen yet.
            build_claim(Value::Port(30021), &Owner { name: "api".into(), ..web.clone() }),
        ];
        let flags = PoolConfig::new(parse_cidrs("10.0.0.0/24").unwrap(), "30000-30999".parse().unwrap());
        let status = build_status(&[], &flags, &[], &claims, &[service]).unwrap();
        let ports = status.iter().find(|p| p.kind == "NodePort").unwrap();
        assert_eq!((ports.used, ports.claims_without_service, ports.reserved_ahead), (2, 1, 30));
        let ips = status.iter().find(|p| p.kind == "ClusterIP").unwrap();
        assert_eq!((ips.used, ips.reserved_ahead), (1, 0));
    }

    #[test]
    fn who_names_the_claim_and_the_block_that_reserve_a_value() {
        let block = BlockId { first: Value::Port(30016), size: 32 };
        let claims = [
            build_block(block, "svcplane-7d9f-0a1b2c3d", SystemTime::now()),
            build_claim(Value::Port(30020), &Owner { namespace: "ns".into(), name: "web".into() }),
        ];
        let holders = find_holders("30020", &[], &claims).unwrap();
        let rows: Vec<(&str, &str)> =
            holders.iter().map(|h| (h.service.as_str(), h.holder.as_str())).collect();
        assert_eq!(
            rows,
            [
                ("web", "AllocationClaim/nodeport-30020"),
                (
                    "svcplane-7d9f-0a1b2c3d",
                    "AllocationClaim/block-nodeport-30016 (block reserved ahead by webhook replica)"
                )
            ]
        );
        assert!(find_holders("30048", &[], &claims).unwrap().is_empty());
    }
}
