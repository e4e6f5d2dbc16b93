//! svcplane's admission webhook: every Service's ClusterIPs and NodePorts
//! come from svcplane-ipam, recorded as one `AllocationClaim` per value.
//!
//! - [`admit`]: pure plan of what a Service needs, and the JSON patch.
//! - [`index`]: the in-memory bitmap index of one replica (no I/O).
//! - [`claim`]: the claim object and value naming (no I/O).
//! - [`pools`]: the pools from flags and ServiceCIDRs (no I/O).
//! - [`service_ip_pools`]: ServiceIPPools, which Services they select (no I/O).
//! - [`allocator`]: a request's claims, create/delete (409 is the lock).
//! - [`watches`]: keep the index in step with the cluster; early releases.
//! - [`pool_status`]: the leader writes each ServiceIPPool's `Ready` condition.
//! - [`pool_watches`]: the ServiceIPPools and Namespace labels in the index.
//! - [`handler`], [`server`], [`tls`]: HTTPS over rustls, AdmissionReview v1.
//! - [`repair`]: the leader's reconcile of claims against Services.
//! - [`retention`]: a deleted Service's values kept for its re-creation.
//! - [`usage_alerts`]: which pools reached a usage threshold (no I/O).
//! - [`metrics`]: Prometheus metrics.
//!
//! See README.md for the design and its failure analysis.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub mod admit;
pub mod allocator;
pub mod block_keeper;
pub mod blocks;
pub mod claim;
#[cfg(test)]
mod fuzz;
pub mod handler;
pub mod index;
pub mod metrics;
pub mod pool_status;
pub mod pool_watches;
pub mod pools;
pub mod repair;
pub mod retention;
pub mod server;
pub mod service_ip_pools;
pub mod tls;
pub mod usage_alerts;
pub mod watches;

pub use claim::{AllocationClaim, AllocationClaimSpec, Owner, Value};
pub use pools::{Draining, PoolConfig};
pub use server::WebhookServer;

use svcplane_ipam::{IpamError, PortRange};

