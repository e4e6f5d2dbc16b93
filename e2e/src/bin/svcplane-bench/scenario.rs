//! The benchmark's scenarios: their objects, the change whose cost is measured,
//! and the conditions that say the starting state and the change are written.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::DeleteParams;
use kube::{Api, Client};
use svcplane_e2e::{
    TestNamespace,
    fixtures::{ensure_node, mk_pod, mk_port, mk_service, set_pod_ready, set_pod_status},
};
use tokio::sync::Semaphore;

use crate::observer::{NAMESPACE_PREFIX, Observer, Summary};

/// Concurrent requests the benchmark itself sends while setting up or changing.
const CLIENT_CONCURRENCY: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// S Services × P Pods created not ready, then every Pod turns Ready.
    ManyPods { services: usize, pods: usize },
    /// A headless StatefulSet-style Service with publishNotReadyAddresses; N Pods appear not ready.
    StatefulSet { pods: usize },
    /// N ready Pods behind one Service replaced by N new ones, 10 % at a time.
    RollingUpdate { pods: usize },
    /// A Deployment's rolling update with its default strategy (maxSurge 25 %
    /// rounded up, maxUnavailable 25 % rounded down), played as its controller and
    /// the kubelets would: old Pods deleted gracefully (terminating) then gone,
    /// new Pods created not ready, then turning Ready.
    Deployment { replicas: usize },
    /// A Node carrying N ready Pods (over 10 Services) is deleted, then its Pods (as podgc does).
    NodeDeletion { pods: usize },
    /// Services spread over namespaces with a few Pods each, a tenth of the
    /// Services' Pods not ready; then all of those turn Ready at once.
    ManyServices { namespaces: usize, services: usize, pods: usize },
}

impl Scenario {
    pub fn name(self) -> String {
        match self {
            Scenario::ManyPods { services, pods } => format!("{services} Services x {pods} Pods turn Ready"),
            Scenario::StatefulSet { pods } => {
                format!("headless StatefulSet, {pods} Pods, publishNotReadyAddresses")
            }
            Scenario::RollingUpdate { pods } => format!("rolling update of {pods} Pods behind one Service"),
            Scenario::Deployment { replicas } => {
                format!("Deployment of {replicas} replicas, rolling update (25 % surge / 25 % unavailable)")
            }
            Scenario::NodeDeletion { pods } => format!("Node with {pods} Pods deleted"),
            Scenario::ManyServices { namespaces, services, pods } => format!(
                "{services} Services x {pods} Pods in {namespaces} namespaces, {} Pods turn Ready",
                self.changed_services() * pods
            ),
        }
    }

    /// Namespaces the scenario's objects are spread over.
    pub fn namespaces(self) -> usize {
        match self {
            Scenario::ManyServices { namespaces, .. } => namespaces,
            _ => 1,
        }
    }

    /// ManyServices: the Services whose Pods are not ready at the start (a tenth).
    fn changed_services(self) -> usize {
        match self {
            Scenario::ManyServices { services, .. } => services.div_ceil(10),
            _ => 0,
        }
    }

    /// Whether service `s` of ManyServices has its Pods changed: every tenth.
    fn changes(s: usize) -> bool {
        s.is_multiple_of(10)
    }

