//! What a real cluster changes on the machine outside its folder, and how all of it is
//! removed: the apiserver's address on `lo` (this kernel has no dummy links), routes to each node's Pod CIDR,
//! `net.ipv4.ip_forward`, node network namespaces and the `cni-*` ones containerd
//! makes, one cgroup per node in every v1 hierarchy, kubelet's and containerd's mounts,
//! and every process started for it.
//!
//! [`teardown`] needs nothing but the cluster's folder: it finds processes by the
//! folder in their command line and by the nodes' cgroups, so it also clears what a
//! run that died (or `make cluster`, whose starter exited) left behind.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::datapath::{DatapathError, run};

/// Prefix of node network namespaces, node names and cgroups.
pub const NODE_PREFIX: &str = "svcplane-node";
/// The address kube-apiserver binds: reachable from every node namespace through its
/// default route, never an address of the machine's real interfaces.
pub const API_ADDRESS: &str = "172.30.0.1";

/// Root-namespace end of node `index`'s veth.
pub fn root_link(index: usize) -> String {
    format!("svcpc{index}")
}

/// Mount points of every cgroup v1 hierarchy (`/sys/fs/cgroup/cpu`, ...).
pub fn cgroup_v1_mounts() -> Vec<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup").then(|| PathBuf::from(mount))
        })
        .collect()
}

/// Creates `/NAME` in every v1 hierarchy (the node kubelet's `cgroupRoot`); cpuset
/// children need the parent's cpus and mems before a task can join.
pub fn create_node_cgroups(name: &str) -> Result<(), DatapathError> {
    for mount in cgroup_v1_mounts() {
        let dir = mount.join(name);
        fs::create_dir_all(&dir).map_err(|e| DatapathError::Setup(format!("{}: {e}", dir.display())))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = fs::read_to_string(mount.join(file)) {
                let _ = fs::write(dir.join(file), value.trim());
            }
        }
    }
    Ok(())
}

/// Adds the apiserver's address on `lo` and turns on forwarding (recording the
/// machine's previous value, which [`teardown`] restores).
pub fn create_api_link(root: &Path) -> Result<(), DatapathError> {
    let previous = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_else(|_| "0".into());
    fs::write(root.join("ip_forward.orig"), previous.trim())
        .map_err(|e| DatapathError::Setup(e.to_string()))?;
    run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    run("ip", &["addr", "add", &format!("{API_ADDRESS}/32"), "dev", "lo"]).map(|_| ())
}

/// Stops and removes everything the cluster in `root` made on this machine. Safe to
/// call on a half-built or already removed cluster. Logs are moved to a kept folder
/// (returned) when `root/KEEP` exists.
pub fn teardown(root: &Path) -> Option<PathBuf> {
    kill_everything(root);
    unmount_under(root);
    for netns in list_netns() {
        let stale_cni = netns.starts_with("cni-")
            && run("ip", &["netns", "pids", &netns]).is_ok_and(|p| p.trim().is_empty());
        if netns.starts_with(NODE_PREFIX) || stale_cni {
            let _ = run("ip", &["netns", "delete", &netns]);
        }
    }
    let _ = run("ip", &["addr", "del", &format!("{API_ADDRESS}/32"), "dev", "lo"]);
    for link in list_links() {
        if link.starts_with("svcpc") {
            let _ = run("ip", &["link", "delete", &link]);
        }
    }
    for mount in cgroup_v1_mounts() {
        if let Ok(entries) = fs::read_dir(&mount) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(NODE_PREFIX) {
                    remove_cgroup_tree(&entry.path());
                }
            }
        }
    }
    if let Ok(previous) = fs::read_to_string(root.join("ip_forward.orig")) {
        let _ = run("sysctl", &["-qw", &format!("net.ipv4.ip_forward={}", previous.trim())]);
    }
    let kept = root.join("KEEP").exists().then(|| {
        let kept = PathBuf::from(format!("{}-logs-{}", root.display(), std::process::id()));
        let _ = fs::rename(root.join("logs"), &kept);
        let _ = fs::rename(root.join("controlplane/logs"), kept.join("controlplane"));
        kept
    });
    let _ = fs::remove_dir_all(root);
    kept
}

