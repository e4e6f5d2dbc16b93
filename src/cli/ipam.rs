//! `svcplane ipam status` and `svcplane ipam who <ip|port>`.
//!
//! Reads Services (all namespaces) and networking.k8s.io/v1 ServiceCIDRs;
//! writes nothing. `status` replays every Service's clusterIPs and nodePorts
//! into svcplane-ipam's allocators (the ones the webhook allocates from) to
//! report used, free and utilisation per pool. Pools are the ServiceCIDR
//! objects when the cluster has any, else `--service-cluster-ip-range`; the
//! NodePort pool is always `--service-node-port-range` (no API object holds it).

use std::net::IpAddr;

use anyhow::Context as _;
use k8s_openapi::api::{core::v1::Service, networking::v1::ServiceCIDR};
use kube::{Api, api::ListParams};
use serde::Serialize;
use svcplane_ipam::{ClusterIpAllocator, NodePortAllocator, PortRange};

use super::{OutputFormat, emit, table::Table};

/// `svcplane ipam` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct IpamArgs {
    #[command(subcommand)]
    pub command: IpamCommand,
    /// Service CIDRs used when the cluster has no ServiceCIDR objects
    /// (kube-apiserver --service-cluster-ip-range, comma-separated).
    #[arg(long, global = true, default_value = "10.96.0.0/12")]
    pub service_cluster_ip_range: String,
    /// The NodePort range (kube-apiserver --service-node-port-range).
    #[arg(long, global = true, default_value = "30000-32767")]
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
    /// Which Service holds an IP (clusterIPs) or a port (nodePorts, healthCheckNodePort).
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
    /// Values held by Services.
    pub used: usize,
    /// `size - used`.
    pub free: usize,
    /// `used / size` in percent.
    pub utilisation: f64,
}

/// One holder of a value.
#[derive(Serialize, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// The field holding the value, e.g. `spec.ports[0].nodePort`.
    pub field: String,
}

/// Runs `svcplane ipam`.
pub async fn run(args: IpamArgs, client: kube::Client) -> anyhow::Result<()> {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing Services")?
        .items;
    match &args.command {
        IpamCommand::Status => {
            let cidrs = pools(&client, &args.service_cluster_ip_range).await?;
            let ports: PortRange = args
                .service_node_port_range
                .parse()
                .with_context(|| format!("--service-node-port-range {:?}", args.service_node_port_range))?;
            let report = build_status(&cidrs, ports, &services)?;
            emit(args.output, &report, |pools| {
                let mut table =
                    Table::new(&["SOURCE", "KIND", "RANGE", "SIZE", "USED", "FREE", "UTILISATION"]);
                for p in pools {
                    table.row(vec![
                        p.source.clone(),
                        p.kind.to_owned(),
                        p.range.clone(),
                        p.size.to_string(),
                        p.used.to_string(),
                        p.free.to_string(),
                        format!("{:.2}%", p.utilisation),
                    ]);
                }
                table.render()
            })
        }
        IpamCommand::Who { value } => {
            let holders = find_holders(value, &services)?;
            emit(args.output, &holders, |holders| {
                let mut table = Table::new(&["NAMESPACE", "SERVICE", "FIELD"]);
                for h in holders {
                    table.row(vec![h.namespace.clone(), h.service.clone(), h.field.clone()]);
                }
                table.render()
            })?;
            anyhow::ensure!(!holders.is_empty(), "no Service holds {value}");
            Ok(())
        }
    }
}

/// `(source, cidr)` of each pool: ServiceCIDR objects, else the flag.
async fn pools(client: &kube::Client, flag: &str) -> anyhow::Result<Vec<(String, String)>> {
    let objects = match Api::<ServiceCIDR>::all(client.clone()).list(&ListParams::default()).await {
        Ok(list) => list.items,
        // An apiserver without the networking.k8s.io/v1 ServiceCIDR API.
        Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
        Err(e) => return Err(e).context("listing ServiceCIDRs"),
    };
    let mut pools: Vec<(String, String)> = objects
        .iter()
        .flat_map(|o| {
            let name = o.metadata.name.clone().unwrap_or_default();
            o.spec.iter().flat_map(|s| s.cidrs.iter().flatten()).map(move |c| (name.clone(), c.clone()))
        })
        .collect();
    if pools.is_empty() {
        pools = flag
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| ("flag".into(), c.into()))
            .collect();
    }
    Ok(pools)
}