    /// Objects in their starting state.
    pub async fn setup(self, nss: &[TestNamespace]) {
        let ns = &nss[0];
        match self {
            Scenario::ManyPods { services, pods } => services_with_pods(nss, services, pods, |_| false).await,
            Scenario::StatefulSet { .. } => {
                let mut svc = mk_service("zk", &[("app", "zk")], vec![mk_port("peer", 2888, "2888")]);
                let spec = svc.spec.as_mut().expect("spec");
                spec.cluster_ip = Some("None".into());
                spec.publish_not_ready_addresses = Some(true);
                ns.create(&svc).await;
            }
            Scenario::RollingUpdate { pods: replicas } | Scenario::Deployment { replicas } => {
                ns.create(&mk_service("web", &[("app", "web")], vec![mk_port("http", 80, "8080")])).await;
                for_each_concurrent(replicas, |p| {
                    let ns = ns.clone();
                    async move {
                        ns.running_pod(
                            mk_pod(&format!("v1-{p}"), &[("app", "web")], "node-a", &[]),
                            &[&ip(p)],
                            true,
                        )
                        .await;
                    }
                })
                .await;
            }
            Scenario::NodeDeletion { pods } => {
                ensure_node(&ns.client, "node-x", "192.0.2.99", None).await;
                for s in 0..10 {
                    let app = format!("s{s}");
                    ns.create(&mk_service(&app, &[("app", &app)], vec![mk_port("http", 80, "8080")])).await;
                }
                for_each_concurrent(pods, |p| {
                    let ns = ns.clone();
                    async move {
                        let app = format!("s{}", p % 10);
                        ns.running_pod(
                            mk_pod(&format!("x-{p}"), &[("app", &app)], "node-x", &[]),
                            &[&ip(p)],
                            true,
                        )
                        .await;
                    }
                })
                .await;
            }
            Scenario::ManyServices { services, pods, .. } => {
                services_with_pods(nss, services, pods, |s| !Self::changes(s)).await
            }
        }
    }

    /// Whether the starting state has been written.
    pub fn started(self, s: &Summary) -> bool {
        match self {
            Scenario::ManyPods { services, pods } => {
                s.slice_endpoints == services * pods && s.endpoints_not_ready == services * pods
            }
            Scenario::StatefulSet { .. } => true,
            Scenario::RollingUpdate { pods }
            | Scenario::Deployment { replicas: pods }
            | Scenario::NodeDeletion { pods } => s.slice_ready == pods && s.endpoints_ready == pods,
            Scenario::ManyServices { services, pods, .. } => {
                let ready = (services - self.changed_services()) * pods;
                s.slice_endpoints == services * pods && s.slice_ready == ready && s.endpoints_ready == ready
            }
        }
    }

    /// The change whose convergence is measured; every Pod it makes ready (or
    /// creates ready) is timed by `observer`.
    pub async fn change(self, nss: &[TestNamespace], observer: &Arc<Observer>) {
        let ns = &nss[0];
        match self {
            Scenario::ManyPods { .. } | Scenario::ManyServices { .. } => {
                let (flipped, nss) = (Arc::new(self.flipped_pods()), Arc::new(nss.to_vec()));
                for_each_concurrent(flipped.len(), |i| {
                    let (n, name, _) = flipped[i].clone();
                    let (ns, observer) = (nss[n].clone(), observer.clone());
                    async move {
                        observer.await_ready(&ns.name, &name);
                        set_pod_ready(&ns.api(), &name, true).await;
                    }
                })
                .await;
            }
            Scenario::StatefulSet { pods } => {
                for_each_concurrent(pods, |p| {
                    let (ns, observer) = (ns.clone(), observer.clone());
                    async move {
                        let mut pod = mk_pod(&format!("zk-{p}"), &[("app", "zk")], "node-a", &[]);
                        let spec = pod.spec.as_mut().expect("spec");
                        spec.hostname = Some(format!("zk-{p}"));
                        spec.subdomain = Some("zk".into());
                        // publishNotReadyAddresses: ready in the slice from the start.
                        observer.await_ready(&ns.name, &format!("zk-{p}"));
                        ns.running_pod(pod, &[&ip(p)], false).await;
                    }
                })
                .await;
            }
            Scenario::RollingUpdate { pods } => {
                let batch = (pods / 10).max(1);
                for start in (0..pods).step_by(batch) {
                    let end = (start + batch).min(pods);
                    for_each_concurrent(end - start, |k| {
                        let (ns, observer) = (ns.clone(), observer.clone());
                        let p = start + k;
                        async move {
                            let name = format!("v2-{p}");
                            observer.await_ready(&ns.name, &name);
                            ns.running_pod(
                                mk_pod(&name, &[("app", "web")], "node-a", &[]),
                                &[&ip(pods + p)],
                                true,
                            )
                            .await;
                        }
                    })
                    .await;
                    for_each_concurrent(end - start, |k| {
                        let ns = ns.clone();
                        let p = start + k;
                        async move { ns.finish_pod_deletion(&format!("v1-{p}")).await }
                    })
                    .await;
                }
            }
            Scenario::Deployment { replicas } => deployment_rollout(ns, observer, replicas).await,
            Scenario::NodeDeletion { pods } => {
                Api::<Node>::all(ns.client.clone())
                    .delete("node-x", &DeleteParams::default())
                    .await
                    .expect("delete node");
                for_each_concurrent(pods, |p| {
                    let ns = ns.clone();
                    async move { ns.finish_pod_deletion(&format!("x-{p}")).await }
                })
                .await;
            }
        }
    }

