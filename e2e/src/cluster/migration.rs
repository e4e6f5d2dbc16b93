//! Moving endpoint ownership between kube-controller-manager and svcplane on a running
//! cluster (issue 16 item 4), as an operator does: restart kube-controller-manager
//! with or without its endpoint controllers, roll svcplane's Deployment to another
//! `--migration`, read svcplane's shadow report and metrics.
//!
//! Works on a cluster this binary started and on one `make cluster` left running (no
//! [`crate::ControlPlane`] handle then): kube-controller-manager is found by its
//! command line, which names the cluster's folder, and started again with the same
//! arguments, so [`super::host::teardown`] still finds and reaps it. Calls the API,
//! signals processes and runs the svcplane CLI.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet},
    coordination::v1::Lease,
    core::v1::Pod,
};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use super::{
    Cluster, ClusterError, REPLACED_CONTROLLERS, SVCPLANE_NAMESPACE, setup,
    workload::{endpoint_conditions, pod_ready},
};
use crate::wait::poll_until;

/// The program kube-controller-manager runs as.
const KCM: &str = "kube-controller-manager";
/// svcplane's Deployment (and Lease) in [`SVCPLANE_NAMESPACE`].
pub const SVCPLANE_DEPLOYMENT: &str = "svcplane";
/// The label selecting svcplane's Pods.
pub const SVCPLANE_POD_SELECTOR: &str = "app.kubernetes.io/name=svcplane";
/// svcplane's metrics port (manifests/base/deployment.yaml).
pub const SVCPLANE_METRICS_PORT: u16 = 8080;
/// The flag of `svcplane run` that selects the migration mode.
const MIGRATION_FLAG: &str = "--migration=";

/// kube-controller-manager's `--controllers` with its endpoint controllers: it owns
/// endpoints (before a take-over, after a hand-back).
pub const KCM_WITH_ENDPOINT_CONTROLLERS: &str = "*";

/// kube-controller-manager's `--controllers` without its endpoint controllers, as
/// [`Cluster::start`] runs it: svcplane owns endpoints.
pub fn kcm_without_endpoint_controllers() -> String {
    std::iter::once("*".to_string())
        .chain(REPLACED_CONTROLLERS.iter().map(|c| format!("-{c}")))
        .collect::<Vec<_>>()
        .join(",")
}

/// svcplane's `--migration` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Migration {
    /// The default (no flag): svcplane's own slices, kube-controller-manager's untouched.
    Off,
    /// Compute, compare with kube-controller-manager's, write nothing.
    Shadow,
    /// Write svcplane's slices and delete kube-controller-manager's once they are up to date.
    TakeOver,
    /// Keep svcplane's slices and delete them once kube-controller-manager's agree.
    HandBack,
}

impl Migration {
    /// The flag's value.
    pub fn value(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Shadow => "shadow",
            Self::TakeOver => "take-over",
            Self::HandBack => "hand-back",
        }
    }
}

/// `args` with `--migration` set to `mode`; [`Migration::Off`] removes the flag, so
/// the Deployment is again what the manifests install.
pub fn with_migration(args: &[String], mode: Migration) -> Vec<String> {
    let mut out: Vec<String> = args.iter().filter(|a| !a.starts_with(MIGRATION_FLAG)).cloned().collect();
    if mode != Migration::Off {
        out.push(format!("{MIGRATION_FLAG}{}", mode.value()));
    }
    out
}

/// `args` (without the program) with `--controllers` set to `controllers`.
pub fn with_controllers(args: &[String], controllers: &str) -> Vec<String> {
    let mut out: Vec<String> = args.iter().filter(|a| !a.starts_with("--controllers=")).cloned().collect();
    out.push(format!("--controllers={controllers}"));
    out
}

/// A process's arguments, program first (`/proc/PID/cmdline`).
fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (!args.is_empty()).then_some(args)
}

