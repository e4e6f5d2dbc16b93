//! A real cluster on this machine: the [`ControlPlane`] (etcd, kube-apiserver,
//! kube-controller-manager with every controller but the three endpoint controllers)
//! plus kube-scheduler, N kubelet nodes ([`node`]) and, deployed from its own image
//! with `manifests/overlays/local`, svcplane as the cluster's only endpoint controller
//! and Service IPAM webhook; CoreDNS runs as a Deployment behind `kube-dns` at
//! 10.96.0.10, so cluster DNS depends on svcplane's slices.
//!
//! Everything lives in one folder (`/tmp/svcplane-cluster` unless
//! `$SVCPLANE_CLUSTER_DIR`), described by its `cluster.json`: `make cluster` starts one
//! and leaves it running, `make cluster-down` ([`host::teardown`]) removes it, and a
//! test binary ([`shared`]) uses a running one or starts its own, removed when the
//! binary exits. One real cluster per machine at a time.

pub mod host;
pub mod migration;
pub mod node;
pub mod timeline;
pub mod traffic;
pub mod workload;

use std::{
    fs,
    mem::ManuallyDrop,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Node as NodeObject};
use kube::api::{Api, ListParams};
use serde::{Deserialize, Serialize};

use crate::{ControlPlane, ControlPlaneOptions, wait::poll_until};

pub use node::{CLUSTER_DNS, Node, ProxyMode};

/// The endpoint controllers svcplane replaces; kube-controller-manager runs every other.
pub const REPLACED_CONTROLLERS: [&str; 3] =
    ["endpointslice-controller", "endpoints-controller", "endpointslice-mirroring-controller"];
/// kube-controller-manager's node-monitor grace: a failed node is NotReady after it.
pub const NODE_MONITOR_GRACE: &str = "20s";
/// The namespace svcplane is installed in.
pub const SVCPLANE_NAMESPACE: &str = "svcplane-system";

/// Why the cluster could not start or be reached.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Something the cluster needs is not on this machine.
    #[error("{0}")]
    Missing(String),
    /// A step failed; the message names it and the log to read.
    #[error("cluster set-up failed: {0}")]
    Setup(String),
}

fn setup(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Setup(e.to_string())
}

/// What to start.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of kubelet nodes (`$SVCPLANE_CLUSTER_NODES`, default 2).
    pub nodes: usize,
    /// The cluster's folder.
    pub root: PathBuf,
    /// Folder of the image tarballs `make cluster-images` builds.
    pub images: PathBuf,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        let nodes = std::env::var("SVCPLANE_CLUSTER_NODES").ok().and_then(|n| n.parse().ok()).unwrap_or(2);
        Self { nodes, root: default_root(), images: default_images() }
    }
}

/// `$SVCPLANE_CLUSTER_DIR`, else `/tmp/svcplane-cluster`.
pub fn default_root() -> PathBuf {
    std::env::var_os("SVCPLANE_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/svcplane-cluster"))
}

/// `$SVCPLANE_CLUSTER_IMAGES`, else `target/cluster-images` of this workspace.
pub fn default_images() -> PathBuf {
    std::env::var_os("SVCPLANE_CLUSTER_IMAGES").map(PathBuf::from).unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_dir().join("target"));
        target.join("cluster-images")
    })
}

/// The repository's top folder.
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// What `cluster.json` records.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    server: String,
    kubeconfig: PathBuf,
    nodes: usize,
    /// The process whose exit tears the cluster down (a test binary); `None`: it stays
    /// until `make cluster-down`.
    owner_pid: Option<u32>,
}

/// A running cluster.
pub struct Cluster {
    /// Its folder.
    pub root: PathBuf,
    /// `https://172.30.0.1:PORT`.
    pub server: String,
    /// Admin kubeconfig.
    pub kubeconfig_path: PathBuf,
    /// Its nodes.
    pub nodes: Vec<Node>,
    /// Kept, never dropped: its processes belong to the cluster's folder.
    _control_plane: Option<ManuallyDrop<ControlPlane>>,
}