    /// The Pods whose Ready the change turns on, as (index into the
    /// namespaces, name, IP); none for a scenario whose change is another kind.
    fn flipped_pods(self) -> Vec<(usize, String, String)> {
        match self {
            Scenario::ManyPods { services, pods } => {
                (0..services * pods).map(|i| (0, format!("s{}-{}", i / pods, i % pods), ip(i))).collect()
            }
            Scenario::ManyServices { namespaces, services, pods } => (0..services)
                .filter(|s| Self::changes(*s))
                .flat_map(|s| (0..pods).map(move |p| (s % namespaces, format!("s{s}-{p}"), ip(s * pods + p))))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether the change can be undone in place (it only turns Pods Ready), so
    /// that every run of the scenario can share one control plane and its
    /// objects: written once, not once per run.
    pub fn reusable(self) -> bool {
        matches!(self, Scenario::ManyPods { .. } | Scenario::ManyServices { .. })
    }

    /// Sets the Ready of every Pod the change flips: `false` undoes the change,
    /// `true` makes it without timing it. One status patch per Pod.
    pub async fn set_flipped(self, nss: &[TestNamespace], ready: bool) {
        let (flipped, nss) = (Arc::new(self.flipped_pods()), Arc::new(nss.to_vec()));
        for_each_concurrent(flipped.len(), |i| {
            let (n, name, ip) = flipped[i].clone();
            let ns = nss[n].clone();
            async move {
                set_pod_status(&ns.api(), &name, &[&ip], ready).await;
            }
        })
        .await;
    }

    /// Whether the change has been written completely.
    pub fn converged(self, s: &Summary) -> bool {
        match self {
            Scenario::ManyPods { services, pods } | Scenario::ManyServices { services, pods, .. } => {
                s.slice_ready == services * pods && s.endpoints_ready == services * pods
            }
            Scenario::StatefulSet { pods } => s.slice_ready == pods && s.endpoints_ready == pods,
            Scenario::RollingUpdate { pods } | Scenario::Deployment { replicas: pods } => {
                s.slice_ready == pods
                    && s.slice_endpoints == pods
                    && s.slice_targets.iter().all(|t| t.starts_with("v2-"))
                    && s.endpoints_ready == pods
                    && s.endpoints_not_ready == 0
            }
            Scenario::NodeDeletion { .. } => s.slice_endpoints == 0 && s.endpoints_ready == 0,
        }
    }
}

/// Services `s0`… spread over `nss`, each with `pods` Running Pods, Ready as
/// `ready(service)` says.
async fn services_with_pods(nss: &[TestNamespace], services: usize, pods: usize, ready: fn(usize) -> bool) {
    let nss = Arc::new(nss.to_vec());
    for_each_concurrent(services, |s| {
        let ns = nss[s % nss.len()].clone();
        async move {
            let app = format!("s{s}");
            ns.create(&mk_service(&app, &[("app", &app)], vec![mk_port("http", 80, "8080")])).await;
            for p in 0..pods {
                let pod = mk_pod(&format!("{app}-{p}"), &[("app", &app)], "node-a", &[]);
                ns.running_pod(pod, &[&ip(s * pods + p)], ready(s)).await;
            }
        }
    })
    .await;
}

/// Creates the scenario's namespaces.
pub async fn namespaces(client: &Client, n: usize) -> Vec<TestNamespace> {
    let mut nss = Vec::with_capacity(n);
    for _ in 0..n {
        nss.push(TestNamespace::new(client, NAMESPACE_PREFIX).await);
    }
    nss
}

/// The steps of a Deployment rolling update with the default strategy, as the
/// Deployment controller takes them when every new Pod turns Ready before its
/// next step: scale the old ReplicaSet down as far as availability allows,
/// scale the new one up as far as the surge allows, wait for the new Pods.
/// Returns, per step, (old Pods deleted, new Pods created).
pub fn rollout_steps(replicas: usize) -> Vec<(usize, usize)> {
    let surge = replicas.div_ceil(4);
    let min_available = replicas - replicas / 4;
    let (mut old, mut new) = (replicas, 0usize);
    let mut steps = Vec::new();
    while old > 0 || new < replicas {
        let down = old.min((old + new).saturating_sub(min_available));
        old -= down;
        let up = (replicas + surge).saturating_sub(old + new).min(replicas - new);
        new += up;
        assert!(down + up > 0, "rollout of {replicas} stalls at old {old}, new {new}");
        steps.push((down, up));
    }
    steps
}

async fn deployment_rollout(ns: &TestNamespace, observer: &Arc<Observer>, replicas: usize) {
    let (mut deleted, mut created) = (0usize, 0usize);
    for (down, up) in rollout_steps(replicas) {
        let old: Vec<usize> = (deleted..deleted + down).collect();
        let new: Vec<usize> = (created..created + up).collect();
        (deleted, created) = (deleted + down, created + up);
        // Old Pods start terminating (still serving until their containers stop);
        // new Pods appear not ready.
        let (old, new) = (Arc::new(old), Arc::new(new));
        for_each_concurrent(old.len(), |k| {
            let (ns, p) = (ns.clone(), old[k]);
            async move { ns.delete_pod(&format!("v1-{p}")).await }
        })
        .await;
        for_each_concurrent(new.len(), |k| {
            let (ns, p) = (ns.clone(), new[k]);
            async move {
                let pod = mk_pod(&format!("v2-{p}"), &[("app", "web")], "node-a", &[]);
                ns.running_pod(pod, &[&ip(replicas + p)], false).await;
            }
        })
        .await;
        // The new Pods pass their readiness probes; the old ones' containers stop.
        for_each_concurrent(new.len(), |k| {
            let (ns, observer, p) = (ns.clone(), observer.clone(), new[k]);
            async move {
                let name = format!("v2-{p}");
                observer.await_ready(&ns.name, &name);
                set_pod_ready(&ns.api::<Pod>(), &name, true).await;
            }
        })
        .await;
        for_each_concurrent(old.len(), |k| {
            let (ns, p) = (ns.clone(), old[k]);
            async move { ns.finish_pod_deletion(&format!("v1-{p}")).await }
        })
        .await;
    }
}

/// Runs `f(i)` for `0..n`, `CLIENT_CONCURRENCY` at a time.
pub async fn for_each_concurrent<F, Fut>(n: usize, f: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(CLIENT_CONCURRENCY));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = limit.clone().acquire_owned().await.expect("semaphore");
        let fut = f(i);
        tasks.push(tokio::spawn(async move {
            fut.await;
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

/// The `i`th Pod IP (distinct up to well over 50 000 Pods).
pub fn ip(i: usize) -> String {
    format!("10.{}.{}.{}", 64 + i / 62500, (i / 250) % 250, i % 250 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollout_of_250_replicas_keeps_within_surge_and_availability_and_ends_with_all_new_pods() {
        let steps = rollout_steps(250);
        let (mut old, mut new) = (250usize, 0usize);
        for (down, up) in &steps {
            old -= down;
            // Until this step's new Pods are ready, the old Pods and the new
            // ones of earlier steps serve.
            assert!(old + new >= 188, "available {} below 250 - 62", old + new);
            new += up;
            assert!(old + new <= 250 + 63, "{} Pods exceed 250 + 63", old + new);
        }
        assert_eq!((old, new), (0, 250));
        assert_eq!(steps, vec![(62, 125), (125, 125), (63, 0)]);
    }

    #[test]
    fn small_rollouts_end_too() {
        for replicas in 1..40 {
            let steps = rollout_steps(replicas);
            let created: usize = steps.iter().map(|s| s.1).sum();
            let deleted: usize = steps.iter().map(|s| s.0).sum();
            assert_eq!((created, deleted), (replicas, replicas), "{replicas} replicas");
        }
    }
}