/// Kills, until none is left (or 30 s pass): every process whose command line names
/// `root` (control plane, containerd, shims, kubelet, kube-proxy) and every process in
/// a node's cgroups (the containers). kubelet goes first so it restarts nothing.
fn kill_everything(root: &Path) {
    // Every process of the cluster names a file inside the folder (`ROOT/...`); a bare
    // prefix match could hit another folder that starts the same way.
    let root = format!("{}/", root.to_string_lossy().trim_end_matches('/'));
    // Never this process or its parent (a shell that may name the folder).
    let me = [std::process::id(), std::os::unix::process::parent_id()];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut pids = processes_naming(&root, me);
        let (kubelets, others): (Vec<_>, Vec<_>) =
            pids.drain(..).partition(|(_, cmd)| cmd.contains("kubelet"));
        for (pid, _) in kubelets {
            kill(pid);
        }
        let mut left = others.len();
        for pid in node_cgroup_pids() {
            kill(pid);
            left += 1;
        }
        for (pid, _) in others {
            kill(pid);
        }
        if left == 0 || Instant::now() > deadline {
            return;
        }
        // Not synchronisation of a test: waiting for killed processes to be reaped.
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn kill(pid: u32) {
    let _ = run("kill", &["-9", &pid.to_string()]);
}

/// Processes (other than `me`) whose command line contains `needle`.
pub(crate) fn processes_naming(needle: &str, me: [u32; 2]) -> Vec<(u32, String)> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !me.contains(pid))
        .filter_map(|pid| {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(needle).then_some((pid, cmd))
        })
        .collect()
}

/// Every task in any node's cgroups, in every hierarchy.
pub(crate) fn node_cgroup_pids() -> Vec<u32> {
    fn walk(dir: &Path, out: &mut Vec<u32>) {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), out);
                }
            }
        }
    }
    let mut pids = Vec::new();
    for mount in cgroup_v1_mounts() {
        if let Ok(entries) = fs::read_dir(&mount) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(NODE_PREFIX) {
                    walk(&entry.path(), &mut pids);
                }
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Lazily unmounts every mount at or under `root` (kubelet's root-dir, Pod volumes,
/// containerd's overlay and shm mounts), deepest first.
fn unmount_under(root: &Path) {
    let prefix = root.to_string_lossy().into_owned();
    for _ in 0..5 {
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut points: Vec<String> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .map(|p| p.replace("\\040", " "))
            .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
            .collect();
        if points.is_empty() {
            return;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        points.dedup();
        for point in points {
            let _ = run("umount", &["-l", &point]);
        }
    }
}

fn list_netns() -> Vec<String> {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn list_links() -> Vec<String> {
    run("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect()
}

/// Resident memory of every process of the cluster in `root`, summed by program
/// (`kube-apiserver`, `kubelet`, `containerd-shim-runc-v2`, `svcplane`, ...): (name,
/// processes, KiB), largest first.
pub fn rss_by_program(root: &Path) -> Vec<(String, usize, u64)> {
    let root = format!("{}/", root.to_string_lossy().trim_end_matches('/'));
    let mut pids: Vec<u32> = processes_naming(&root, [0, 0]).into_iter().map(|(pid, _)| pid).collect();
    pids.extend(node_cgroup_pids());
    pids.sort_unstable();
    pids.dedup();
    let mut totals: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for pid in pids {
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim);
        let name = field("Name:").unwrap_or("?").to_string();
        let kib = field("VmRSS:").and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0);
        let entry = totals.entry(name).or_default();
        entry.0 += 1;
        entry.1 += kib;
    }
    let mut rows: Vec<(String, usize, u64)> = totals.into_iter().map(|(n, (c, k))| (n, c, k)).collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.2));
    rows
}