/// Flags of the webhook role (flattened into `svcplane run`).
#[derive(clap::Args, Clone, Debug)]
pub struct WebhookArgs {
    /// Address the HTTPS server listens on.
    #[arg(long = "webhook-bind-address", default_value = "0.0.0.0:9443")]
    pub bind_address: SocketAddr,
    /// Serving certificate (PEM chain); re-read on an interval.
    #[arg(long = "webhook-tls-cert-file")]
    pub tls_cert_file: Option<PathBuf>,
    /// Serving key (PEM).
    #[arg(long = "webhook-tls-key-file")]
    pub tls_key_file: Option<PathBuf>,
    /// How often the certificate files are checked for changes.
    #[arg(long = "webhook-cert-reload-interval", default_value = "60s", value_parser = humantime::parse_duration)]
    pub cert_reload_interval: Duration,
    /// Sign a serving certificate at start-up with the CA every replica shares
    /// through the Secret `--webhook-ca-secret` (the first replica creates it),
    /// and set the named webhook configurations' caBundle to exactly that CA.
    #[arg(
        long = "webhook-self-signed",
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub self_signed: bool,
    /// DNS names / IPs of the self-signed serving certificate.
    #[arg(
        long = "webhook-self-signed-names",
        value_delimiter = ',',
        default_value = "svcplane-webhook.svcplane-system.svc"
    )]
    pub self_signed_names: Vec<String>,
    /// Secret (type kubernetes.io/tls) holding the CA shared by every replica in
    /// self-signed mode.
    #[arg(long = "webhook-ca-secret", default_value = DEFAULT_CA_SECRET)]
    pub ca_secret: String,
    /// Namespace of `--webhook-ca-secret`; default: this Pod's namespace, else
    /// "svcplane-system".
    #[arg(long = "webhook-ca-secret-namespace", env = "POD_NAMESPACE")]
    pub ca_secret_namespace: Option<String>,
    /// MutatingWebhookConfiguration to patch the caBundle into.
    #[arg(long = "webhook-mutating-configuration")]
    pub mutating_configuration: Option<String>,
    /// ValidatingWebhookConfiguration to patch the caBundle into.
    #[arg(long = "webhook-validating-configuration")]
    pub validating_configuration: Option<String>,
    /// Service CIDRs used when the cluster has no ServiceCIDR objects
    /// (comma-separated, default family first).
    #[arg(long = "webhook-service-cidrs", default_value = DEFAULT_SERVICE_CIDRS)]
    pub service_cidrs: String,
    /// NodePort range (the apiserver's --service-node-port-range).
    #[arg(long = "webhook-node-port-range", default_value = DEFAULT_NODE_PORT_RANGE)]
    pub node_port_range: String,
    /// Largest AdmissionReview body accepted.
    #[arg(long = "webhook-max-body-bytes", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Delete a Service's claims as soon as the watch sees it deleted, and the
    /// claims of values an update dropped (a type change) as soon as it sees
    /// the update.
    #[arg(
        long = "webhook-release-on-delete",
        num_args = 0..=1,
        default_value_t = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub release_on_delete: bool,
    /// How long a deleted Service's ClusterIPs and NodePorts stay claimed for
    /// a Service of the same namespace/name (given back when it is
    /// re-created; handed to others only when a pool is otherwise full);
    /// 0s releases them at once.
    #[arg(long = "webhook-retention", default_value = "10m", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// Pool utilisation, in percent, at which the repair leader records a
    /// Warning Event (`PoolUsageHigh`), once per threshold reached; a Normal
    /// `PoolUsageNormal` when a pool is back under the lowest.
    #[arg(long = "webhook-pool-usage-warnings", value_delimiter = ',', default_value = "80,95")]
    pub pool_usage_warnings: Vec<u8>,
    /// Time between repair passes.
    #[arg(long = "webhook-repair-interval", default_value = "30s", value_parser = humantime::parse_duration)]
    pub repair_interval: Duration,
    /// Age after which a claim no Service holds is released (longer than the
    /// apiserver's 60 s request timeout).
    #[arg(long = "webhook-repair-grace", default_value = "90s", value_parser = humantime::parse_duration)]
    pub repair_grace: Duration,
    /// Age after which a claim a replica created for a request, that no
    /// Service of that name has been seen holding, is released by that replica
    /// (the apiserver rejected the object after admission). Longer than the
    /// apiserver's admission-to-persist time; see README.md.
    #[arg(long = "webhook-unconfirmed-grace", default_value = "30s", value_parser = humantime::parse_duration)]
    pub unconfirmed_grace: Duration,
    /// Values per block a replica reserves ahead (a power of two; 0: none).
    /// A dynamic ClusterIP or NodePort then comes from the replica's block in
    /// memory and its claim is written after the answer, instead of one claim
    /// create per value inside the admission call. See README.md, "Blocks".
    #[arg(long = "webhook-block-size", default_value_t = 0, value_parser = parse_block_size)]
    pub block_size: u16,
}

/// A block size: 0 (off) or a power of two from 4 to 256.
fn parse_block_size(text: &str) -> Result<u16, String> {
    let size: u16 = text.parse().map_err(|e| format!("{e}"))?;
    if size == 0 || (size.is_power_of_two() && (4..=256).contains(&size)) {
        Ok(size)
    } else {
        Err(format!("{size} is not 0 or a power of two from 4 to 256"))
    }
}

impl Default for WebhookArgs {
    /// The flags' own defaults (as parsed from no flags), without POD_NAMESPACE.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            args: WebhookArgs,
        }
        let mut args = <Flags as clap::Parser>::parse_from(["svcplane"]).args;
        args.ca_secret_namespace = None;
        args
    }
}

/// Service CIDRs when the cluster has no ServiceCIDR object and no flag says
/// otherwise (the webhook's and `svcplane ipam`'s).
pub const DEFAULT_SERVICE_CIDRS: &str = "10.96.0.0/16";

/// The NodePort range unless a flag says otherwise (kube-apiserver's default).
pub const DEFAULT_NODE_PORT_RANGE: &str = "30000-32767";