impl Cluster {
    /// Removes whatever a previous cluster left in `options.root`, then starts a new
    /// one: control plane, scheduler, nodes (Ready), svcplane and CoreDNS
    /// (Available, the webhook answering). `owner_pid`: see
    /// [`State::owner_pid`].
    pub async fn start(options: &ClusterOptions, owner_pid: Option<u32>) -> Result<Self, ClusterError> {
        let started = Instant::now();
        check_tools(options)?;
        let root = options.root.clone();
        host::teardown(&root);
        fs::create_dir_all(root.join("logs")).map_err(setup)?;
        host::create_api_link(&root).map_err(setup)?;

        let bins = crate::bin_dir();
        let mut cp_options = ControlPlaneOptions::default()
            .with_bind_address(host::API_ADDRESS)
            .with_controller_manager(&["*"]);
        cp_options.controllers.extend(REPLACED_CONTROLLERS.iter().map(|c| format!("-{c}")));
        cp_options.controller_manager_args = vec![
            format!("--node-monitor-grace-period={NODE_MONITOR_GRACE}"),
            "--node-monitor-period=2s".into(),
        ];
        cp_options.with_nodes = true;
        cp_options.dir = Some(root.join("controlplane"));
        cp_options.service_cidrs = node::SERVICE_CIDR.into();
        let cp = ControlPlane::start(cp_options).await.map_err(setup)?;
        let scheduler = crate::controlplane::binary(&bins, "kube-scheduler").map_err(setup)?;
        cp.spawn(
            "kube-scheduler",
            &scheduler,
            &[
                format!("--kubeconfig={}", cp.kubeconfig_path.display()),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
            ],
        )
        .map_err(setup)?;
        eprintln!("[cluster] control plane up ({:.1} s)", started.elapsed().as_secs_f64());

        let images: Vec<PathBuf> = image_tarballs(&options.images)?;
        let nodes: Vec<Node> = (1..=options.nodes).map(|i| Node::new(&root, i)).collect();
        for node in &nodes {
            node.create(&cp.server, &cp.ca, &cp.apiserver_ca_pem).map_err(setup)?;
        }
        let starts = nodes.iter().map(|n| n.start(&bins, &images));
        for result in futures::future::join_all(starts).await {
            result.map_err(setup)?;
        }
        let cluster = Cluster {
            server: cp.server.clone(),
            kubeconfig_path: cp.kubeconfig_path.clone(),
            root: root.clone(),
            nodes,
            _control_plane: Some(ManuallyDrop::new(cp)),
        };
        let state = State {
            server: cluster.server.clone(),
            kubeconfig: cluster.kubeconfig_path.clone(),
            nodes: options.nodes,
            owner_pid,
        };
        fs::write(root.join("cluster.json"), serde_json::to_vec_pretty(&state).map_err(setup)?)
            .map_err(setup)?;
        cluster.wait_nodes_ready(Duration::from_secs(90)).await?;
        eprintln!("[cluster] {} nodes Ready ({:.1} s)", options.nodes, started.elapsed().as_secs_f64());
        cluster.deploy().await?;
        eprintln!("[cluster] svcplane and CoreDNS Available ({:.1} s)", started.elapsed().as_secs_f64());
        Ok(cluster)
    }

    /// The cluster running in `root`, if its apiserver answers.
    pub async fn attach(root: &Path) -> Option<Self> {
        let state: State = serde_json::from_slice(&fs::read(root.join("cluster.json")).ok()?).ok()?;
        let cluster = Cluster {
            root: root.to_path_buf(),
            server: state.server,
            kubeconfig_path: state.kubeconfig,
            nodes: (1..=state.nodes).map(|i| Node::new(root, i)).collect(),
            _control_plane: None,
        };
        let client = cluster.try_client().await.ok()?;
        let req = http::Request::get("/readyz").body(Vec::new()).ok()?;
        client.request_text(req).await.ok()?;
        Some(cluster)
    }

    /// A new admin client, bound to the calling tokio runtime.
    pub async fn client(&self) -> kube::Client {
        self.try_client().await.unwrap_or_else(|e| panic!("cluster admin client: {e}"))
    }

