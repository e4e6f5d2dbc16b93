//! Leader election on a coordination.k8s.io Lease (kube-lease-manager). Timings are
//! upstream's defaults for kube-controller-manager: a 15 s lease renewed 5 s before
//! it expires, so a new leader takes over within about 15 s of a node loss.
//!
//! On a graceful stop the leader releases the Lease ([`LeaderElection::release`]),
//! and a standby that sees the Lease free takes it at once: kube-lease-manager's
//! standby sleeps until the expiry it last read, so the standby also reads the
//! Lease every [`RELEASED_POLL`] (upstream's retry period) and starts over with a
//! fresh manager when its holder is gone.
//!
//! Calls the API: the Lease (get, create, patch through kube-lease-manager; get here).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};

/// Seconds a lease stays valid after its last renewal.
const LEASE_DURATION_SECONDS: u64 = 15;
/// Seconds before expiry at which the holder renews.
const LEASE_GRACE_SECONDS: u64 = 5;
/// How often a standby reads the Lease to notice that its holder released it
/// (client-go's RetryPeriod).
const RELEASED_POLL: Duration = Duration::from_secs(2);
/// First wait after a failed Lease call; it doubles up to [`MAX_ERROR_BACKOFF`].
const MIN_ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between retries of failing Lease calls.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(30);
/// Longest a release on shutdown may take before the process exits anyway (the
/// Lease then expires on its own).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// A running election: who leads, and the task that keeps the Lease.
pub struct LeaderElection {
    leader: watch::Receiver<bool>,
    /// Tells the task to release the Lease and end; `None` once sent.
    stop: Option<oneshot::Sender<()>>,
    /// The election task. `None` without leader election (this process always leads).
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// Keeps the receiver's channel open when there is no task.
    _always: Option<watch::Sender<bool>>,
}

impl LeaderElection {
    /// No election: this process always leads.
    pub fn always_leader() -> Self {
        let (tx, leader) = watch::channel(true);
        Self { leader, stop: None, task: None, _always: Some(tx) }
    }

    /// Starts competing for the Lease `namespace/name`.
    pub async fn start(client: kube::Client, namespace: &str, name: &str) -> anyhow::Result<Self> {
        let identity = process_identity();
        let lease = LeaseRef { client, namespace: namespace.to_owned(), name: name.to_owned(), identity };
        let manager = lease.manager().await?;
        let (tx, leader) = watch::channel(false);
        let (stop, stopped) = oneshot::channel();
        tracing::info!(identity = %lease.identity, lease = %format!("{namespace}/{name}"), "competing for leadership");
        let task = tokio::spawn(elect(lease, manager, tx, stopped));
        Ok(Self { leader, stop: Some(stop), task: Some(task), _always: None })
    }

    /// True while this process leads. The channel closes if the election task dies.
    pub fn leader(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    /// Resolves with the reason if the election task ends on its own, which it
    /// never should: a controller must never keep writing without knowing whether
    /// it still leads. Pending forever without leader election.
    pub async fn died(&mut self) -> anyhow::Error {
        let Some(task) = self.task.as_mut() else { return std::future::pending().await };
        let outcome = task.await;
        self.task = None;
        match outcome {
            Ok(Ok(())) => anyhow::anyhow!("the leader-election task ended"),
            Ok(Err(error)) => error.context("the leader-election task failed"),
            Err(error) => anyhow::Error::new(error).context("the leader-election task panicked"),
        }
    }

    /// Releases the Lease if this process holds it, so a standby takes over now
    /// rather than when the Lease expires, and ends the election. Call it after
    /// the controllers stopped writing.
    pub async fn release(mut self) -> anyhow::Result<()> {
        let (Some(stop), Some(task)) = (self.stop.take(), self.task.take()) else { return Ok(()) };
        let _ = stop.send(());
        match tokio::time::timeout(RELEASE_TIMEOUT, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(error)) => Err(anyhow::Error::new(error).context("the leader-election task panicked")),
            Err(_) => anyhow::bail!("releasing the Lease took over {RELEASE_TIMEOUT:?}; it will expire"),
        }
    }
}

