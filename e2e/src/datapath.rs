//! A small network on this machine for the data-path suite: `ip netns` namespaces and
//! veth pairs, nothing leaves the machine.
//!
//! ```text
//!  root namespace                node namespace (kube-proxy, CoreDNS, the client)
//!  veth 10.255.X.1/30  <----->   veth 10.255.X.2/30  (the Node's InternalIP)
//!  (kube-apiserver binds it)     bridge br0 10.244.0.1/16, fd00:10:244::1/64
//!                                  |-- veth -- Pod namespace: 10.244.0.N, fd00:10:244::N
//!                                  |-- veth -- Pod namespace ...
//! ```
//!
//! Every namespace name carries this process's pid. Processes started in namespaces
//! are killed, and the namespaces deleted (which removes their veths and the
//! nftables tables kube-proxy made in them), on drop and by a reaper process when
//! the test binary exits; namespaces left by a run whose process is gone are deleted
//! at the next start.

use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

/// Prefix of every namespace this module creates.
const NETNS_PREFIX: &str = "svcpdp-";
/// The Pod network on the node's bridge (kube-proxy's `--cluster-cidr`).
pub const POD_CIDRS: &str = "10.244.0.0/16,fd00:10:244::/64";
/// Service CIDRs the node namespace routes (the harness defaults).
const SERVICE_ROUTES: [&str; 2] = ["10.96.0.0/16", "fd00:10:96::/112"];

/// Why the network could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// A command failed; the message is its stderr.
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    /// Anything else (files, spawning).
    #[error("data-path set-up failed: {0}")]
    Setup(String),
}

/// A process's stdout and stderr, both appended to the log file `path`.
pub(crate) fn log_outputs(path: &Path) -> Result<(fs::File, fs::File), String> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let err = log.try_clone().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((log, err))
}

