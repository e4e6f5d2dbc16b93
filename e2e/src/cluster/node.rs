//! One node of the real cluster: a network namespace with its own containerd, kubelet
//! and kube-proxy, as `../shared/research/realnode.md` describes.
//!
//! ```text
//!  root namespace                          node namespace svcplane-nodeN
//!  lo: 172.30.0.1 (kube-apiserver)          eth0 172.30.N.2/24 (the Node's InternalIP)
//!  svcpcN 172.30.N.1/24  <---- veth ---->    default via 172.30.N.1
//!  route 10.244.N.0/24 via 172.30.N.2      cni0 bridge 10.244.N.1/24 -- Pods (CNI bridge)
//! ```
//!
//! containerd and kubelet are started with `nsenter --net=` (not `ip netns exec`, which
//! remounts /sys and hides the cgroup mounts from kubelet). Every file of the node lives
//! in its folder, so a node can be stopped and started again from it alone.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    certs::{CertPair, TestCa},
    controlplane::KubeconfigAuth,
    datapath::{DatapathError, run},
    wait::poll_until,
};

use super::host::{self, NODE_PREFIX};

/// The whole Pod network (kube-proxy's `--cluster-cidr`); node N has 10.244.N.0/24.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The cluster's Service range (kube-apiserver's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The cluster DNS Service's ClusterIP (kubelet's `clusterDNS`).
pub const CLUSTER_DNS: &str = "10.96.0.10";
/// The sandbox image containerd runs for every Pod (built by images.sh from pause.c).
pub const SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10";

/// kube-proxy's mode on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// kube-proxy's default.
    Iptables,
    /// The newer backend.
    Nftables,
}

impl ProxyMode {
    /// Node 1 runs iptables (kube-proxy's default), every other node nftables, so a
    /// two-node cluster covers both.
    pub fn for_node(index: usize) -> Self {
        if index == 1 { Self::Iptables } else { Self::Nftables }
    }

    fn flag(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        }
    }
}

/// A node's names, addresses and files; everything else derives from these.
#[derive(Clone, Debug)]
pub struct Node {
    /// 1-based.
    pub index: usize,
    /// Node name, network namespace name and cgroup root.
    pub name: String,
    /// The Node's InternalIP (node end of its veth).
    pub ip: String,
    /// Its Pod CIDR.
    pub pod_cidr: String,
    /// kube-proxy's mode here.
    pub proxy_mode: ProxyMode,
    /// Its folder.
    pub dir: PathBuf,
    logs: PathBuf,
}