/// This process's name in the Lease: the Pod's name (else the host's), then `_` and
/// a suffix new for every process, as client-go's `hostname_uuid`. A container the
/// kubelet restarts in the same Pod is a new contender: it must not take the old
/// process's unexpired Lease for its own, and two processes on one host never share
/// an identity (kube-lease-manager renews whatever Lease names its identity).
fn process_identity() -> String {
    let base = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "svcplane".to_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{base}_{:x}{:x}", std::process::id(), nanos & 0xffff_ffff)
}

/// What identifies this process's claim on the Lease.
struct LeaseRef {
    client: kube::Client,
    namespace: String,
    name: String,
    identity: String,
}

impl LeaseRef {
    /// A fresh manager: it reads the Lease before deciding anything.
    async fn manager(&self) -> anyhow::Result<LeaseManager> {
        Ok(LeaseManagerBuilder::new(self.client.clone(), &self.name)
            .with_namespace(&self.namespace)
            .with_identity(&self.identity)
            .with_duration(LEASE_DURATION_SECONDS)
            .with_grace(LEASE_GRACE_SECONDS)
            .build()
            .await?)
    }
}

/// Drives the manager (as kube-lease-manager's own `watch` does) until `stop`;
/// then releases the Lease.
async fn elect(
    lease: LeaseRef,
    mut manager: LeaseManager,
    leader: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let api: Api<Lease> = Api::namespaced(lease.client.clone(), &lease.namespace);
    let mut backoff = MIN_ERROR_BACKOFF;
    loop {
        let leading = *leader.borrow();
        tokio::select! {
            biased;
            _ = &mut stop => {
                if leading {
                    manager.release().await?;
                    tracing::info!(identity = %lease.identity, "released the leader Lease");
                }
                return Ok(());
            }
            changed = manager.changed() => match changed {
                Ok(is_leader) => {
                    backoff = MIN_ERROR_BACKOFF;
                    tracing::info!(identity = %lease.identity, leading = is_leader, "leadership changed");
                    leader.send_replace(is_leader);
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "leader election failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut stop => {
                            if leading {
                                manager.release().await?;
                            }
                            return Ok(());
                        }
                    }
                    backoff = (backoff * 2).min(MAX_ERROR_BACKOFF);
                }
            },
            // Not leading: the manager would sleep until the expiry it last read.
            _ = released(&api, &lease.name), if !leading => {
                tracing::info!(identity = %lease.identity, "the Lease was released; competing now");
                // Dropping a non-holder's manager writes nothing. If the new one
                // cannot be built, the old one still takes the Lease at expiry.
                match lease.manager().await {
                    Ok(fresh) => manager = fresh,
                    Err(error) => tracing::warn!(%error, "could not re-read the Lease"),
                }
            }
        }
    }
}

/// Resolves once the Lease is seen free. Only polled while this process does not
/// lead, so a free Lease means its holder released it (or nobody took it yet)
/// and the manager is asleep until an expiry that no longer matters.
async fn released(api: &Api<Lease>, name: &str) {
    loop {
        tokio::time::sleep(RELEASED_POLL).await;
        if let Ok(lease) = api.get_opt(name).await
            && holder(lease.as_ref()).is_none()
        {
            return;
        }
    }
}

/// The Lease's current holder; `None` when it is free (released or never taken).
fn holder(lease: Option<&Lease>) -> Option<&str> {
    lease?.spec.as_ref()?.holder_identity.as_deref().filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    use super::*;

    fn mk_lease(holder: Option<&str>) -> Lease {
        Lease {
            spec: Some(LeaseSpec { holder_identity: holder.map(str::to_owned), ..LeaseSpec::default() }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_lease_without_a_holder_is_free() {
        assert_eq!(holder(Some(&mk_lease(Some("svcplane-a")))), Some("svcplane-a"));
        assert_eq!(holder(Some(&mk_lease(None))), None);
        assert_eq!(holder(Some(&mk_lease(Some("")))), None);
        assert_eq!(holder(Some(&Lease::default())), None);
        assert_eq!(holder(None), None);
    }

    #[tokio::test]
    async fn without_election_the_process_leads_and_nothing_dies() {
        let mut election = LeaderElection::always_leader();
        assert!(*election.leader().borrow());
        let died = tokio::time::timeout(Duration::from_millis(10), election.died()).await;
        assert!(died.is_err(), "no task, nothing to die");
        election.release().await.unwrap();
    }
}