/// Name of the shared CA Secret unless `--webhook-ca-secret` says otherwise.
pub const DEFAULT_CA_SECRET: &str = "svcplane-webhook-ca";

/// Namespace of the CA Secret when neither the flag nor POD_NAMESPACE gives one
/// (the manifests' namespace).
pub const DEFAULT_CA_SECRET_NAMESPACE: &str = "svcplane-system";

impl WebhookArgs {
    /// Namespace of the shared CA Secret.
    pub fn ca_secret_namespace(&self) -> &str {
        self.ca_secret_namespace.as_deref().unwrap_or(DEFAULT_CA_SECRET_NAMESPACE)
    }

    /// The fallback pools from the flags.
    pub fn pool_config(&self) -> Result<PoolConfig, Error> {
        let cidrs = pools::parse_cidrs(&self.service_cidrs).map_err(Error::Flag)?;
        let node_ports: PortRange = self.node_port_range.parse().map_err(Error::Pools)?;
        Ok(PoolConfig::new(cidrs, node_ports))
    }

    /// The pool usage thresholds of `--webhook-pool-usage-warnings`.
    pub fn usage_alerts(&self) -> Result<usage_alerts::UsageAlerts, Error> {
        let thresholds =
            usage_alerts::Thresholds::new(self.pool_usage_warnings.clone()).map_err(Error::Flag)?;
        Ok(usage_alerts::UsageAlerts::new(thresholds))
    }
}

/// Why the webhook stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag value is unusable.
    #[error("invalid flag: {0}")]
    Flag(String),
    /// The pools cannot be built.
    #[error("invalid pool: {0}")]
    Pools(#[source] IpamError),
    /// Certificate or key problem.
    #[error("tls: {0}")]
    Tls(String),
    /// The shared CA Secret exists but cannot be used. It is never overwritten:
    /// replicas may already serve certificates it signed.
    #[error(
        "the webhook CA Secret {secret} is unusable: {problem}; delete it and restart every \
         replica so that one creates a new CA"
    )]
    CaSecret {
        /// `namespace/name` of the Secret.
        secret: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The listen address cannot be bound.
    #[error("failed to bind {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// An API call failed.
    #[error("failed to {what}")]
    Kube {
        /// What was attempted.
        what: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The index was not built in time.
    #[error("the allocation index was not built in time")]
    NotReady,
}

impl Error {
    /// A fixed name for metric labels and Event reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Flag(_) => "InvalidFlag",
            Error::Pools(_) => "InvalidPool",
            Error::Tls(_) => "TlsError",
            Error::CaSecret { .. } => "InvalidCaSecret",
            Error::Bind(..) => "BindError",
            Error::Kube { .. } => "ApiError",
            Error::NotReady => "NotReady",
        }
    }
}

/// Runs the repair loop until `shutdown` resolves; run it on the leader only.
/// It counts findings in `metrics` (share the webhook server's, registered in
/// the process's registry, so one `/metrics` shows both).
pub async fn run_repair_with_metrics(
    args: WebhookArgs,
    client: kube::Client,
    metrics: Arc<metrics::Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (pools, alerts) = (args.pool_config()?, args.usage_alerts()?);
    let timing = (args.repair_interval, args.repair_grace);
    repair::repair_loop(client, pools, alerts, timing, metrics, shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_secret_lives_in_the_manifests_namespace_unless_told_otherwise() {
        let mut args = WebhookArgs::default();
        assert_eq!(
            (args.ca_secret_namespace(), args.ca_secret.as_str()),
            ("svcplane-system", "svcplane-webhook-ca")
        );
        args.ca_secret_namespace = Some("elsewhere".into());
        assert_eq!(args.ca_secret_namespace(), "elsewhere");
    }

    #[test]
    fn default_flags_give_usable_pools() {
        let pools = WebhookArgs::default().pool_config().unwrap();
        assert_eq!(pools.node_ports, PortRange::DEFAULT_NODE_PORTS);
    }
}