impl Node {
    /// Node `index` of the cluster whose folder is `root`.
    pub fn new(root: &Path, index: usize) -> Self {
        let name = format!("{NODE_PREFIX}{index}");
        Self {
            index,
            ip: format!("172.30.{index}.2"),
            pod_cidr: format!("10.244.{index}.0/24"),
            proxy_mode: ProxyMode::for_node(index),
            dir: root.join("nodes").join(&name),
            logs: root.join("logs"),
            name,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// A component's log file.
    pub fn log_path(&self, component: &str) -> PathBuf {
        self.logs.join(format!("{}-{component}.log", self.name))
    }

    /// Creates the namespace, link, routes, cgroups and every config file.
    /// `server` is the apiserver URL; `ca` signs the node's and kube-proxy's client
    /// certificates; `apiserver_ca` verifies the apiserver.
    pub fn create(&self, server: &str, ca: &TestCa, apiserver_ca: &str) -> Result<(), DatapathError> {
        let setup = |e: std::io::Error| DatapathError::Setup(e.to_string());
        for sub in ["containerd", "cni", "cni-ipam", "kubelet"] {
            fs::create_dir_all(self.dir.join(sub)).map_err(setup)?;
        }
        let (root_if, root_ip) = (host::root_link(self.index), format!("172.30.{}.1", self.index));
        run("ip", &["netns", "add", &self.name])?;
        run("ip", &["link", "add", &root_if, "type", "veth", "peer", "name", "eth0", "netns", &self.name])?;
        run("ip", &["addr", "add", &format!("{root_ip}/24"), "dev", &root_if])?;
        run("ip", &["link", "set", &root_if, "up"])?;
        let n = |args: &[&str]| {
            let mut full = vec!["-n", self.name.as_str()];
            full.extend_from_slice(args);
            run("ip", &full)
        };
        n(&["link", "set", "lo", "up"])?;
        n(&["addr", "add", &format!("{}/24", self.ip), "dev", "eth0"])?;
        n(&["link", "set", "eth0", "up"])?;
        n(&["route", "add", "default", "via", &root_ip])?;
        run("ip", &["netns", "exec", &self.name, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // A packet still addressed to the Service range after kube-proxy's DNAT is
        // dropped here, as kube-proxy's nftables mode does itself ("Drop traffic to
        // unallocated ClusterIPs"); its iptables mode (node 1) lets it out of the
        // default route. That escape left a trap: a SYN sent to a new Service before
        // kube-proxy had its rules went out untranslated, and its conntrack entry
        // (SYN_SENT, 120 s, no NAT) caught the client's next connection from the
        // same source port a minute later, whose SYNs then all left untranslated
        // too: a connect timeout while the Service was served (seen in the cluster
        // suite with a packet capture: 1 request in about 30 000, always from the
        // client on node 1). Dropped before conntrack confirms it, such a SYN leaves
        // nothing behind and its resend is translated once the rules exist.
        let drop_untranslated = format!(
            "add table ip svcplane-node; \
             add chain ip svcplane-node forward {{ type filter hook forward priority filter; policy accept; }}; \
             add rule ip svcplane-node forward ip daddr {SERVICE_CIDR} counter drop \
             comment \"a ClusterIP kube-proxy has not translated\""
        );
        run("ip", &["netns", "exec", &self.name, "nft", &drop_untranslated])?;
        // The CNI bridge, made here with a MAC of its own (the plugin takes an
        // existing bridge as it is). A bridge it creates has none and takes the
        // lowest of its ports' MACs: when that Pod goes, the gateway's MAC
        // changes under every other Pod's ARP entry, and their packets to it
        // are lost until they resolve it again (a connect timed out in the
        // cluster suite as a Pod on the client's node was deleted). kubenet
        // pinned cbr0's MAC for the same reason.
        n(&["link", "add", "cni0", "type", "bridge"])?;
        n(&["link", "set", "cni0", "address", &format!("02:00:0a:f4:{:02x}:01", self.index)])?;
        n(&["link", "set", "cni0", "up"])?;
        run("ip", &["route", "add", &self.pod_cidr, "via", &self.ip, "dev", &root_if])?;
        host::create_node_cgroups(&self.name)?;

        let kubelet_cert = ca
            .client(&format!("system:node:{}", self.name), &["system:nodes"])
            .map_err(|e| DatapathError::Setup(e.to_string()))?;
        let proxy_cert =
            ca.client("system:kube-proxy", &[]).map_err(|e| DatapathError::Setup(e.to_string()))?;
        let kubeconfig = |pair: CertPair| {
            crate::controlplane::kubeconfig_yaml(server, apiserver_ca, &KubeconfigAuth::Cert(pair))
        };
        let write = |name: &str, text: String| fs::write(self.dir.join(name), text).map_err(setup);
        write("kubelet.kubeconfig", kubeconfig(kubelet_cert))?;
        write("kube-proxy.kubeconfig", kubeconfig(proxy_cert))?;
        write("client-ca.crt", ca.pem())?;
        write("containerd/config.toml", self.containerd_config())?;
        write("cni/10-svcplane.conflist", self.cni_config())?;
        write("kubelet-config.yaml", self.kubelet_config())?;
        // Pods with dnsPolicy Default get this: nothing of the machine's own DNS.
        write("resolv.conf", format!("nameserver {CLUSTER_DNS}\n"))?;
        Ok(())
    }

    fn containerd_config(&self) -> String {
        let d = self.dir.display();
        format!(
            r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  # No CAP_SYS_RESOURCE here: runc cannot set the negative oom_score_adj kubelet asks.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#
        )
    }

    fn cni_config(&self) -> String {
        let ipam_dir = self.dir.join("cni-ipam");
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "svcplane",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": true,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": self.pod_cidr }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": ipam_dir,
                    },
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
            ],
        })
        .to_string()
    }

    fn kubelet_config(&self) -> String {
        let d = self.dir.display();
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This kernel mounts cgroup v1 only.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{name}
containerRuntimeEndpoint: unix://{d}/containerd.sock
# The kubelet port is reachable only on this machine: logs and exec without client certs.
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
  x509:
    clientCAFile: {d}/client-ca.crt
authorization:
  mode: AlwaysAllow
clusterDNS: [{CLUSTER_DNS}]
clusterDomain: cluster.local
resolvConf: {d}/resolv.conf
failSwapOn: false
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
# The disk is shared with the machine: never evict or collect images for it.
evictionHard:
  memory.available: 10Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
# Short heartbeats, matching kube-controller-manager's short node-monitor grace.
nodeLeaseDurationSeconds: 12
nodeStatusUpdateFrequency: 4s
"#,
            name = self.name,
        )
    }

    /// Starts containerd, imports `images`, then kubelet and kube-proxy; returns once
    /// containerd answers (the Node's readiness is the cluster's to wait for).
    pub async fn start(&self, bins: &Path, images: &[PathBuf]) -> Result<(), DatapathError> {
        self.start_containerd().await?;
        for tar in images {
            let sock = self.socket();
            let out = Command::new("ctr")
                .args(["--address", &sock.to_string_lossy(), "-n", "k8s.io", "images", "import"])
                .arg(tar)
                .output()
                .map_err(|e| DatapathError::Setup(format!("ctr: {e}")))?;
            if !out.status.success() {
                return Err(DatapathError::Command {
                    command: format!("ctr images import {}", tar.display()),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
        }
        self.start_kubelet(bins)?;
        self.start_kube_proxy(bins)
    }

    async fn start_containerd(&self) -> Result<(), DatapathError> {
        let config = self.dir.join("containerd/config.toml");
        self.spawn("containerd", Path::new("containerd"), &[format!("--config={}", config.display())])?;
        let sock = self.socket();
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || async {
            Ok(Command::new("ctr")
                .args(["--address", &sock.to_string_lossy(), "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()))
        })
        .await
        .map_err(|e| {
            DatapathError::Setup(format!(
                "containerd on {}: {e}; log: {}",
                self.name,
                self.log_path("containerd").display()
            ))
        })
    }

    fn start_kubelet(&self, bins: &Path) -> Result<(), DatapathError> {
        let d = &self.dir;
        self.spawn(
            "kubelet",
            &bins.join("kubelet"),
            &[
                format!("--config={}", d.join("kubelet-config.yaml").display()),
                format!("--kubeconfig={}", d.join("kubelet.kubeconfig").display()),
                format!("--root-dir={}", d.join("kubelet").display()),
                format!("--cert-dir={}", d.join("kubelet-pki").display()),
                format!("--hostname-override={}", self.name),
                format!("--node-ip={}", self.ip),
                "--v=1".into(),
            ],
        )
    }

    fn start_kube_proxy(&self, bins: &Path) -> Result<(), DatapathError> {
        self.spawn(
            "kube-proxy",
            &bins.join("kube-proxy"),
            &[
                format!("--kubeconfig={}", self.dir.join("kube-proxy.kubeconfig").display()),
                format!("--proxy-mode={}", self.proxy_mode.flag()),
                format!("--hostname-override={}", self.name),
                format!("--cluster-cidr={CLUSTER_CIDR}"),
                "--healthz-bind-address=127.0.0.1:10256".into(),
                "--metrics-bind-address=127.0.0.1:10249".into(),
                // conntrack sysctls are not the namespace's to set.
                "--conntrack-max-per-core=0".into(),
                "--conntrack-tcp-timeout-established=0".into(),
                "--conntrack-tcp-timeout-close-wait=0".into(),
                "--v=1".into(),
            ],
        )
    }

    /// Starts `bin args` in the node's network namespace, in its own process group
    /// (it outlives `make cluster`'s starter; [`host::teardown`] finds it by the
    /// folder its arguments name), logging to [`Self::log_path`].
    fn spawn(&self, component: &str, bin: &Path, args: &[String]) -> Result<(), DatapathError> {
        use std::os::unix::process::CommandExt;
        let (log, err) =
            crate::datapath::log_outputs(&self.log_path(component)).map_err(DatapathError::Setup)?;
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.name))
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| DatapathError::Setup(format!("start {component} on {}: {e}", self.name)))?;
        Ok(())
    }

    /// The node fails: kubelet and containerd are killed (the containers and their
    /// shims keep running, as on a node whose agent died).
    pub fn stop_agents(&self) {
        let dir = self.dir.to_string_lossy().into_owned();
        for component in ["kubelet", "containerd --config"] {
            let _ = run("pkill", &["-9", "-f", &format!("{component}.*{dir}")]);
        }
    }

    /// Kills a container outright (SIGKILL through this node's containerd), as an
    /// out-of-memory kill or a crash would; the kubelet restarts it.
    pub fn kill_container(&self, container_id: &str) -> Result<(), DatapathError> {
        let sock = self.socket();
        run(
            "ctr",
            &[
                "--address",
                &sock.to_string_lossy(),
                "-n",
                "k8s.io",
                "tasks",
                "kill",
                "--signal",
                "SIGKILL",
                container_id,
            ],
        )
        .map(|_| ())
    }

    /// Starts containerd and kubelet again after [`Self::stop_agents`].
    pub async fn restart_agents(&self, bins: &Path) -> Result<(), DatapathError> {
        self.start_containerd().await?;
        self.start_kubelet(bins)
    }
}
