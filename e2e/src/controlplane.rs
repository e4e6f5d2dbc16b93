//! Starts and stops etcd, kube-apiserver and (optionally) kube-controller-manager.
//!
//! Processes are `std::process` children so the control plane outlives any one tokio
//! runtime. They are stopped on drop and, for the shared instance (a static, never
//! dropped), by a small reaper process that waits for the test binary to exit.
//! Logs go to `<dir>/logs/<component>.log`; the directory is kept, and its path
//! printed, when a test panics.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::Duration,
};

use crate::{
    certs::{CertPair, TestCa, service_account_key},
    ports::free_port,
    wait::poll_until,
};

const VERSIONS_ENV: &str = include_str!("../controlplane/versions.env");

/// Default dual-stack Service CIDRs: an IPv4 /16 and an IPv6 /112.
pub const DEFAULT_SERVICE_CIDRS: &str = "10.96.0.0/16,fd00:10:96::/112";
/// Tries per component before start-up fails (ports can be taken meanwhile).
const START_ATTEMPTS: usize = 3;

/// Default NodePort range (the apiserver's default).
pub const DEFAULT_NODE_PORT_RANGE: &str = "30000-32767";

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A binary is not in the cache: the build script has not run.
    #[error(
        "{binary} not found at {path}: build the control plane first with `bash e2e/controlplane/build.sh` (or `make controlplane`); tests never skip when it is missing"
    )]
    MissingBinary { binary: String, path: PathBuf },
    /// A process could not be spawned.
    #[error("failed to start {component}: {source}")]
    Spawn {
        component: String,
        #[source]
        source: std::io::Error,
    },
    /// A component exited or did not become ready in time.
    #[error("{component} did not become ready within {timeout:?}: {detail} (log: {log})")]
    NotReady { component: String, timeout: Duration, detail: String, log: PathBuf },
    /// File system or certificate trouble.
    #[error("control-plane set-up failed: {0}")]
    Setup(String),
}

/// What to start besides etcd and kube-apiserver.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// kube-controller-manager `--controllers`; empty: no controller manager.
    pub controllers: Vec<String>,
    /// Extra kube-controller-manager flags.
    pub controller_manager_args: Vec<String>,
    /// `--service-cluster-ip-range`.
    pub service_cidrs: String,
    /// `--service-node-port-range`.
    pub node_port_range: String,
    /// Extra kube-apiserver flags.
    pub apiserver_args: Vec<String>,
    /// Where the binaries are; `None`: [`bin_dir`].
    pub bin_dir: Option<PathBuf>,
    /// kube-apiserver's `--bind-address` and `--advertise-address` (so its
    /// self-generated serving certificate names it), and the kubeconfig's server
    /// address. `None`: 127.0.0.1. The data-path suite binds the root-namespace end of
    /// a veth pair it created so that kube-proxy and CoreDNS in a network namespace
    /// reach the apiserver; never an address of the machine's real interfaces.
    pub bind_address: Option<String>,
    /// Real kubelets join (the in-cluster suite, [`crate::cluster`]): the Node
    /// authorizer and ServiceAccount admission are on, the apiserver keeps the
    /// `kubernetes` Service's endpoints itself (in-cluster clients dial it), prefers
    /// Nodes' InternalIPs, and dials webhook and aggregated Services at their
    /// endpoints (it runs outside every node's network namespace, where no
    /// kube-proxy rule is). Off: a node-less apiserver, Pods are API objects only.
    pub with_nodes: bool,
    /// The working directory (logs/, certs/, etcd/, kubeconfig); `None`: a new
    /// temporary one.
    pub dir: Option<PathBuf>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            controllers: Vec::new(),
            controller_manager_args: Vec::new(),
            service_cidrs: DEFAULT_SERVICE_CIDRS.to_string(),
            node_port_range: DEFAULT_NODE_PORT_RANGE.to_string(),
            apiserver_args: Vec::new(),
            bin_dir: None,
            bind_address: None,
            with_nodes: false,
            dir: None,
        }
    }
}

