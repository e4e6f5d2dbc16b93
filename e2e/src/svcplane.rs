//! Runs the `svcplane` binary against a test control plane, as a child process:
//! tests exercise the real binary (flags, leader election, shutdown) and can kill
//! and restart it.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{controlplane::ControlPlane, ports::free_port, wait::poll_until};

/// A running `svcplane` process; killed on drop.
pub struct Svcplane {
    child: Child,
    /// Address of /metrics.
    pub metrics: String,
    /// Address of /healthz and /readyz.
    pub health: String,
    /// Its log file.
    pub log: PathBuf,
}

/// The `svcplane` binary: `$SVCPLANE_BIN`, else `<target>/debug/svcplane` of this
/// workspace (`make test` builds it before the tests).
pub fn svcplane_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("SVCPLANE_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug/svcplane")
}

impl ControlPlane {
    /// Starts `svcplane run <args>` with the admin kubeconfig and waits for /readyz.
    /// `name` names its log file.
    pub async fn svcplane(&self, name: &str, args: &[&str]) -> Svcplane {
        self.svcplane_with_kubeconfig(name, &self.kubeconfig_path, args).await
    }

    /// Like [`ControlPlane::svcplane`], authenticating with `kubeconfig` (e.g. a
    /// ServiceAccount token, to prove RBAC).
    pub async fn svcplane_with_kubeconfig(
        &self,
        name: &str,
        kubeconfig: &std::path::Path,
        args: &[&str],
    ) -> Svcplane {
        let bin = svcplane_bin();
        assert!(
            bin.is_file(),
            "{} not found: build it with `cargo build --bin svcplane` (make test does)",
            bin.display()
        );
        let metrics = format!("127.0.0.1:{}", free_port().expect("port"));
        let health = format!("127.0.0.1:{}", free_port().expect("port"));
        let log = self.log_path(&format!("svcplane-{name}"));
        let out = fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(&bin)
            .arg("run")
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--metrics-bind-address={metrics}"))
            .arg(format!("--health-probe-bind-address={health}"))
            .args(args)
            .env("RUST_LOG", std::env::var("SVCPLANE_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .env("POD_NAME", format!("svcplane-{name}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        self.track_pid(child.id());
        let mut sp = Svcplane { child, metrics, health, log };
        let url = sp.health.clone();
        let log = sp.log.clone();
        let child = &mut sp.child;
        poll_until(Duration::from_secs(60), Duration::from_millis(50), || {
            let exited = child.try_wait().ok().flatten();
            let url = url.clone();
            async move {
                if let Some(status) = exited {
                    return Err(format!("svcplane exited: {status}"));
                }
                Ok(http_get(&url, "/readyz").await.is_some_and(|(code, _)| code == 200))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("svcplane {name} not ready: {e}; log: {}", log.display()));
        sp
    }
}

impl Svcplane {
    /// The process's /metrics text.
    pub async fn metrics_text(&self) -> String {
        http_get(&self.metrics, "/metrics").await.map(|(_, body)| body).unwrap_or_default()
    }

    /// The sum of a metric's samples whose line contains every `filters` substring.
    pub async fn metric_sum(&self, name: &str, filters: &[&str]) -> f64 {
        sum_metric(&self.metrics_text().await, name, filters)
    }

    /// Kills the process with SIGKILL (a crash) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit; returns its status.
    pub async fn terminate(mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let child = &mut self.child;
        let mut status = None;
        let _ = poll_until(timeout, Duration::from_millis(50), || {
            let s = child.try_wait().ok().flatten();
            if s.is_some() {
                status = s;
            }
            async move { Ok(s.is_some()) }
        })
        .await;
        status
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Svcplane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sums the samples of `name` in Prometheus text whose line contains all `filters`.
pub fn sum_metric(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        // An empty f64 sum is -0.0; report it as 0.
        + 0.0
}

/// Plain HTTP GET on loopback: (status, body).
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

/// One svcplane process for the whole test binary (on the shared control plane),
/// started once on its own thread's runtime so it outlives every test's runtime.
/// The first caller's `args` win: a test binary always passes the same ones.
pub fn shared_svcplane(name: &str, args: &[&str]) -> &'static Svcplane {
    static SHARED: std::sync::OnceLock<Svcplane> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        let name = name.to_string();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rt.block_on(crate::shared().svcplane(&name, &args))
        })
        .join()
        .expect("start svcplane")
    })
}
