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
    /// Runs `<bin> --kubeconfig=<admin> <args>` (a CLI subcommand, or the
    /// kubectl plugin name of the binary): (success, stdout, stderr).
    pub fn run_cli(&self, bin: &std::path::Path, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(bin)
            .arg(format!("--kubeconfig={}", self.kubeconfig_path.display()))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

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
    /// The process's /metrics text. Panics with the address and the error when
    /// the scrape fails: an unreachable endpoint is never read as "no samples".
    pub async fn metrics_text(&self) -> String {
        scrape_metrics(&self.metrics).await
    }

    /// The sum of a metric's samples whose line contains every `filters` substring;
    /// panics when the scrape fails or the metric is not exposed (see [`sum_metric`]).
    pub async fn metric_sum(&self, name: &str, filters: &[&str]) -> f64 {
        sum_metric(&self.metrics_text().await, name, filters)
    }

    /// Waits until metric `name` (samples matching `filters`) has not changed for
    /// `quiet`, polling with a 30 s deadline, and returns its value; panics, naming
    /// `what`, while it still grows (a hot loop). Choose `quiet` longer than any
    /// retry that may legitimately still be pending.
    pub async fn metric_settles(&self, what: &str, name: &str, filters: &[&str], quiet: Duration) -> f64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (mut value, mut since) = (self.metric_sum(name, filters).await, std::time::Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.metric_sum(name, filters).await;
            if now != value {
                (value, since) = (now, std::time::Instant::now());
            } else if since.elapsed() >= quiet {
                return value;
            }
            assert!(std::time::Instant::now() < deadline, "{what} still growing after 30s (now {value})");
        }
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
///
/// Panics, naming the metric and the filters, when the text does not expose the
/// metric at all (see [`try_sum_metric`]): a misspelt name, a role that is not
/// running or a scrape of the wrong process fails the test instead of reading 0.
pub fn sum_metric(text: &str, name: &str, filters: &[&str]) -> f64 {
    try_sum_metric(text, name, filters).unwrap_or_else(|| {
        panic!("metric {name} (filters {filters:?}) is not exposed: no sample and no `# TYPE` line for it")
    })
}

/// Like [`sum_metric`], `None` when the text does not expose `name`: neither a
/// sample of it nor a `# TYPE` line of its family. A declared family without a
/// matching sample sums to 0, which is what a labelled counter reads before its
/// first increment (prometheus-client prints its `# TYPE` line from registration).
pub fn try_sum_metric(text: &str, name: &str, filters: &[&str]) -> Option<f64> {
    let samples: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .collect();
    if samples.is_empty() && !declares_family_of(text, name) {
        return None;
    }
    Some(
        samples
            .iter()
            .filter(|l| filters.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            // An empty f64 sum is -0.0; report it as 0.
            + 0.0,
    )
}

/// Whether a `# TYPE <family> ...` line declares the family that sample `name`
/// belongs to: the family itself, or it plus a suffix the exposition formats add
/// (`_total` of an OpenMetrics counter, `_count`/`_sum`/`_bucket` of a histogram).
fn declares_family_of(text: &str, name: &str) -> bool {
    const SUFFIXES: [&str; 6] = ["", "_total", "_count", "_sum", "_bucket", "_created"];
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .any(|family| name.strip_prefix(family).is_some_and(|suffix| SUFFIXES.contains(&suffix)))
}

/// GET /metrics on `addr`; panics with the address and the error (connection,
/// timeout or a status other than 200).
pub async fn scrape_metrics(addr: &str) -> String {
    match try_http_get(addr, "/metrics").await {
        Ok((200, body)) => body,
        Ok((code, body)) => panic!("GET http://{addr}/metrics answered {code}: {body}"),
        Err(error) => panic!("GET http://{addr}/metrics failed: {error}"),
    }
}

/// Plain HTTP GET on loopback: (status, body), `None` on any error.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    try_http_get(addr, path).await.ok()
}

/// Plain HTTP GET on loopback: (status, body), or what failed.
pub async fn try_http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .map_err(|_| "no complete answer within 5s".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((code, body))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// As prometheus-client prints a registry: a labelled counter family that
    /// has never been incremented, one that has, and a histogram.
    const TEXT: &str = "\
# HELP svcplane_changes Objects written, by operation.
# TYPE svcplane_changes counter
# HELP svcplane_syncs Reconciles of one Service, by result.
# TYPE svcplane_syncs counter
svcplane_syncs_total{controller=\"endpointslice\",result=\"success\"} 3
svcplane_syncs_total{controller=\"endpoints\",result=\"success\"} 2
# TYPE svcplane_sync_duration_seconds histogram
svcplane_sync_duration_seconds_sum{controller=\"endpoints\"} 0.5
svcplane_sync_duration_seconds_count{controller=\"endpoints\"} 2
# EOF
";

    #[test]
    fn a_declared_family_without_samples_sums_to_zero() {
        assert_eq!(sum_metric(TEXT, "svcplane_changes_total", &[]), 0.0);
        assert_eq!(sum_metric(TEXT, "svcplane_syncs_total", &["controller=\"mirroring\""]), 0.0);
    }

    #[test]
    fn samples_are_summed_by_filter() {
        assert_eq!(sum_metric(TEXT, "svcplane_syncs_total", &[]), 5.0);
        assert_eq!(sum_metric(TEXT, "svcplane_syncs_total", &["controller=\"endpoints\""]), 2.0);
        assert_eq!(sum_metric(TEXT, "svcplane_sync_duration_seconds_count", &[]), 2.0);
    }

    #[test]
    #[should_panic(expected = "metric svcplane_chnages_total (filters [\"op\"]) is not exposed")]
    fn a_metric_the_text_does_not_expose_fails_instead_of_reading_zero() {
        sum_metric(TEXT, "svcplane_chnages_total", &["op"]);
    }

    #[test]
    fn an_empty_scrape_exposes_nothing() {
        assert_eq!(try_sum_metric("", "svcplane_changes_total", &[]), None);
        // A family's name is not a prefix match: svcplane_sync is not declared.
        assert_eq!(try_sum_metric(TEXT, "svcplane_sync_total", &[]), None);
    }

    #[tokio::test]
    #[should_panic(expected = "/metrics failed: connect")]
    async fn scraping_a_closed_metrics_port_fails_with_its_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        scrape_metrics(&addr).await;
    }
}