/// Whether `pid` still runs (a zombie has exited: its parent may simply not have
/// reaped it yet, as a [`crate::ControlPlane`] holding it as a child does).
fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// The running kube-controller-manager processes of the cluster in `root`: (pid, argv).
fn controller_managers(root: &Path) -> Vec<(u32, Vec<String>)> {
    let folder = format!("{}/", root.to_string_lossy().trim_end_matches('/'));
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| running(*pid))
        .filter_map(|pid| {
            let args = cmdline(pid)?;
            let program = Path::new(&args[0]).file_name()?.to_str()?;
            (program == KCM && args[1..].iter().any(|a| a.contains(&folder))).then_some((pid, args))
        })
        .collect()
}

impl Cluster {
    /// The `--controllers` kube-controller-manager runs with now.
    pub fn controller_manager_controllers(&self) -> Result<String, ClusterError> {
        let [(_, args)] = <[_; 1]>::try_from(controller_managers(&self.root)).map_err(|found| {
            setup(format!("{} kube-controller-manager processes under {}", found.len(), self.root.display()))
        })?;
        Ok(args.iter().find_map(|a| a.strip_prefix("--controllers=")).unwrap_or("*").to_string())
    }

    /// Stops the cluster's kube-controller-manager (SIGTERM, SIGKILL after 20 s), waits
    /// for it to exit and starts it again with `--controllers=controllers` and its other
    /// arguments unchanged, logging to the same file, in a process group of its own
    /// (it outlives this binary when `make cluster` started the cluster; tear-down
    /// finds it by its command line). Returns once its informers synced and it has
    /// enabled or disabled the endpoint controllers as asked; the time that took.
    pub async fn restart_controller_manager(&self, controllers: &str) -> Result<Duration, ClusterError> {
        use std::os::unix::process::CommandExt;
        let started = Instant::now();
        let [(pid, args)] = <[_; 1]>::try_from(controller_managers(&self.root)).map_err(|found| {
            setup(format!(
                "expected one kube-controller-manager under {}, found {}",
                self.root.display(),
                found.len()
            ))
        })?;
        let program = PathBuf::from(&args[0]);
        let new_args = with_controllers(&args[1..], controllers);
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        if poll_until(Duration::from_secs(20), Duration::from_millis(50), || async { Ok(!running(pid)) })
            .await
            .is_err()
        {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            poll_until(Duration::from_secs(10), Duration::from_millis(50), || async { Ok(!running(pid)) })
                .await
                .map_err(|e| setup(format!("kube-controller-manager {pid} did not exit: {e}")))?;
        }
        let log = self.log_path(KCM);
        let offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let (out, err) = crate::datapath::log_outputs(&log).map_err(setup)?;
        let mut child = Command::new(&program)
            .args(&new_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| setup(format!("start {}: {e}", program.display())))?;
        let new_pid = child.id();
        // Reap it when it exits (tear-down kills it), so it never lingers as a zombie.
        std::thread::spawn(move || child.wait());
        // Its log says which controllers it started: the endpoint controllers are
        // "disabled" exactly when `controllers` leaves them out.
        let disabled = controllers.contains("-endpointslice-controller");
        let last = std::cell::RefCell::new(String::new());
        poll_until(Duration::from_secs(60), Duration::from_millis(200), || async {
            if !running(new_pid) {
                return Err(format!("kube-controller-manager {new_pid} exited; log: {}", log.display()));
            }
            let text = fs::read(&log)
                .map(|b| String::from_utf8_lossy(&b[offset as usize..]).into_owned())
                .unwrap_or_default();
            let mine = |line: &&str| line.contains(&format!(" {new_pid} "));
            let synced = text.lines().filter(mine).any(|l| l.contains("\"Caches are synced\""));
            let says_disabled = text.lines().filter(mine).any(|l| {
                l.contains("controller is disabled") && l.contains("controller=\"endpointslice-controller\"")
            });
            *last.borrow_mut() =
                format!("caches synced {synced}, endpoint controllers disabled {says_disabled}");
            Ok(synced && says_disabled == disabled)
        })
        .await
        .map_err(|e| {
            setup(format!(
                "restarted kube-controller-manager ({controllers}): {e}: {}; log: {}",
                last.borrow(),
                log.display()
            ))
        })?;
        Ok(started.elapsed())
    }