/// Runs `program args`, returning stdout, or the command line and stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, DatapathError> {
    let out = Command::new(program).args(args).stdin(Stdio::null()).output().map_err(|e| {
        DatapathError::Command { command: format!("{program} {}", args.join(" ")), stderr: e.to_string() }
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DatapathError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn ip(args: &[&str]) -> Result<String, DatapathError> {
    run("ip", args)
}

/// A Pod's network namespace and addresses.
#[derive(Clone, Debug)]
pub struct PodNet {
    /// Namespace name.
    pub netns: String,
    /// Its IPv4 address.
    pub ipv4: String,
    /// Its IPv6 address, when the network has IPv6.
    pub ipv6: Option<String>,
}

impl PodNet {
    /// The addresses for the Pod's status.podIPs (IPv4 first).
    pub fn ips(&self) -> Vec<String> {
        std::iter::once(self.ipv4.clone()).chain(self.ipv6.clone()).collect()
    }
}

/// The network: a node namespace linked to the root namespace, Pod namespaces on
/// its bridge, and the processes started in them.
pub struct Network {
    /// The node namespace's name.
    pub node_netns: String,
    /// Root-namespace end of the link (kube-apiserver binds it).
    pub root_ip: String,
    /// Node-namespace end of the link: the Node's InternalIP.
    pub node_ip: String,
    /// Whether IPv6 works in the namespaces: `Err` names the command that
    /// failed and why (the dual-stack case fails with it).
    pub ipv6: Result<(), String>,
    /// Logs and the reaper's lists.
    pub dir: PathBuf,
    tag: String,
    next_pod: AtomicU32,
    namespaces: Mutex<Vec<String>>,
    children: Mutex<Vec<(String, Child)>>,
}

impl Network {
    /// Builds the node namespace and its link to the root namespace, and starts the
    /// reaper. Fails with the exact command and error when the kernel or the
    /// machine refuses (e.g. no permission to create namespaces).
    pub fn create() -> Result<Self, DatapathError> {
        remove_stale_namespaces();
        let pid = std::process::id();
        let tag = format!("{pid}");
        let dir = tempfile::Builder::new()
            .prefix("svcplane-datapath-")
            .tempdir()
            .map_err(|e| DatapathError::Setup(e.to_string()))?
            .keep();
        fs::create_dir_all(dir.join("logs")).map_err(|e| DatapathError::Setup(e.to_string()))?;
        let (root_ip, node_ip) = free_link_subnet()?;
        let mut net = Network {
            node_netns: format!("{NETNS_PREFIX}{tag}-node"),
            root_ip,
            node_ip,
            ipv6: Err("not set up yet".into()),
            dir,
            tag,
            next_pod: AtomicU32::new(0),
            namespaces: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
        };
        net.spawn_reaper()?;
        keep_on_panic(&net.dir);
        net.build_node()?;
        Ok(net)
    }

    fn build_node(&mut self) -> Result<(), DatapathError> {
        let node = self.node_netns.clone();
        self.add_netns(&node)?;
        let root_if = format!("spr{}", self.tag);
        let node_if = format!("spn{}", self.tag);
        ip(&["link", "add", &root_if, "type", "veth", "peer", "name", &node_if, "netns", &node])?;
        ip(&["addr", "add", &format!("{}/30", self.root_ip), "dev", &root_if])?;
        ip(&["link", "set", &root_if, "up"])?;
        let n = |args: &[&str]| -> Result<String, DatapathError> {
            let mut full = vec!["-n", node.as_str()];
            full.extend_from_slice(args);
            ip(&full)
        };
        n(&["link", "set", "lo", "up"])?;
        n(&["addr", "add", &format!("{}/30", self.node_ip), "dev", &node_if])?;
        n(&["link", "set", &node_if, "up"])?;
        n(&["link", "add", "br0", "type", "bridge"])?;
        n(&["addr", "add", "10.244.0.1/16", "dev", "br0"])?;
        n(&["link", "set", "br0", "up"])?;
        run("ip", &["netns", "exec", &node, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // Locally originated connections to a ClusterIP need a route before DNAT.
        n(&["route", "add", SERVICE_ROUTES[0], "dev", "br0"])?;
        // IPv6 may be missing (a kernel or sandbox without it): the IPv4 cases
        // still run, and the dual-stack case fails with this reason.
        self.ipv6 = n(&["addr", "add", "fd00:10:244::1/64", "dev", "br0", "nodad"])
            .and_then(|_| {
                run("ip", &["netns", "exec", &node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
            })
            .and_then(|_| n(&["-6", "route", "add", SERVICE_ROUTES[1], "dev", "br0"]))
            .map(|_| ())
            .map_err(|e| e.to_string());
        Ok(())
    }

    fn add_netns(&self, name: &str) -> Result<(), DatapathError> {
        // Recorded first, so the reaper deletes it even if `ip netns add` half-worked.
        self.lock_namespaces().push(name.to_string());
        append_line(&self.dir.join("netns"), name);
        ip(&["netns", "add", name]).map(|_| ())
    }

    /// A new Pod namespace on the node's bridge with the next free addresses.
    pub fn add_pod(&self) -> Result<PodNet, DatapathError> {
        let n = self.next_pod.fetch_add(1, Ordering::Relaxed) + 10;
        let netns = format!("{NETNS_PREFIX}{}-p{n}", self.tag);
        self.add_netns(&netns)?;
        let ipv4 = format!("10.244.{}.{}", n / 250, n % 250 + 2);
        let ipv6 = self.ipv6.is_ok().then(|| format!("fd00:10:244::{:x}", n));
        let host_if = format!("vp{n}");
        ip(&[
            "-n",
            &self.node_netns,
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        ip(&["-n", &self.node_netns, "link", "set", &host_if, "master", "br0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{ipv4}/16"), "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "route", "add", "default", "via", "10.244.0.1"])?;
        if let Some(v6) = &ipv6 {
            ip(&["-n", &netns, "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
            ip(&["-n", &netns, "-6", "route", "add", "default", "via", "fd00:10:244::1"])?;
        }
        Ok(PodNet { netns, ipv4, ipv6 })
    }

    /// Starts `program args` inside `netns` (`ip netns exec`, which execs, so the
    /// child is the program itself); output goes to `<dir>/logs/<name>.log`.
    pub fn spawn(
        &self,
        name: &str,
        netns: &str,
        program: &Path,
        args: &[String],
    ) -> Result<u32, DatapathError> {
        let (log, err) = log_outputs(&self.log_path(name)).map_err(DatapathError::Setup)?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| DatapathError::Setup(format!("spawn {}: {e}", program.display())))?;
        let pid = child.id();
        append_line(&self.dir.join("pids"), &pid.to_string());
        self.lock_children().push((name.to_string(), child));
        Ok(pid)
    }

    /// Whether the process started as `name` has exited, and how.
    pub fn exited(&self, name: &str) -> Option<String> {
        self.lock_children()
            .iter_mut()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| c.try_wait().ok().flatten())
            .map(|s| s.to_string())
    }

    /// Kills the process started as `name` (SIGKILL) and waits for it.
    pub fn stop(&self, name: &str) {
        self.lock_children().retain_mut(|(n, child)| {
            if n == name {
                let _ = child.kill();
                let _ = child.wait();
                false
            } else {
                true
            }
        });
    }

    /// Keeps the logs folder after the run (a failure names a log in it); returns `why`.
    pub fn keep(&self, why: String) -> String {
        let _ = fs::write(self.dir.join("KEEP"), why.as_bytes());
        why
    }

    /// A process's log file.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{name}.log"))
    }

    fn lock_children(&self) -> std::sync::MutexGuard<'_, Vec<(String, Child)>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_namespaces(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.namespaces.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When this process exits (a static is never dropped), kills what it started and
    /// deletes its namespaces. It polls once a second: cleanup only, never a test's
    /// synchronisation.
    fn spawn_reaper(&self) -> Result<(), DatapathError> {
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 1; done; pids=$(cat '{dir}/pids' 2>/dev/null); \
             [ -n \"$pids\" ] && kill -9 $pids 2>/dev/null; sleep 1; \
             for ns in $(cat '{dir}/netns' 2>/dev/null); do ip netns del \"$ns\" 2>/dev/null; done; \
             [ -e '{dir}/KEEP' ] || [ -n \"$SVCPLANE_KEEP_CONTROLPLANE\" ] || rm -rf '{dir}'",
            parent = std::process::id(),
            dir = self.dir.display(),
        );
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(|_| ())
            .map_err(|e| DatapathError::Setup(format!("spawn reaper: {e}")))
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let mut children = self.lock_children();
        while let Some((_, mut child)) = children.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
        drop(children);
        for ns in self.lock_namespaces().drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

/// On a test panic, keep the network's folder (kube-proxy, CoreDNS and echo-server
/// logs) and say where it is.
fn keep_on_panic(dir: &Path) {
    static HOOK: std::sync::Once = std::sync::Once::new();
    crate::controlplane::keep_folder_on_panic(
        &HOOK,
        dir,
        format!("data-path logs kept in {}/logs (kube-proxy.log, coredns.log, echo-*.log)", dir.display()),
    );
}

fn append_line(path: &Path, line: &str) {
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

/// Deletes namespaces of earlier runs whose process is gone (a crash or SIGKILL
/// before the reaper ran).
fn remove_stale_namespaces() {
    let Ok(list) = run("ip", &["netns", "list"]) else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// A /30 in 10.255.0.0/16 that no root-namespace address uses (another run may be
/// going on at the same time): (root end, node end).
fn free_link_subnet() -> Result<(String, String), DatapathError> {
    let used = ip(&["-o", "-4", "addr", "show"])?;
    let start = std::process::id() % 16384;
    (0..16384u32)
        .map(|i| (start + i) % 16384)
        .map(|k| (k * 4 / 256, k * 4 % 256))
        .map(|(hi, lo)| (format!("10.255.{hi}.{}", lo + 1), format!("10.255.{hi}.{}", lo + 2)))
        .find(|(r, n)| !used.contains(&format!(" {r}/")) && !used.contains(&format!(" {n}/")))
        .ok_or_else(|| DatapathError::Setup("no free /30 in 10.255.0.0/16".into()))
}

/// Runs `f` on a new thread that has entered network namespace `netns`: sockets it
/// opens live there. The calling thread's namespace is untouched.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .map_err(|e| format!("setns {path}: {e}"))?;
        f()
    })
    .join()
    .unwrap_or_else(|_| Err("namespace thread panicked".into()))
}

/// One HTTP `GET /` from `netns` to `addr` on a new connection, bounded by `timeout`:
/// the body (the serving Pod's name), or the error.
pub async fn http_get_from(netns: &str, addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    http_get_path_from(netns, addr, "/", timeout).await
}

/// Like [`http_get_from`] for `path`: the body of a 200 answer, or the error.
pub async fn http_get_path_from(
    netns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<String, String> {
    let netns = netns.to_string();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        in_netns(&netns, move || {
            let mut s =
                TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
            s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            s.write_all(request.as_bytes()).map_err(|e| format!("write {addr}: {e}"))?;
            let mut text = String::new();
            s.read_to_string(&mut text).map_err(|e| format!("read {addr}: {e}"))?;
            match text.split_once("\r\n\r\n") {
                Some((head, body)) if head.split(' ').nth(1) == Some("200") => Ok(body.trim().to_string()),
                _ => Err(format!("unexpected answer from {addr}: {text:?}")),
            }
        })
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// One UDP datagram from `netns` to `addr`; the answer (the Pod's name) or the error.
pub async fn udp_query_from(netns: &str, addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let netns = netns.to_string();
    tokio::task::spawn_blocking(move || {
        in_netns(&netns, move || {
            let local = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
            let s = UdpSocket::bind(local).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            s.send_to(b"who\n", addr).map_err(|e| format!("send {addr}: {e}"))?;
            let mut buf = [0u8; 512];
            let (n, _) = s.recv_from(&mut buf).map_err(|e| format!("recv {addr}: {e}"))?;
            Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
        })
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// `dig @server -p port +short <query...>` run in `netns`: the answer lines.
pub async fn dig(netns: &str, server: &str, port: u16, query: &[&str]) -> Result<Vec<String>, String> {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", netns, "dig", &format!("@{server}"), "-p", &port.to_string()])
        .args(["+short", "+time=2", "+tries=1"])
        .args(query)
        .stdin(Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(5), cmd.output())
        .await
        .map_err(|_| "dig timed out".to_string())?
        .map_err(|e| format!("dig: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.starts_with(";;") {
        return Err(format!("dig {query:?}: {text}{}", String::from_utf8_lossy(&out.stderr)));
    }
    let mut lines: Vec<String> =
        text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
    lines.sort();
    Ok(lines)
}

/// A socket address from an IP text and a port.
pub fn socket_addr(ip: &str, port: u16) -> Result<SocketAddr, String> {
    let ip: IpAddr = ip.parse().map_err(|e| format!("bad address {ip}: {e}"))?;
    Ok(SocketAddr::new(ip, port))
}

/// Why IPVS cannot be used here, in one line (this kernel has no IPVS): what
/// /proc/net/ip_vs and `ipvsadm -L -n` say.
pub fn ipvs_unavailable_reason() -> Option<String> {
    if Path::new("/proc/net/ip_vs").exists() {
        return None;
    }
    let ipvsadm = match run("ipvsadm", &["-L", "-n"]) {
        Ok(_) => "ipvsadm -L -n succeeded".to_string(),
        Err(DatapathError::Command { stderr, .. }) if stderr.contains("No such file or directory") => {
            "ipvsadm is not installed".to_string()
        }
        Err(DatapathError::Command { stderr, .. }) => format!("ipvsadm -L -n: {stderr}"),
        Err(e) => e.to_string(),
    };
    Some(format!("/proc/net/ip_vs does not exist (no ip_vs module in this kernel); {ipvsadm}"))
}

/// Path of a sibling binary of this test/bench executable's crate (e.g. `echo-server`),
/// built by cargo into the same target directory.
pub fn sibling_bin(name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!("SVCPLANE_{}_BIN", name.to_uppercase().replace('-', "_"))) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // tests live in target/<profile>/deps/, binaries in target/<profile>/.
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Where CoreDNS listens inside the node namespace.
pub const COREDNS_PORT: u16 = 53;
/// kube-proxy's health endpoint inside the node namespace (its own namespace, so the
/// fixed port cannot collide with anything).
const KUBE_PROXY_HEALTHZ: &str = "127.0.0.1:10256";

impl Network {
    /// Starts kube-proxy (nftables mode) in the node namespace as Node `node_name`,
    /// authenticating with `kubeconfig`, and waits until its /healthz answers 200
    /// (rules programmed once). `name` names the process and its log.
    pub async fn start_kube_proxy(
        &self,
        name: &str,
        kubeconfig: &Path,
        node_name: &str,
    ) -> Result<(), String> {
        let bin = crate::bin_dir().join("kube-proxy");
        if !bin.is_file() {
            return Err(format!(
                "{} not found: build it with `bash e2e/controlplane/build.sh --with-proxy --with-coredns` (make test-datapath does)",
                bin.display()
            ));
        }
        let args: Vec<String> = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            "--proxy-mode=nftables".into(),
            format!("--hostname-override={node_name}"),
            format!("--cluster-cidr={POD_CIDRS}"),
            format!("--healthz-bind-address={KUBE_PROXY_HEALTHZ}"),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            // Leave the machine's conntrack settings alone (they are not per namespace).
            "--conntrack-max-per-core=0".into(),
            "--conntrack-tcp-timeout-established=0".into(),
            "--conntrack-tcp-timeout-close-wait=0".into(),
            "--v=2".into(),
        ];
        self.spawn(name, &self.node_netns, &bin, &args).map_err(|e| e.to_string())?;
        let healthz = socket_addr("127.0.0.1", 10256)?;
        crate::wait::poll_until(Duration::from_secs(60), Duration::from_millis(200), || async {
            if let Some(status) = self.exited(name) {
                return Err(format!("kube-proxy exited: {status}"));
            }
            Ok(http_get_path_from(&self.node_netns, healthz, "/healthz", Duration::from_secs(1))
                .await
                .is_ok())
        })
        .await
        .map_err(|e| {
            self.keep(format!("kube-proxy not healthy: {e}; log: {}", self.log_path(name).display()))
        })
    }

    /// Starts CoreDNS in the node namespace serving `cluster.local` from the
    /// apiserver in `kubeconfig` (kubernetes plugin), on [`COREDNS_PORT`], and waits
    /// until its `ready` plugin answers 200 (the plugin has synced).
    pub async fn start_coredns(&self, name: &str, kubeconfig: &Path) -> Result<(), String> {
        let bin = crate::bin_dir().join("coredns");
        if !bin.is_file() {
            return Err(format!(
                "{} not found: build it with `bash e2e/controlplane/build.sh --with-proxy --with-coredns` (make test-datapath does)",
                bin.display()
            ));
        }
        let corefile = self.dir.join(format!("{name}.Corefile"));
        fs::write(
            &corefile,
            format!(
                ".:{COREDNS_PORT} {{\n    errors\n    ready 127.0.0.1:8181\n    kubernetes cluster.local in-addr.arpa ip6.arpa {{\n        kubeconfig {} svcplane-test\n        pods insecure\n        ttl 0\n    }}\n}}\n",
                kubeconfig.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let args = vec!["-conf".to_string(), corefile.display().to_string()];
        self.spawn(name, &self.node_netns, &bin, &args).map_err(|e| e.to_string())?;
        let ready = socket_addr("127.0.0.1", 8181)?;
        crate::wait::poll_until(Duration::from_secs(60), Duration::from_millis(200), || async {
            if let Some(status) = self.exited(name) {
                return Err(format!("coredns exited: {status}"));
            }
            Ok(http_get_path_from(&self.node_netns, ready, "/ready", Duration::from_secs(1)).await.is_ok())
        })
        .await
        .map_err(|e| self.keep(format!("coredns not ready: {e}; log: {}", self.log_path(name).display())))
    }

    /// Starts `echo-server` (at `bin`) in `pod`'s namespace answering with `name` on
    /// the TCP and UDP ports, and waits until it answers on the first TCP port.
    pub async fn start_echo_server(
        &self,
        bin: &Path,
        pod: &PodNet,
        name: &str,
        tcp: &[u16],
        udp: &[u16],
    ) -> Result<(), String> {
        let mut args = vec!["--name".to_string(), name.to_string()];
        for p in tcp {
            args.extend(["--tcp".to_string(), p.to_string()]);
        }
        for p in udp {
            args.extend(["--udp".to_string(), p.to_string()]);
        }
        let proc_name = format!("echo-{name}-{}", pod.netns);
        self.spawn(&proc_name, &pod.netns, bin, &args).map_err(|e| e.to_string())?;
        let Some(&port) = tcp.first() else { return Ok(()) };
        let addr = socket_addr(&pod.ipv4, port)?;
        crate::wait::poll_until(Duration::from_secs(20), Duration::from_millis(50), || async {
            if let Some(status) = self.exited(&proc_name) {
                return Err(format!("echo-server exited: {status}"));
            }
            Ok(http_get_from(&self.node_netns, addr, Duration::from_secs(1)).await.as_deref() == Ok(name))
        })
        .await
        .map_err(|e| format!("echo-server {name} not answering on {addr}: {e}"))
    }
}
