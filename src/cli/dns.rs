//! `svcplane dns svc/NAME`: the records CoreDNS's kubernetes plugin serves for a
//! Service (the Kubernetes DNS-based service discovery spec).
//!
//! Reads the Service and, for a headless one, its EndpointSlices (any
//! managed-by); writes nothing. The records:
//! - ClusterIP: A/AAAA `svc.ns.svc.<domain>` for each of `spec.clusterIPs`;
//!   SRV `_port._proto.svc.ns.svc.<domain>` per named port, target the Service.
//! - Headless: A/AAAA `svc.ns.svc.<domain>` per endpoint address; A/AAAA
//!   `<host>.svc.ns.svc.<domain>` per address, where `<host>` is the endpoint's
//!   hostname or else its dashed IP (`10-0-0-1`); SRV per named port and
//!   endpoint, target `<host>.svc.ns.svc.<domain>`, port the slice's port.
//!   An endpoint counts unless `ready` is false (nil means ready, as CoreDNS
//!   reads it); with `publishNotReadyAddresses` every endpoint counts.
//! - ExternalName: one CNAME to `spec.externalName`.
//!
//! SRV priority is 0 and CoreDNS spreads weight 100 over the targets of one
//! name: `floor(100 / n)` each.

use std::collections::BTreeSet;

use anyhow::Context as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Api, api::ListParams};
use serde::Serialize;
use svcplane_controller::{labels, pod::publishes_not_ready};

use super::{CommonArgs, emit, fetch_service, table::Table};

/// `svcplane dns` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct DnsArgs {
    /// The Service: svc/NAME.
    pub service: String,
    /// The cluster's DNS domain (kubelet --cluster-domain).
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// One DNS record.
#[derive(Serialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Record {
    /// Owner name, fully qualified with a trailing dot.
    pub name: String,
    /// `A`, `AAAA`, `SRV` or `CNAME`.
    #[serde(rename = "type")]
    pub type_: &'static str,
    /// RDATA as a zone file writes it.
    pub data: String,
}

/// Every record of one Service (pure).
pub fn build_records(svc: &Service, slices: &[EndpointSlice], domain: &str) -> Vec<Record> {
    let name = svc.metadata.name.as_deref().unwrap_or_default();
    let namespace = svc.metadata.namespace.as_deref().unwrap_or_default();
    let domain = domain.trim_end_matches('.');
    let service_fqdn = format!("{name}.{namespace}.svc.{domain}.");
    let spec = svc.spec.clone().unwrap_or_default();
    let mut records = Vec::new();
    if spec.type_.as_deref() == Some("ExternalName") {
        let target = spec.external_name.unwrap_or_default();
        records.push(Record {
            name: service_fqdn,
            type_: "CNAME",
            data: format!("{}.", target.trim_end_matches('.')),
        });
        return records;
    }
    let address_record = |owner: &str, ip: &str| Record {
        name: owner.to_owned(),
        type_: if ip.contains(':') { "AAAA" } else { "A" },
        data: ip.to_owned(),
    };
    let srv_name = |port_name: &str, protocol: Option<&str>| {
        format!("_{port_name}._{}.{service_fqdn}", protocol.unwrap_or("TCP").to_ascii_lowercase())
    };
    let headless = spec.cluster_ip.as_deref() == Some("None");
    if !headless {
        let ips = spec.cluster_ips.clone().or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]));
        for ip in ips.into_iter().flatten().filter(|ip| !ip.is_empty()) {
            records.push(address_record(&service_fqdn, &ip));
        }
        for port in spec.ports.iter().flatten() {
            let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) else { continue };
            records.push(Record {
                name: srv_name(port_name, port.protocol.as_deref()),
                type_: "SRV",
                data: format!("0 100 {} {service_fqdn}", port.port),
            });
        }
        return records;
    }

    let include_not_ready = publishes_not_ready(svc);
    // (srv owner, port, target) before weights are known.
    let mut srv_targets: BTreeSet<(String, i32, String)> = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for slice in slices {
        for endpoint in slice.endpoints.iter().flatten() {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            if !ready && !include_not_ready {
                continue;
            }
            for ip in &endpoint.addresses {
                let host = endpoint.hostname.clone().unwrap_or_else(|| ip.replace(['.', ':'], "-"));
                let host_fqdn = format!("{host}.{service_fqdn}");
                // A Pod is listed once per slice it is in; answer it once.
                if !seen.insert((host_fqdn.clone(), ip.clone())) {
                    continue;
                }
                records.push(address_record(&service_fqdn, ip));
                records.push(address_record(&host_fqdn, ip));
                for port in slice.ports.iter().flatten() {
                    let (Some(port_name), Some(number)) =
                        (port.name.as_deref().filter(|n| !n.is_empty()), port.port)
                    else {
                        continue;
                    };
                    srv_targets.insert((
                        srv_name(port_name, port.protocol.as_deref()),
                        number,
                        host_fqdn.clone(),
                    ));
                }
            }
        }
    }
    for (owner, port, target) in &srv_targets {
        let targets = srv_targets.iter().filter(|(o, _, _)| o == owner).count().max(1);
        records.push(Record {
            name: owner.clone(),
            type_: "SRV",
            data: format!("0 {} {port} {target}", 100 / targets),
        });
    }
    records
}

/// Runs `svcplane dns`.
pub async fn run(args: DnsArgs, client: kube::Client) -> anyhow::Result<()> {
    let (namespace, svc) = fetch_service(&client, &args.common, &args.service).await?;
    let name = svc.metadata.name.clone().unwrap_or_default();
    let headless = svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None");
    let slices = if headless {
        Api::<EndpointSlice>::namespaced(client, &namespace)
            .list(&ListParams::default().labels(&format!("{}={name}", labels::SERVICE_NAME)))
            .await
            .with_context(|| format!("listing EndpointSlices of {namespace}/{name}"))?
            .items
    } else {
        Vec::new()
    };
    let records = build_records(&svc, &slices, &args.cluster_domain);
    emit(args.common.output, &records, |records| {
        let mut table = Table::new(&["NAME", "TYPE", "DATA"]);
        for record in records {
            table.row(vec![record.name.clone(), record.type_.to_owned(), record.data.clone()]);
        }
        table.render()
    })
}
