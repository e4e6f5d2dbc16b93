//! `svcplane`: one binary for every role. `svcplane run` starts the controllers, the
//! admission webhook and the repair loop as flags choose; the other subcommands are
//! operator tools.

mod admin;
mod cli;
mod lease;

use std::{
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context as _;
use clap::{ArgAction, Parser, Subcommand};
use prometheus_client::registry::Registry;
use svcplane_webhook::{WebhookServer, metrics::Metrics as WebhookMetrics};

#[derive(Parser, Debug)]
#[command(
    name = "svcplane",
    version,
    about = "Kubernetes service control plane: EndpointSlices, Endpoints, ClusterIP/NodePort IPAM"
)]
struct Cli {
    /// Path to a kubeconfig; default: in-cluster config, then $KUBECONFIG, then ~/.kube/config.
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controllers, webhook and/or repair loop.
    Run(Box<RunArgs>),
    /// Explain which Pods are endpoints of a Service, and why the others are not.
    Explain(cli::explain::ExplainArgs),
    /// Print the DNS records CoreDNS serves for a Service.
    Dns(cli::dns::DnsArgs),
    /// ClusterIP and NodePort pools: usage, and who holds a value.
    Ipam(cli::ipam::IpamArgs),
    /// Before a take-over: does svcplane agree with kube-controller-manager's endpoints?
    Shadow(cli::shadow::ShadowArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Roles to run: any of controller, webhook, repair.
    #[arg(long, value_delimiter = ',', default_value = "controller")]
    roles: Vec<String>,
    /// Hold a coordination.k8s.io Lease before writing (controllers and repair).
    /// Like every boolean flag: `--leader-elect` alone or `=true`, or `=false`.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader-election Lease; default: this Pod's namespace, else "default".
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "svcplane")]
    leader_election_id: String,
    /// Address of /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_bind_address: String,
    /// Address of /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8081")]
    health_probe_bind_address: String,
    /// With the webhook role: after SIGTERM, how long /readyz answers 503 while
    /// the webhook still serves, so the replica leaves the Service's endpoints
    /// before it stops (0s: no drain).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_drain: Duration,
    #[command(flatten)]
    controller: svcplane_controller::run::ControllerArgs,
    #[command(flatten)]
    webhook: svcplane_webhook::WebhookArgs,
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_lease_manager=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The client configuration: `--kubeconfig`, else in-cluster, $KUBECONFIG, ~/.kube/config.
async fn config(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Config> {
    Ok(match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await.context("no kubeconfig and not in a cluster")?,
    })
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    Ok(kube::Client::try_from(config(kubeconfig).await?)?)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    match cli.command {
        Command::Run(args) => run(*args, cli.kubeconfig.as_ref()).await,
        Command::Explain(args) => cli::explain::run(args, client(cli.kubeconfig.as_ref()).await?).await,
        Command::Dns(args) => cli::dns::run(args, client(cli.kubeconfig.as_ref()).await?).await,
        Command::Ipam(args) => cli::ipam::run(args, client(cli.kubeconfig.as_ref()).await?).await,
        Command::Shadow(args) => cli::shadow::run(args, client(cli.kubeconfig.as_ref()).await?).await,
    }
}