impl ControlPlaneOptions {
    /// Adds kube-controller-manager running only `controllers` (the behaviour oracle),
    /// with batching off so its writes follow each change.
    pub fn with_controller_manager(mut self, controllers: &[&str]) -> Self {
        self.controllers = controllers.iter().map(|c| c.to_string()).collect();
        self
    }

    /// Binds kube-apiserver to `address` instead of 127.0.0.1 (see
    /// [`ControlPlaneOptions::bind_address`]).
    pub fn with_bind_address(mut self, address: &str) -> Self {
        self.bind_address = Some(address.to_string());
        self
    }
}

/// A running control plane.
pub struct ControlPlane {
    dir: PathBuf,
    keep_dir: bool,
    /// `https://ADDRESS:PORT` of kube-apiserver (127.0.0.1 unless
    /// [`ControlPlaneOptions::bind_address`] says otherwise).
    pub server: String,
    /// Admin kubeconfig (O=system:masters client certificate).
    pub kubeconfig_path: PathBuf,
    /// The apiserver's serving CA bundle, PEM.
    pub apiserver_ca_pem: String,
    /// The test CA: the apiserver trusts client certificates it signs, and webhooks
    /// serve certificates it signs (pass [`ControlPlane::ca_pem`] as caBundle).
    pub ca: TestCa,
    /// The options it was started with.
    pub options: ControlPlaneOptions,
    children: Mutex<Vec<(String, Child)>>,
    /// Each component's binary and flags, so [`ControlPlane::start_again`] starts it
    /// unchanged (same ports, data directory, certificates).
    commands: Mutex<BTreeMap<String, (PathBuf, Vec<String>)>>,
    etcd_url: String,
}

/// The folder holding the pinned control-plane binaries:
/// `$SVCPLANE_CONTROLPLANE_BIN`, else `${SVCPLANE_CACHE:-$HOME/.cache/svcplane}/k8s-<version>/bin`.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SVCPLANE_CONTROLPLANE_BIN") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var("SVCPLANE_CACHE").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/svcplane")
    });
    cache.join(format!("k8s-{}", kubernetes_version())).join("bin")
}

/// The pinned Kubernetes version from `e2e/controlplane/versions.env`.
pub fn kubernetes_version() -> &'static str {
    VERSIONS_ENV
        .lines()
        .find_map(|l| l.strip_prefix("KUBERNETES_VERSION="))
        .map(str::trim)
        .unwrap_or("unknown")
}

pub(crate) fn binary(dir: &Path, name: &str) -> Result<PathBuf, HarnessError> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::MissingBinary { binary: name.to_string(), path })
    }
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// The control plane shared by every test of this binary (etcd + kube-apiserver only).
///
/// Panics with the harness error (never skips) when it cannot start.
pub fn shared() -> &'static ControlPlane {
    shared_with(ControlPlaneOptions::default)
}