/// Replays the Services into one allocator per pool (pure).
pub fn build_status(
    cidrs: &[(String, String)],
    node_ports: PortRange,
    services: &[Service],
) -> anyhow::Result<Vec<PoolStatus>> {
    let percent = |used: usize, size: usize| if size == 0 { 0.0 } else { used as f64 * 100.0 / size as f64 };
    let mut report = Vec::new();
    for (source, cidr) in cidrs {
        let network = cidr.parse().with_context(|| format!("pool {source}: invalid CIDR {cidr:?}"))?;
        let mut allocator =
            ClusterIpAllocator::new(network).with_context(|| format!("pool {source}: CIDR {cidr}"))?;
        for ip in services.iter().flat_map(cluster_ips) {
            // Outside this pool or held twice: counted once, where it fits.
            let _ = allocator.allocate(ip);
        }
        let (size, used) = (allocator.size(), allocator.used());
        report.push(PoolStatus {
            source: source.clone(),
            kind: "ClusterIP",
            range: cidr.clone(),
            size,
            used,
            free: allocator.free(),
            utilisation: percent(used, size),
        });
    }
    let mut ports = NodePortAllocator::new(node_ports);
    for port in services.iter().flat_map(node_ports_of) {
        let _ = ports.allocate(port.1);
    }
    report.push(PoolStatus {
        source: "flag".into(),
        kind: "NodePort",
        range: node_ports.to_string(),
        size: ports.size(),
        used: ports.used(),
        free: ports.free(),
        utilisation: percent(ports.used(), ports.size()),
    });
    Ok(report)
}

/// A Service's ClusterIPs (none for headless and ExternalName).
fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let spec = svc.spec.as_ref();
    let ips = spec
        .and_then(|s| s.cluster_ips.clone())
        .or_else(|| spec.and_then(|s| s.cluster_ip.clone()).map(|ip| vec![ip]));
    ips.into_iter().flatten().filter_map(|ip| ip.parse().ok()).collect()
}

/// `(field, port)` of each nodePort and the healthCheckNodePort.
fn node_ports_of(svc: &Service) -> Vec<(String, u16)> {
    let Some(spec) = svc.spec.as_ref() else { return Vec::new() };
    let mut out: Vec<(String, u16)> = spec
        .ports
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, p)| Some((format!("spec.ports[{i}].nodePort"), u16::try_from(p.node_port?).ok()?)))
        .collect();
    if let Some(port) = spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()) {
        out.push(("spec.healthCheckNodePort".into(), port));
    }
    out
}

/// Every Service field holding `value`, an IP or a port (pure).
pub fn find_holders(value: &str, services: &[Service]) -> anyhow::Result<Vec<Holder>> {
    let holder = |svc: &Service, field: String| Holder {
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        service: svc.metadata.name.clone().unwrap_or_default(),
        field,
    };
    let mut holders = Vec::new();
    if let Ok(ip) = value.parse::<IpAddr>() {
        for svc in services {
            for (i, held) in cluster_ips(svc).into_iter().enumerate() {
                if held == ip {
                    holders.push(holder(svc, format!("spec.clusterIPs[{i}]")));
                }
            }
        }
    } else if let Ok(port) = value.parse::<u16>() {
        for svc in services {
            for (field, held) in node_ports_of(svc) {
                if held == port {
                    holders.push(holder(svc, field));
                }
            }
        }
    } else {
        anyhow::bail!("{value:?} is neither an IP address nor a port number");
    }
    Ok(holders)
}