async fn run(args: RunArgs, kubeconfig: Option<&PathBuf>) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), roles = ?args.roles, "starting svcplane");
    for role in &args.roles {
        anyhow::ensure!(
            ["controller", "webhook", "repair"].contains(&role.as_str()),
            "unknown role {role:?} (expected controller, webhook or repair)"
        );
    }
    let has = |role: &str| args.roles.iter().any(|r| r == role);
    let client = client(kubeconfig).await?;

    // One registry for every role, served on --metrics-bind-address.
    let mut registry = Registry::default();
    let metrics = svcplane_controller::metrics::Metrics::register(&mut registry);
    let webhook_metrics = Arc::new(if has("webhook") || has("repair") {
        WebhookMetrics::register(registry.sub_registry_with_prefix(svcplane_webhook::metrics::PREFIX))
    } else {
        WebhookMetrics::register(&mut Registry::default())
    });

    let controller_synced = Arc::new(AtomicBool::new(false));
    let webhook = if has("webhook") {
        let server =
            WebhookServer::start_with_metrics(&args.webhook, client.clone(), webhook_metrics.clone())
                .await
                .context("webhook")?;
        Some(server)
    } else {
        None
    };
    let readiness = Arc::new(admin::Readiness::new(
        has("controller").then(|| controller_synced.clone()),
        webhook.as_ref().map(|server| server.allocator.ready_signal()),
    ));
    // The admin endpoints serve until the process exits: /readyz says 503
    // throughout the shutdown.
    let admin = admin::serve(
        &args.metrics_bind_address,
        &args.health_probe_bind_address,
        registry,
        readiness.clone(),
        std::future::pending(),
    )
    .await?;

    let mut election = if args.leader_elect {
        let namespace = args.leader_election_namespace.clone().unwrap_or_else(|| "default".into());
        lease::LeaderElection::start(client.clone(), &namespace, &args.leader_election_id).await?
    } else {
        lease::LeaderElection::always_leader()
    };
    let leader = election.leader();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    if has("controller") {
        let (client, leader, synced, stop) = (client.clone(), leader.clone(), controller_synced, stopped());
        let controller_args = args.controller.clone();
        tasks.spawn(async move {
            svcplane_controller::run::run(controller_args, client, metrics, leader, synced, stop)
                .await
                .context("controller")
        });
    }
    if let Some(server) = webhook {
        let stop = stopped();
        tasks.spawn(async move {
            stop.await;
            // In-flight reviews finish; new connections are refused.
            server.shutdown().await;
            Ok(())
        });
    }
    if has("repair") {
        // With --leader-elect only the Lease holder repairs, and losing the Lease
        // ends the process, as for the controllers; without it every replica
        // repairs (the claims' create-if-absent keeps that safe, only wasteful).
        let (client, mut leader, metrics) = (client.clone(), leader.clone(), webhook_metrics.clone());
        let (before_leading, stop) = (stopped(), stopped());
        let webhook_args = args.webhook.clone();
        tasks.spawn(async move {
            tokio::select! {
                led = leader.wait_for(|l| *l) => led.context("repair: the leader election ended")?,
                _ = before_leading => return Ok(()),
            };
            tracing::info!("leading: starting the IPAM repair loop");
            let repair = svcplane_webhook::run_repair_with_metrics(webhook_args, client, metrics, stop);
            tokio::select! {
                done = repair => done.context("repair"),
                _ = leader.wait_for(|l| !*l) => Err(anyhow::anyhow!("repair: lost the leader lease")),
            }
        });
    }

    let mut result = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        Some(done) = tasks.join_next() => task_result(done),
        error = election.died() => Err(error),
    };
    // From here /readyz is 503, so the kubelet takes this replica out of the
    // webhook Service's endpoints while the webhook keeps answering.
    readiness.begin_shutdown();
    if result.is_ok() && has("webhook") && !args.shutdown_drain.is_zero() {
        tracing::info!(drain = ?args.shutdown_drain, "not ready; the webhook serves on during the drain");
        result = tokio::select! {
            _ = tokio::time::sleep(args.shutdown_drain) => Ok(()),
            // A second signal ends the drain early.
            _ = shutdown_signal() => Ok(()),
            Some(done) = tasks.join_next() => task_result(done),
            error = election.died() => Err(error),
        };
    }
    let _ = stop_tx.send(true);
    while let Some(done) = tasks.join_next().await {
        if let Err(error) = task_result(done) {
            if result.is_ok() {
                result = Err(error);
            } else {
                tracing::error!(error = format!("{error:#}"), "while stopping");
            }
        }
    }
    // Only now that nothing writes: the standby takes over at once instead of
    // when the Lease expires.
    if let Err(error) = election.release().await {
        tracing::warn!(error = format!("{error:#}"), "could not release the leader Lease; it will expire");
    }
    admin.abort();
    result
}