/// Like [`shared`], with options; the first caller's options win, so a test binary
/// must always pass the same ones.
pub fn shared_with(options: impl FnOnce() -> ControlPlaneOptions) -> &'static ControlPlane {
    let result = SHARED.get_or_init(|| {
        let options = options();
        // Start on a thread with its own runtime: the caller may be inside a
        // current-thread test runtime, which cannot block on another future.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let cp = rt.block_on(ControlPlane::start(options)).map_err(|e| e.to_string())?;
            cp.spawn_reaper().map_err(|e| e.to_string())?;
            Ok(cp)
        })
        .join()
        .unwrap_or_else(|_| Err("control-plane start-up panicked".to_string()))
    });
    match result {
        Ok(cp) => cp,
        Err(e) => panic!("{e}"),
    }
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver (and kube-controller-manager when
    /// `options.controllers` is not empty) and waits until /readyz answers 200
    /// and the `kubernetes` Service and ServiceCIDR exist.
    pub async fn start(options: ControlPlaneOptions) -> Result<Self, HarnessError> {
        let bins = options.bin_dir.clone().unwrap_or_else(bin_dir);
        let etcd = binary(&bins, "etcd")?;
        let apiserver = binary(&bins, "kube-apiserver")?;
        let kcm = if options.controllers.is_empty() {
            None
        } else {
            Some(binary(&bins, "kube-controller-manager")?)
        };

        let dir = match &options.dir {
            Some(dir) => dir.clone(),
            None => tempfile::Builder::new()
                .prefix("svcplane-cp-")
                .tempdir()
                .map_err(|e| HarnessError::Setup(e.to_string()))?
                .keep(),
        };
        let setup = |e: &dyn std::fmt::Display| HarnessError::Setup(e.to_string());
        for sub in ["logs", "certs", "etcd"] {
            fs::create_dir_all(dir.join(sub)).map_err(|e| setup(&e))?;
        }
        let ca = TestCa::new().map_err(|e| setup(&e))?;
        let admin = ca.client("svcplane-test-admin", &["system:masters"]).map_err(|e| setup(&e))?;
        let sa_key = dir.join("sa.key");
        let (sa_private, sa_public) = service_account_key().map_err(|e| setup(&e))?;
        fs::write(&sa_key, sa_private).map_err(|e| setup(&e))?;
        fs::write(dir.join("sa.pub"), sa_public).map_err(|e| setup(&e))?;
        let client_ca = dir.join("client-ca.crt");
        fs::write(&client_ca, ca.pem()).map_err(|e| setup(&e))?;

        let mut cp = ControlPlane {
            keep_dir: std::env::var_os("SVCPLANE_KEEP_CONTROLPLANE").is_some(),
            server: String::new(),
            kubeconfig_path: dir.join("kubeconfig"),
            apiserver_ca_pem: String::new(),
            ca,
            options,
            children: Mutex::new(Vec::new()),
            commands: Mutex::new(BTreeMap::new()),
            etcd_url: String::new(),
            dir,
        };
        install_panic_hook(&cp.dir);

        match cp.start_components(etcd, apiserver, kcm, client_ca, sa_key, admin).await {
            Ok(()) => Ok(cp),
            Err(e) => {
                // Keep the logs of a failed start: the error names them.
                cp.keep_dir = true;
                Err(e)
            }
        }
    }

    async fn start_components(
        &mut self,
        etcd: PathBuf,
        apiserver: PathBuf,
        kcm: Option<PathBuf>,
        client_ca: PathBuf,
        sa_key: PathBuf,
        admin: CertPair,
    ) -> Result<(), HarnessError> {
        // Ports picked by binding :0 can be taken by someone else before the component
        // binds them; a component that fails to start is retried on fresh ports.
        for component in ["etcd", "kube-apiserver"] {
            let mut attempt = 0;
            loop {
                let started = match component {
                    "etcd" => self.start_etcd(&etcd).await,
                    _ => self.start_apiserver(&apiserver, &client_ca, &sa_key, &admin).await,
                };
                match started {
                    Ok(()) => break,
                    Err(e) => {
                        self.stop_component(component);
                        attempt += 1;
                        if attempt == START_ATTEMPTS {
                            return Err(e);
                        }
                    }
                }
            }
        }
        if let Some(kcm) = kcm {
            self.start_controller_manager(&kcm, &self.options.controller_manager_args)?;
        }
        Ok(())
    }

    /// The control plane's working directory (logs/, certs/, kubeconfig).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A component's log file.
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{component}.log"))
    }

    /// The test CA certificate (PEM): the caBundle for webhooks served with
    /// certificates from [`TestCa::server`].
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A new admin client, bound to the calling tokio runtime.
    pub async fn client(&self) -> kube::Client {
        self.try_client().await.unwrap_or_else(|e| panic!("admin client: {e}"))
    }

    /// A new admin client, or why not.
    pub async fn try_client(&self) -> Result<kube::Client, kube::Error> {
        let config = self.config().await?;
        kube::Client::try_from(config)
    }

    /// The admin client configuration.
    pub async fn config(&self) -> Result<kube::Config, kube::Error> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig_path)
            .map_err(|e| kube::Error::Service(Box::new(e)))?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| kube::Error::Service(Box::new(e)))
    }

    /// Writes a kubeconfig for a client certificate (e.g. another user) and returns its path.
    pub fn write_kubeconfig(&self, name: &str, auth: &KubeconfigAuth) -> std::io::Result<PathBuf> {
        let path = self.dir.join(format!("kubeconfig-{name}"));
        fs::write(&path, kubeconfig_yaml(&self.server, &self.apiserver_ca_pem, auth))?;
        Ok(path)
    }

    async fn start_etcd(&mut self, etcd: &Path) -> Result<(), HarnessError> {
        let client_port = free_port().map_err(|e| HarnessError::Setup(e.to_string()))?;
        let peer_port = free_port().map_err(|e| HarnessError::Setup(e.to_string()))?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let data = self.dir.join("etcd");
        let _ = fs::remove_dir_all(&data);
        let args = vec![
            "--name=svcplane-test".to_string(),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=svcplane-test={peer_url}"),
            // Tests need no durability: skipping fsync makes etcd several times faster.
            "--unsafe-no-fsync".to_string(),
            "--quota-backend-bytes=8589934592".to_string(),
            "--log-level=warn".to_string(),
        ];
        self.spawn("etcd", etcd, &args)?;
        self.etcd_url = client_url;
        self.wait_etcd_healthy().await
    }

    /// Waits until etcd answers /health with 200.
    async fn wait_etcd_healthy(&self) -> Result<(), HarnessError> {
        let health = self.etcd_url.trim_start_matches("http://");
        let log = self.log_path("etcd");
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || async {
            if let Some(status) = self.exited("etcd") {
                return Err(format!("etcd exited: {status}"));
            }
            Ok(http_get_ok(health, "/health").await)
        })
        .await
        .map_err(|detail| HarnessError::NotReady {
            component: "etcd".into(),
            timeout: Duration::from_secs(30),
            detail,
            log,
        })
    }

    async fn start_apiserver(
        &mut self,
        apiserver: &Path,
        client_ca: &Path,
        sa_key: &Path,
        admin: &CertPair,
    ) -> Result<(), HarnessError> {
        let port = free_port().map_err(|e| HarnessError::Setup(e.to_string()))?;
        let certs = self.dir.join("certs");
        let address = self.options.bind_address.clone().unwrap_or_else(|| "127.0.0.1".to_string());
        let host = if address.contains(':') { format!("[{address}]") } else { address.clone() };
        let mut args = vec![
            format!("--etcd-servers={}", self.etcd_url),
            format!("--cert-dir={}", certs.display()),
            format!("--secure-port={port}"),
            format!("--bind-address={address}"),
            format!("--advertise-address={address}"),
            format!("--service-cluster-ip-range={}", self.options.service_cidrs),
            format!("--service-node-port-range={}", self.options.node_port_range),
            format!("--client-ca-file={}", client_ca.display()),
            "--service-account-issuer=https://kubernetes.default.svc".to_string(),
            format!("--service-account-key-file={}", sa_key.with_extension("pub").display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--allow-privileged=true".to_string(),
            "--profiling=false".to_string(),
        ];
        if self.options.with_nodes {
            args.extend([
                "--authorization-mode=Node,RBAC".to_string(),
                // Without it the `kubernetes` Service has no endpoints and every
                // in-cluster client (svcplane, CoreDNS) gets "connection refused".
                "--endpoint-reconciler-type=lease".to_string(),
                "--kubelet-preferred-address-types=InternalIP".to_string(),
                "--enable-aggregator-routing=true".to_string(),
            ]);
        } else {
            args.extend([
                "--authorization-mode=RBAC".to_string(),
                // No ServiceAccount admission: Pods are API objects only (no kubelet, no tokens).
                "--disable-admission-plugins=ServiceAccount".to_string(),
                // The apiserver must not write the `kubernetes` Service's Endpoints itself.
                "--endpoint-reconciler-type=none".to_string(),
            ]);
        }
        args.extend(self.options.apiserver_args.iter().cloned());
        self.spawn("kube-apiserver", apiserver, &args)?;
        self.server = format!("https://{host}:{port}");

        let log = self.log_path("kube-apiserver");
        let not_ready = |detail: String| HarnessError::NotReady {
            component: "kube-apiserver".into(),
            timeout: Duration::from_secs(60),
            detail,
            log: log.clone(),
        };
        // The serving certificate is self-generated into --cert-dir at start-up.
        let crt = certs.join("apiserver.crt");
        poll_until(Duration::from_secs(60), Duration::from_millis(50), || async {
            if let Some(status) = self.exited("kube-apiserver") {
                return Err(format!("kube-apiserver exited: {status}"));
            }
            Ok(crt.is_file())
        })
        .await
        .map_err(not_ready)?;
        self.apiserver_ca_pem = fs::read_to_string(&crt).map_err(|e| HarnessError::Setup(e.to_string()))?;
        fs::write(
            &self.kubeconfig_path,
            kubeconfig_yaml(&self.server, &self.apiserver_ca_pem, &KubeconfigAuth::Cert(admin.clone())),
        )
        .map_err(|e| HarnessError::Setup(e.to_string()))?;
        self.wait_apiserver_ready().await
    }

    /// Waits until kube-apiserver is ready and its own objects exist.
    async fn wait_apiserver_ready(&self) -> Result<(), HarnessError> {
        let not_ready = |detail: String| HarnessError::NotReady {
            component: "kube-apiserver".into(),
            timeout: Duration::from_secs(60),
            detail,
            log: self.log_path("kube-apiserver"),
        };
        let client = self.try_client().await.map_err(|e| not_ready(e.to_string()))?;
        poll_until(Duration::from_secs(60), Duration::from_millis(100), || async {
            if let Some(status) = self.exited("kube-apiserver") {
                return Err(format!("kube-apiserver exited: {status}"));
            }
            // /readyz does not wait for the apiserver's own objects: the `kubernetes`
            // Service (which holds the first ClusterIP) and ServiceCIDR can appear a
            // moment later, and a test that counts allocations would see them arrive.
            for path in [
                "/readyz",
                "/api/v1/namespaces/default/services/kubernetes",
                "/apis/networking.k8s.io/v1/servicecidrs/kubernetes",
            ] {
                let req = http::Request::get(path).body(Vec::new()).map_err(|e| e.to_string())?;
                if client.request_text(req).await.is_err() {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await
        .map_err(not_ready)
    }

    /// Stops kube-controller-manager and starts it again with `extra_args` in place
    /// of the options' (e.g. another --kube-api-qps); same controllers.
    pub fn restart_controller_manager(&self, extra_args: &[String]) -> Result<(), HarnessError> {
        let bins = self.options.bin_dir.clone().unwrap_or_else(bin_dir);
        let kcm = binary(&bins, "kube-controller-manager")?;
        self.stop_component("kube-controller-manager");
        self.start_controller_manager(&kcm, extra_args)
    }

    fn start_controller_manager(&self, kcm: &Path, extra_args: &[String]) -> Result<(), HarnessError> {
        let mut args = vec![
            format!("--kubeconfig={}", self.kubeconfig_path.display()),
            format!("--controllers={}", self.options.controllers.join(",")),
            "--leader-elect=false".to_string(),
            "--secure-port=0".to_string(),
            "--concurrent-service-endpoint-syncs=5".to_string(),
            // Batching off: the oracle writes after each change, as svcplane does.
            "--endpoint-updates-batch-period=0".to_string(),
            "--endpointslice-updates-batch-period=0".to_string(),
        ];
        args.extend(extra_args.iter().cloned());
        self.spawn("kube-controller-manager", kcm, &args)
    }

    /// Starts another component (e.g. kube-scheduler) that is stopped with the rest;
    /// its output goes to [`Self::log_path`].
    pub fn spawn(&self, component: &str, bin: &Path, args: &[String]) -> Result<(), HarnessError> {
        let (log, err) =
            crate::datapath::log_outputs(&self.log_path(component)).map_err(HarnessError::Setup)?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|source| HarnessError::Spawn { component: component.to_string(), source })?;
        self.lock_children().push((component.to_string(), child));
        let command = (bin.to_path_buf(), args.to_vec());
        self.commands.lock().unwrap_or_else(|p| p.into_inner()).insert(component.to_string(), command);
        Ok(())
    }

    /// Kills `component` (`etcd` or `kube-apiserver`) with SIGKILL, as a crash or an
    /// OOM kill does, while everything else (svcplane too) keeps running;
    /// [`Self::start_again`] brings it back. Not SIGTERM: kube-apiserver's graceful
    /// stop waited over 30 s for open watches here.
    pub fn stop_for_restart(&self, component: &str) -> Result<(), HarnessError> {
        if !self.pids().iter().any(|(name, _)| name == component) {
            return Err(HarnessError::Setup(format!("{component} is not running")));
        }
        self.stop_component(component);
        Ok(())
    }

    /// Starts `component` again after [`Self::stop_for_restart`], with the same
    /// binary and flags: kube-apiserver on the same port and etcd, with the
    /// serving certificate it wrote at first start; etcd on the same ports and data
    /// directory. Returns once it serves and kube-apiserver is ready again.
    pub async fn start_again(&self, component: &str) -> Result<(), HarnessError> {
        let command = self.commands.lock().unwrap_or_else(|p| p.into_inner()).get(component).cloned();
        let (bin, args) =
            command.ok_or_else(|| HarnessError::Setup(format!("{component} was never started")))?;
        self.spawn(component, &bin, &args)?;
        if let Some((_, pid)) = self.pids().into_iter().find(|(name, _)| name == component) {
            self.track_pid(pid);
        }
        if component == "etcd" {
            self.wait_etcd_healthy().await?;
        }
        self.wait_apiserver_ready().await?;
        // Clients (svcplane's kubeconfig) trust the first certificate only.
        let crt = fs::read_to_string(self.dir.join("certs/apiserver.crt")).unwrap_or_default();
        if crt != self.apiserver_ca_pem {
            return Err(HarnessError::Setup("kube-apiserver wrote a new serving certificate".into()));
        }
        Ok(())
    }

    fn lock_children(&self) -> std::sync::MutexGuard<'_, Vec<(String, Child)>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The exit status of `component` if it has exited.
    pub fn exited(&self, component: &str) -> Option<String> {
        let mut children = self.lock_children();
        children
            .iter_mut()
            .find(|(name, _)| name == component)
            .and_then(|(_, child)| child.try_wait().ok().flatten())
            .map(|s| s.to_string())
    }

    /// PIDs of the running components, by name (for RSS and CPU measurements).
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.lock_children().iter().map(|(n, c)| (n.clone(), c.id())).collect()
    }

    fn stop_component(&self, component: &str) {
        let mut children = self.lock_children();
        children.retain_mut(|(name, child)| {
            if name == component {
                let _ = child.kill();
                let _ = child.wait();
                false
            } else {
                true
            }
        });
    }

    /// Stops every component.
    pub fn stop(&self) {
        let mut children = self.lock_children();
        // Reverse start order: controller manager, apiserver, then etcd.
        while let Some((_, mut child)) = children.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Adds a process the reaper must kill when the test binary exits.
    pub(crate) fn track_pid(&self, pid: u32) {
        use std::io::Write;
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(self.dir.join("pids")) {
            let _ = writeln!(f, "{pid}");
        }
    }

    /// A reaper process that stops the components and removes the directory when
    /// this process exits (statics are never dropped). It polls once a second: it
    /// synchronises nothing in a test, it only cleans up after the binary is gone.
    fn spawn_reaper(&self) -> std::io::Result<()> {
        for (_, pid) in self.pids() {
            self.track_pid(pid);
        }
        // Reads the pid file at exit, so processes started later (svcplane) are reaped too.
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 1; done; pids=$(cat '{dir}/pids'); kill $pids 2>/dev/null; \
             sleep 2; kill -9 $pids 2>/dev/null; [ -e '{dir}/KEEP' ] || [ -n \"$KEEP\" ] || rm -rf '{dir}'",
            parent = std::process::id(),
            dir = self.dir.display(),
        );
        let mut cmd = Command::new("bash");
        cmd.arg("-c").arg(script).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        if self.keep_dir {
            cmd.env("KEEP", "1");
        }
        cmd.spawn().map(|_| ())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
        if !self.keep_dir && !self.dir.join("KEEP").exists() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// How a kubeconfig authenticates.
#[derive(Clone, Debug)]
pub enum KubeconfigAuth {
    /// A client certificate.
    Cert(CertPair),
    /// A bearer token (e.g. a ServiceAccount's, from the TokenRequest API).
    Token(String),
}

pub(crate) fn kubeconfig_yaml(server: &str, ca_pem: &str, auth: &KubeconfigAuth) -> String {
    use std::fmt::Write;
    let b64 = |s: &str| base64_encode(s.as_bytes());
    let mut user = String::new();
    match auth {
        KubeconfigAuth::Cert(pair) => {
            let _ = write!(
                user,
                "    client-certificate-data: {}\n    client-key-data: {}\n",
                b64(&pair.cert_pem),
                b64(&pair.key_pem)
            );
        }
        KubeconfigAuth::Token(token) => {
            let _ = writeln!(user, "    token: {token}");
        }
    }
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: svcplane-test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: user\n  user:\n{user}contexts:\n- name: svcplane-test\n  context:\n    cluster: svcplane-test\n    user: user\ncurrent-context: svcplane-test\n",
        ca = b64(ca_pem),
    )
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Plain-HTTP GET on loopback that reports whether the answer was 200 (etcd /health).
async fn http_get_ok(addr: &str, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200")
}

/// On a test panic, keep the control plane's folder and say where its logs are.
fn install_panic_hook(dir: &Path) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    keep_folder_on_panic(
        &HOOK,
        dir,
        format!(
            "control-plane logs kept in {}/logs (etcd.log, kube-apiserver.log, kube-controller-manager.log)",
            dir.display()
        ),
    );
}

/// Once per `hook`, chains a panic hook that marks `dir` to be kept (its owner
/// sees `KEEP` on drop) and prints `message`.
pub(crate) fn keep_folder_on_panic(hook: &'static std::sync::Once, dir: &Path, message: String) {
    let dir = dir.to_path_buf();
    hook.call_once(move || {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = fs::write(dir.join("KEEP"), b"a test panicked\n");
            eprintln!("{message}");
            previous(info);
        }));
    });
}

impl ControlPlane {
    /// The apiserver's count of write requests (POST, PUT, PATCH, DELETE) on
    /// `resource`, from its own `apiserver_request_total` metric.
    pub async fn apiserver_writes(&self, client: &kube::Client, resource: &str) -> f64 {
        let req = http::Request::get("/metrics").body(Vec::new()).expect("request");
        let text = client.request_text(req).await.unwrap_or_else(|e| panic!("apiserver /metrics: {e}"));
        let resource = format!("resource=\"{resource}\"");
        ["POST", "PUT", "PATCH", "DELETE"]
            .iter()
            .map(|verb| {
                crate::svcplane::sum_metric(
                    &text,
                    "apiserver_request_total",
                    &[&resource, &format!("verb=\"{verb}\"")],
                )
            })
            .sum()
    }
}