    /// Rolls svcplane's Deployment to `--migration=mode` (see [`with_migration`]) and
    /// waits until the rollout is over ([`wait_svcplane_rolled_out`]); the time it took.
    /// A mode it already runs changes nothing and returns at once.
    pub async fn set_svcplane_migration(
        &self,
        client: &kube::Client,
        mode: Migration,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let api: Api<Deployment> = Api::namespaced(client.clone(), SVCPLANE_NAMESPACE);
        let deployment =
            api.get(SVCPLANE_DEPLOYMENT).await.map_err(|e| format!("get Deployment svcplane: {e}"))?;
        let args = svcplane_args(&deployment)?;
        let wanted = with_migration(&args, mode);
        if wanted != args {
            // The resourceVersion makes the patch fail instead of overwriting a
            // concurrent change; args is a plain list, which a strategic merge replaces.
            let container = (deployment.spec.template.spec.as_ref())
                .and_then(|s| s.containers.first().map(|c| c.name.clone()))
                .unwrap_or_default();
            let patch = json!({
                "metadata": { "resourceVersion": deployment.metadata.resource_version },
                "spec": { "template": { "spec": { "containers": [{ "name": container, "args": wanted }] } } },
            });
            api.patch(SVCPLANE_DEPLOYMENT, &PatchParams::default(), &Patch::Strategic(patch))
                .await
                .map_err(|e| format!("patch svcplane's args to {wanted:?}: {e}"))?;
        }
        wait_svcplane_rolled_out(client, Duration::from_secs(240)).await?;
        Ok(started.elapsed())
    }