/// The outcome of a finished role task.
fn task_result(done: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match done {
        Ok(result) => result,
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::{CommandFactory, Parser};

    use super::{Cli, Command, RunArgs};

    fn run_args(flags: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = ["svcplane", "run"].iter().chain(flags);
        match Cli::try_parse_from(argv)?.command {
            Command::Run(args) => Ok(*args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn leader_elect_takes_true_or_false_and_alone_means_true() {
        assert!(!run_args(&[]).unwrap().leader_elect);
        assert!(run_args(&["--leader-elect"]).unwrap().leader_elect);
        assert!(run_args(&["--leader-elect=true"]).unwrap().leader_elect);
        assert!(!run_args(&["--leader-elect=false"]).unwrap().leader_elect);
        // A bare flag does not swallow the next one.
        let args = run_args(&["--leader-elect", "--roles=webhook"]).unwrap();
        assert!(args.leader_elect);
        assert_eq!(args.roles, ["webhook"]);
        assert!(run_args(&["--leader-elect=maybe"]).is_err());
    }

    #[test]
    fn the_webhook_booleans_take_true_or_false_and_alone_mean_true() {
        let defaults = run_args(&[]).unwrap().webhook;
        assert!(!defaults.self_signed);
        assert!(defaults.release_on_delete);
        assert!(run_args(&["--webhook-self-signed"]).unwrap().webhook.self_signed);
        assert!(!run_args(&["--webhook-self-signed=false"]).unwrap().webhook.self_signed);
        assert!(run_args(&["--webhook-release-on-delete"]).unwrap().webhook.release_on_delete);
        assert!(!run_args(&["--webhook-release-on-delete=false"]).unwrap().webhook.release_on_delete);
    }

    /// Every boolean flag of `svcplane run`, present and future, behaves as a
    /// Kubernetes component's: `--flag`, `--flag=true`, `--flag=false`.
    #[test]
    fn every_boolean_flag_of_run_accepts_an_explicit_value() {
        let cli = Cli::command();
        let run = cli.find_subcommand("run").expect("run subcommand");
        let mut checked = Vec::new();
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            assert!(
                !matches!(arg.get_action(), clap::ArgAction::SetTrue | clap::ArgAction::SetFalse),
                "--{long} is a switch that refuses --{long}=false"
            );
            if arg.get_value_parser().type_id() != std::any::TypeId::of::<bool>() {
                continue;
            }
            for (argv, want) in [
                (format!("--{long}"), true),
                (format!("--{long}=true"), true),
                (format!("--{long}=false"), false),
            ] {
                let matches = Cli::command()
                    .try_get_matches_from(["svcplane", "run", argv.as_str()])
                    .unwrap_or_else(|e| panic!("{argv}: {e}"));
                let got =
                    matches.subcommand_matches("run").and_then(|m| m.get_one::<bool>(arg.get_id().as_str()));
                assert_eq!(got, Some(&want), "{argv}");
            }
            checked.push(long.to_owned());
        }
        checked.sort();
        assert_eq!(checked, ["leader-elect", "webhook-release-on-delete", "webhook-self-signed"]);
    }

    #[test]
    fn duration_flags_take_a_unit() {
        let args = run_args(&[
            "--shutdown-drain=500ms",
            "--min-sync-interval=2m",
            "--burst-batch-delay=1m30s",
            "--webhook-cert-reload-interval=2m",
            "--webhook-repair-interval=500ms",
            "--webhook-repair-grace=90s",
        ])
        .unwrap();
        assert_eq!(args.shutdown_drain, Duration::from_millis(500));
        assert_eq!(args.controller.min_sync_interval, Duration::from_secs(120));
        assert_eq!(args.controller.burst_batch_delay, Duration::from_secs(90));
        assert_eq!(args.webhook.cert_reload_interval, Duration::from_secs(120));
        assert_eq!(args.webhook.repair_interval, Duration::from_millis(500));
        assert_eq!(args.webhook.repair_grace, Duration::from_secs(90));
        // Off is 0s (or a bare 0); any other number needs its unit.
        assert_eq!(
            run_args(&["--burst-batch-delay=0s"]).unwrap().controller.burst_batch_delay,
            Duration::ZERO
        );
        assert_eq!(run_args(&["--shutdown-drain=0"]).unwrap().shutdown_drain, Duration::ZERO);
        for bad in ["--shutdown-drain=5", "--min-sync-interval=soon", "--webhook-repair-grace=-1s"] {
            assert!(run_args(&[bad]).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn the_defaults_are_the_documented_durations() {
        let args = run_args(&[]).unwrap();
        assert_eq!(args.shutdown_drain, Duration::from_secs(5));
        let (controller, webhook) = (&args.controller, &args.webhook);
        let defaults = svcplane_controller::run::ControllerArgs::default();
        assert_eq!(
            (controller.min_sync_interval, controller.burst_batch_delay),
            (defaults.min_sync_interval, defaults.burst_batch_delay)
        );
        assert_eq!(
            (controller.min_sync_interval, controller.burst_batch_delay),
            (Duration::from_millis(250), Duration::from_millis(50))
        );
        assert_eq!(controller.no_ready_endpoints_grace, defaults.no_ready_endpoints_grace);
        assert_eq!(controller.no_ready_endpoints_grace, Duration::from_secs(60));
        let defaults = svcplane_webhook::WebhookArgs::default();
        assert_eq!(
            (webhook.cert_reload_interval, webhook.repair_interval, webhook.repair_grace),
            (defaults.cert_reload_interval, defaults.repair_interval, defaults.repair_grace)
        );
    }

    /// The Deployment and its overlays keep starting: every `--flag` line in
    /// manifests/ is a flag `svcplane run` accepts.
    #[test]
    fn every_flag_the_manifests_pass_is_accepted() {
        fn yaml_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).expect("manifests dir").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    yaml_files(&path, out);
                } else if path.extension().is_some_and(|e| e == "yaml") {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        yaml_files(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests"), &mut files);
        let mut flags = 0;
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read manifest");
            for flag in text.lines().filter_map(|l| l.trim_start().strip_prefix("- --")) {
                let flag = format!("--{flag}");
                run_args(&[&flag]).unwrap_or_else(|e| panic!("{}: {flag}: {e}", file.display()));
                flags += 1;
            }
        }
        assert!(flags >= 10, "found only {flags} flags in manifests/");
    }
}