    async fn try_client(&self) -> Result<kube::Client, String> {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(&self.kubeconfig_path).map_err(|e| e.to_string())?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| e.to_string())?;
        kube::Client::try_from(config).map_err(|e| e.to_string())
    }

    /// Runs the pinned kubectl against the cluster: stdout, or the command and stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(crate::bin_dir().join("kubectl"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig_path)
            .current_dir(workspace_dir())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("kubectl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// A component's log (`kube-apiserver`, `svcplane-node1-kubelet`, ...).
    pub fn log_path(&self, component: &str) -> PathBuf {
        let cp = self.root.join("controlplane/logs").join(format!("{component}.log"));
        if cp.exists() { cp } else { self.root.join("logs").join(format!("{component}.log")) }
    }

    async fn wait_nodes_ready(&self, timeout: Duration) -> Result<(), ClusterError> {
        let client = self.try_client().await.map_err(setup)?;
        let nodes: Api<NodeObject> = Api::all(client);
        let want = self.nodes.len();
        let last = std::cell::RefCell::new(String::new());
        poll_until(timeout, Duration::from_millis(500), || async {
            let list = nodes.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
            let ready: Vec<String> =
                list.items.iter().filter(|n| node_ready(n)).filter_map(|n| n.metadata.name.clone()).collect();
            *last.borrow_mut() = format!("{} of {want} Nodes Ready: {ready:?}", ready.len());
            Ok(ready.len() == want)
        })
        .await
        .map_err(|e| {
            setup(format!(
                "{e}: {}; kubelet logs: {}",
                last.borrow(),
                self.nodes
                    .iter()
                    .map(|n| n.log_path("kubelet").display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Applies `manifests/overlays/local` and CoreDNS, and waits until both are
    /// Available and a Service create passes svcplane's webhook.
    async fn deploy(&self) -> Result<(), ClusterError> {
        self.kubectl(&["apply", "--server-side", "-k", "manifests/overlays/local"]).map_err(setup)?;
        self.kubectl(&["apply", "--server-side", "-f", "e2e/cluster/coredns.yaml"]).map_err(setup)?;
        let client = self.try_client().await.map_err(setup)?;
        for (namespace, name) in [(SVCPLANE_NAMESPACE, "svcplane"), ("kube-system", "coredns")] {
            wait_available(&client, namespace, name, Duration::from_secs(120))
                .await
                .map_err(|e| setup(format!("{e}; kubelet logs in {}", self.root.join("logs").display())))?;
        }
        // The webhook is failurePolicy Fail: a dry-run create in an ordinary namespace
        // passes only once the apiserver reaches a replica through svcplane's own
        // Service's endpoints.
        let last = std::cell::RefCell::new(String::new());
        poll_until(Duration::from_secs(60), Duration::from_millis(500), || async {
            match self.kubectl(&[
                "create",
                "service",
                "clusterip",
                "svcplane-smoke",
                "--tcp=80",
                "-n",
                "default",
                "--dry-run=server",
            ]) {
                Ok(_) => Ok(true),
                Err(e) => {
                    *last.borrow_mut() = e;
                    Ok(false)
                }
            }
        })
        .await
        .map_err(|e| setup(format!("svcplane's webhook never admitted a Service: {e}: {}", last.borrow())))
    }
}

/// Whether a Node's Ready condition is True.
pub fn node_ready(node: &NodeObject) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits until Deployment `namespace/name` has all its replicas updated and available.
pub async fn wait_available(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<(), String> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let last = std::cell::RefCell::new(String::new());
    poll_until(timeout, Duration::from_millis(500), || async {
        let Ok(d) = api.get(name).await else { return Ok(false) };
        let want = d.spec.replicas.unwrap_or(1);
        let status = d.status.unwrap_or_default();
        *last.borrow_mut() = format!(
            "replicas {:?} updated {:?} available {:?} of {want}",
            status.replicas, status.updated_replicas, status.available_replicas
        );
        let generation_seen = status.observed_generation >= d.metadata.generation;
        Ok(generation_seen
            && status.updated_replicas == Some(want)
            && status.available_replicas == Some(want)
            && status.replicas == Some(want))
    })
    .await
    .map_err(|e| format!("Deployment {namespace}/{name} not Available: {e}: {}", last.borrow()))
}

fn image_tarballs(dir: &Path) -> Result<Vec<PathBuf>, ClusterError> {
    let missing = || {
        ClusterError::Missing(format!(
            "no image tarballs in {}: build them with `make cluster-images` (make test-cluster does)",
            dir.display()
        ))
    };
    let mut tars: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|_| missing())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    tars.sort();
    if tars.len() < 4 {
        return Err(missing());
    }
    Ok(tars)
}

fn check_tools(options: &ClusterOptions) -> Result<(), ClusterError> {
    if !rustix_is_root() {
        return Err(ClusterError::Missing(
            "a real cluster needs root (network namespaces, cgroups, mounts)".into(),
        ));
    }
    for tool in ["containerd", "containerd-shim-runc-v2", "runc", "ctr", "nsenter", "ip", "iptables", "nft"] {
        if Command::new("which").arg(tool).stdout(Stdio::null()).status().map_or(true, |s| !s.success()) {
            return Err(ClusterError::Missing(format!(
                "{tool} not found: install the real-cluster packages with `bash scripts/setup.sh --with-cluster` (make test-cluster does)"
            )));
        }
    }
    for bin in ["kubelet", "kube-scheduler", "kube-proxy", "kubectl"] {
        crate::controlplane::binary(&crate::bin_dir(), bin)
            .map_err(|e| ClusterError::Missing(format!("{e} (build.sh --with-nodes)")))?;
    }
    if host::cgroup_v1_mounts().is_empty() {
        return Err(ClusterError::Missing(
            "no cgroup v1 hierarchy mounted: the node recipe is for cgroup v1".into(),
        ));
    }
    image_tarballs(&options.images).map(|_| ())
}

fn rustix_is_root() -> bool {
    rustix::process::geteuid().is_root()
}

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The cluster every test of this binary shares: the one `make cluster` left running
/// if there is one (kept afterwards), else a new one, torn down by a reaper process
/// running `down_command down` once this binary exits. Panics with the reason when it
/// cannot start (never skips).
pub fn shared(down_command: &str) -> &'static Cluster {
    let result = SHARED.get_or_init(|| {
        let down_command = down_command.to_string();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let options = ClusterOptions::default();
                if let Some(cluster) = Cluster::attach(&options.root).await {
                    eprintln!("using the running cluster in {} (make cluster)", options.root.display());
                    return Ok(cluster);
                }
                let me = std::process::id();
                reap_when_gone(me, &down_command, &options.root).map_err(|e| e.to_string())?;
                keep_logs_on_panic(&options.root);
                Cluster::start(&options, Some(me)).await.map_err(|e| {
                    let _ = fs::write(options.root.join("KEEP"), "start-up failed\n");
                    e.to_string()
                })
            })
        })
        .join()
        .unwrap_or_else(|_| Err("cluster start-up panicked".into()))
    });
    match result {
        Ok(cluster) => cluster,
        Err(e) => panic!("{e}"),
    }
}

/// Tears the cluster down once process `owner` is gone. The folder is passed in the
/// environment, not the command line, so the teardown does not find its own shell.
pub fn reap_when_gone(owner: u32, down_command: &str, root: &Path) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let script = format!("while kill -0 {owner} 2>/dev/null; do sleep 1; done; exec \"$DOWN\" down");
    Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("DOWN", down_command)
        .env("SVCPLANE_CLUSTER_DIR", root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(|_| ())
}

fn keep_logs_on_panic(root: &Path) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    crate::controlplane::keep_folder_on_panic(
        &HOOK,
        root,
        format!(
            "cluster logs are kept: {}-logs-<pid> after tear-down (kubelet, containerd, kube-proxy per node; controlplane/logs)",
            root.display()
        ),
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_coredns_manifest_runs_the_image_build_sh_builds() {
        let versions = include_str!("../../controlplane/versions.env");
        let version = versions.lines().find_map(|l| l.strip_prefix("COREDNS_VERSION=")).unwrap().trim();
        let manifest = include_str!("../../cluster/coredns.yaml");
        assert!(
            manifest.contains(&format!("image: svcplane-test/coredns:{version}")),
            "coredns.yaml vs {version}"
        );
    }
}
