//! Leader election on a coordination.k8s.io Lease (kube-lease-manager). Timings are
//! upstream's defaults for kube-controller-manager: a 15 s lease renewed 5 s before
//! it expires, so a new leader takes over within about 15 s of a node loss.

use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

/// Seconds a lease stays valid after its last renewal.
const LEASE_DURATION_SECONDS: u64 = 15;
/// Seconds before expiry at which the holder renews.
const LEASE_GRACE_SECONDS: u64 = 5;

/// Starts competing for the Lease; the receiver is true while this process leads.
pub async fn acquire(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<watch::Receiver<bool>> {
    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("svcplane-{}", std::process::id()));
    let manager = LeaseManagerBuilder::new(client, name)
        .with_namespace(namespace)
        .with_identity(identity.clone())
        .with_duration(LEASE_DURATION_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await?;
    let (rx, task) = manager.watch().await;
    tokio::spawn(async move {
        // The process exits if the lease task dies: a controller must never keep
        // writing without knowing whether it still leads.
        let outcome = task.await;
        tracing::error!(?outcome, "leader-election task ended; exiting");
        std::process::exit(1);
    });
    tracing::info!(%identity, lease = %format!("{namespace}/{name}"), "competing for leadership");
    Ok(rx)
}