    /// Puts the cluster back in its default endpoint ownership after a failed
    /// migration test, from a `Drop` (on a thread of its own with its own runtime):
    /// svcplane without `--migration` (rolled out, so it writes its slices),
    /// kube-controller-manager without its endpoint controllers, and then no slice of
    /// kube-controller-manager's left in any namespace (nothing would keep them up to
    /// date). Best effort; says what it did.
    pub fn restore_default_endpoint_ownership(&self) -> String {
        std::thread::scope(|s| {
            s.spawn(|| {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return format!("no runtime: {e}"),
                };
                runtime.block_on(async {
                    let mut said = Vec::new();
                    let client = self.client().await;
                    said.push(format!(
                        "svcplane --migration off: {:?}",
                        self.set_svcplane_migration(&client, Migration::Off).await
                    ));
                    let kcm_default = kcm_without_endpoint_controllers();
                    if self.controller_manager_controllers().ok().as_deref() != Some(kcm_default.as_str()) {
                        said.push(format!(
                            "kube-controller-manager without its endpoint controllers: {:?}",
                            self.restart_controller_manager(&kcm_default).await
                        ));
                    }
                    let selector = format!(
                        "endpointslice.kubernetes.io/managed-by in ({},{})",
                        crate::slices::UPSTREAM,
                        crate::slices::UPSTREAM_MIRROR
                    );
                    said.push(format!(
                        "kube-controller-manager's slices deleted: {:?}",
                        self.kubectl(&["delete", "endpointslices", "-A", "-l", &selector]).map(|_| ())
                    ));
                    said.join("; ")
                })
            })
            .join()
            .unwrap_or_else(|_| "the restore panicked".to_string())
        })
    }

    /// Runs the svcplane CLI of this workspace against the cluster: stdout, or the
    /// command and stderr.
    pub fn svcplane_cli(&self, args: &[&str]) -> Result<String, String> {
        let bin = crate::svcplane::svcplane_bin();
        let out = Command::new(&bin)
            .arg(format!("--kubeconfig={}", self.kubeconfig_path.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("svcplane {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }
}

/// The svcplane container's args in `deployment`.
fn svcplane_args(deployment: &Deployment) -> Result<Vec<String>, String> {
    (deployment.spec.template.spec.as_ref())
        .and_then(|s| s.containers.first())
        .map(|c| c.args.clone().unwrap_or_default())
        .ok_or_else(|| "Deployment svcplane has no container".to_string())
}

/// Waits until svcplane's rollout is over: the Deployment's current generation
/// observed, every replica updated and available, no Pod of an older template left
/// (not even terminating), every Pod Ready, and svcplane-webhook's slices listing
/// exactly the Pods' IPs, all ready.
pub async fn wait_svcplane_rolled_out(client: &kube::Client, timeout: Duration) -> Result<(), String> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), SVCPLANE_NAMESPACE);
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), SVCPLANE_NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), SVCPLANE_NAMESPACE);
    let last = std::cell::RefCell::new(String::new());
    poll_until(timeout, Duration::from_millis(500), || async {
        let d = deployments.get(SVCPLANE_DEPLOYMENT).await.map_err(|e| e.to_string())?;
        let want = d.spec.replicas.unwrap_or(1);
        let status = d.status.clone().unwrap_or_default();
        let rolled = status.observed_generation >= d.metadata.generation
            && status.updated_replicas == Some(want)
            && status.available_replicas == Some(want)
            && status.replicas == Some(want);
        let revision = annotation(&d.metadata, "deployment.kubernetes.io/revision");
        let list = sets.list(&ListParams::default().labels(SVCPLANE_POD_SELECTOR)).await.map_err(|e| e.to_string())?;
        let hash = list
            .items
            .iter()
            .find(|rs| revision.is_some() && annotation(&rs.metadata, "deployment.kubernetes.io/revision") == revision)
            .and_then(|rs| rs.metadata.labels.as_ref()?.get("pod-template-hash").cloned());
        let list = pods.list(&ListParams::default().labels(SVCPLANE_POD_SELECTOR)).await.map_err(|e| e.to_string())?;
        let current = |p: &Pod| {
            hash.is_some() && p.metadata.labels.as_ref().and_then(|l| l.get("pod-template-hash")) == hash.as_ref()
        };
        let settled = list.items.len() == want as usize
            && list.items.iter().all(|p| current(p) && p.metadata.deletion_timestamp.is_none() && pod_ready(p));
        let ips: std::collections::BTreeSet<String> =
            list.items.iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).collect();
        let published = endpoint_conditions(client, SVCPLANE_NAMESPACE, "svcplane-webhook").await;
        let webhook_ok =
            published.keys().cloned().collect::<std::collections::BTreeSet<_>>() == ips && published.values().all(|c| c.0);
        *last.borrow_mut() = format!(
            "rolled {rolled} (updated {:?} available {:?} of {want}); {} Pods, current template {hash:?}: {:?}; webhook endpoints {published:?}",
            status.updated_replicas,
            status.available_replicas,
            list.items.len(),
            list.items
                .iter()
                .map(|p| (
                    p.metadata.name.clone().unwrap_or_default(),
                    current(p),
                    p.metadata.deletion_timestamp.is_some(),
                    pod_ready(p)
                ))
                .collect::<Vec<_>>(),
        );
        Ok(rolled && settled && webhook_ok)
    })
    .await
    .map_err(|e| format!("svcplane's rollout not over: {e}: {}", last.borrow()))
}

fn annotation(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<String> {
    meta.annotations.as_ref()?.get(key).cloned()
}

/// The Pod holding svcplane's Lease (the replica whose controllers run).
pub async fn svcplane_leader(client: &kube::Client) -> Result<Pod, String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), SVCPLANE_NAMESPACE);
    let holder = leases
        .get(SVCPLANE_DEPLOYMENT)
        .await
        .map_err(|e| format!("get Lease: {e}"))?
        .spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
        .ok_or("the Lease has no holder")?;
    let pod = holder.split('_').next().unwrap_or_default().to_string();
    let pods: Api<Pod> = Api::namespaced(client.clone(), SVCPLANE_NAMESPACE);
    let pod = pods.get(&pod).await.map_err(|e| format!("leader Pod {pod} (Lease holder {holder}): {e}"))?;
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(format!("the leader {holder} is stopping"));
    }
    Ok(pod)
}

