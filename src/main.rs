//! `svcplane`: one binary for every role. `svcplane run` starts the controllers, the
//! admission webhook and the repair loop as flags choose; the other subcommands are
//! operator tools.

mod admin;
mod cli;
mod lease;

use std::{
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

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
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Roles to run: any of controller, webhook, repair.
    #[arg(long, value_delimiter = ',', default_value = "controller")]
    roles: Vec<String>,
    /// Hold a coordination.k8s.io Lease before writing (controllers and repair).
    #[arg(long, default_value_t = false)]
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
    let client = client(kubeconfig).await?;
    let mut registry = Registry::default();
    let metrics =
        svcplane_controller::metrics::Metrics::register(registry.sub_registry_with_prefix("svcplane"));
    let ready = Arc::new(AtomicBool::new(!args.roles.iter().any(|r| r == "controller")));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let admin = admin::serve(
        &args.metrics_bind_address,
        &args.health_probe_bind_address,
        registry,
        ready.clone(),
        stopped(),
    )
    .await?;

    // Without leader election this process always leads; the sender lives as long
    // as `run` so the channel never reads as closed (a lost lease).
    let (_always_leader, always_leader_rx) = watch::channel(true);
    let leader = if args.leader_elect {
        let namespace = args.leader_election_namespace.clone().unwrap_or_else(|| "default".into());
        lease::acquire(client.clone(), &namespace, &args.leader_election_id).await?
    } else {
        always_leader_rx
    };

    let mut tasks = tokio::task::JoinSet::new();
    if args.roles.iter().any(|r| r == "controller") {
        let (client, leader, ready, stop) = (client.clone(), leader.clone(), ready.clone(), stopped());
        let controller_args = args.controller.clone();
        tasks.spawn(async move {
            svcplane_controller::run::run(controller_args, client, metrics, leader, ready, stop)
                .await
                .context("controller")
        });
    }
    if args.roles.iter().any(|r| r == "webhook") {
        let (client, stop) = (client.clone(), stopped());
        let webhook_args = args.webhook.clone();
        tasks
            .spawn(async move { svcplane_webhook::run(webhook_args, client, stop).await.context("webhook") });
    }

    if args.roles.iter().any(|r| r == "repair") {
        // Only the leader repairs; losing the lease ends the process (see lease.rs).
        let (client, mut leader, stop) = (client.clone(), leader.clone(), stopped());
        let webhook_args = args.webhook.clone();
        tasks.spawn(async move {
            if leader.wait_for(|l| *l).await.is_err() {
                return Ok(());
            }
            tracing::info!("leading: starting the IPAM repair loop");
            svcplane_webhook::run_repair(webhook_args, client, stop).await.context("repair")
        });
    }

    let result = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        Some(done) = tasks.join_next() => match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.into()),
        },
    };
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    admin.abort();
    result
}