/// The leader's /metrics text (port 8080 of its Pod IP, reachable from this namespace).
pub async fn svcplane_leader_metrics(client: &kube::Client) -> Result<String, String> {
    let leader = svcplane_leader(client).await?;
    let ip = leader.status.as_ref().and_then(|s| s.pod_ip.clone()).ok_or("the leader has no IP")?;
    match crate::svcplane::try_http_get(&format!("{ip}:{SVCPLANE_METRICS_PORT}"), "/metrics").await? {
        (200, body) => Ok(body),
        (code, body) => Err(format!("GET {ip}:{SVCPLANE_METRICS_PORT}/metrics answered {code}: {body}")),
    }
}

/// One row of `svcplane shadow report -o json`.
#[derive(Clone, Debug, serde::Deserialize, PartialEq, Eq)]
pub struct ShadowRow {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub service: String,
    /// `endpointslice`, `endpoints` or `mirroring`.
    pub controller: String,
    /// What svcplane would write equals what kube-controller-manager wrote.
    pub agrees: bool,
    /// The first difference, when they differ.
    pub difference: Option<String>,
}

/// `svcplane shadow report -A -o json`, parsed.
pub fn shadow_report(cluster: &Cluster) -> Result<Vec<ShadowRow>, String> {
    let text = cluster.svcplane_cli(&["shadow", "report", "-A", "-o", "json"])?;
    serde_json::from_str(&text).map_err(|e| format!("shadow report is not the documented JSON ({e}): {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn setting_a_migration_replaces_the_flag_and_off_removes_it() {
        let base = strings(&["run", "--roles=controller", "--log-format=json"]);
        let shadow = with_migration(&base, Migration::Shadow);
        assert_eq!(
            shadow,
            strings(&["run", "--roles=controller", "--log-format=json", "--migration=shadow"])
        );
        let take_over = with_migration(&shadow, Migration::TakeOver);
        assert_eq!(take_over.iter().filter(|a| a.starts_with("--migration")).count(), 1);
        assert!(take_over.contains(&"--migration=take-over".to_string()));
        assert_eq!(with_migration(&take_over, Migration::Off), base);
        assert_eq!(with_migration(&base, Migration::Off), base);
    }

    #[test]
    fn the_controller_manager_keeps_its_other_arguments() {
        let args = strings(&["--kubeconfig=/x/kubeconfig", "--controllers=*,-a", "--leader-elect=false"]);
        assert_eq!(
            with_controllers(&args, "*"),
            strings(&["--kubeconfig=/x/kubeconfig", "--leader-elect=false", "--controllers=*"])
        );
        assert_eq!(
            kcm_without_endpoint_controllers(),
            "*,-endpointslice-controller,-endpoints-controller,-endpointslice-mirroring-controller"
        );
    }

    #[test]
    fn this_process_runs_and_a_missing_one_does_not() {
        assert!(running(std::process::id()));
        assert!(!running(u32::MAX));
        assert!(cmdline(std::process::id()).is_some_and(|a| !a.is_empty()));
    }

    #[test]
    fn the_shadow_report_rows_parse_as_documented() {
        let rows: Vec<ShadowRow> = serde_json::from_str(
            r#"[{"namespace":"a","service":"web","controller":"endpointslice","agrees":false,"difference":"endpoint 10.0.0.1 missing"},
                {"namespace":"a","service":"web","controller":"endpoints","agrees":true,"difference":null}]"#,
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert!(!rows[0].agrees && rows[1].difference.is_none());
    }
}
