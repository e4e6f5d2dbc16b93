//! Operator tools: `svcplane explain`, `svcplane dns`, `svcplane ipam` and
//! `svcplane shadow report`.
//!
//! Read-only: each command lists what it needs from the API once, computes its
//! answer with the same code the controllers and the webhook use, and prints a
//! kubectl-style table or, with `-o json|yaml`, the same report as data.
//!
//! The binary is also the kubectl plugin `kubectl-svcplane`: kubectl runs
//! `kubectl-svcplane <args>` for `kubectl svcplane <args>`, and clap ignores the
//! name the binary was invoked as, so a symlink with that name behaves the same.

pub mod dns;
pub mod explain;
pub mod ipam;
pub mod shadow;

mod table;

use anyhow::Context as _;
use serde::Serialize;

/// How a report is printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned columns, as kubectl prints.
    #[default]
    Table,
    /// The report as JSON.
    Json,
    /// The report as YAML.
    Yaml,
}

/// Flags every operator command shares.
#[derive(clap::Args, Clone, Debug)]
pub struct CommonArgs {
    /// Namespace of the Service; default: the kubeconfig context's namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

impl CommonArgs {
    /// The namespace to use: the flag, else the client's default (the context's).
    fn namespace(&self, client: &kube::Client) -> String {
        self.namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned())
    }
}

/// Parses `svc/NAME`, `service/NAME`, `services/NAME` or a bare `NAME`.
pub fn parse_service_ref(text: &str) -> anyhow::Result<String> {
    let name = match text.split_once('/') {
        None => text,
        Some(("svc" | "service" | "services" | "service.v1" | "services.v1", name)) => name,
        Some((kind, _)) => anyhow::bail!("{text:?} is a {kind}, expected svc/NAME"),
    };
    anyhow::ensure!(!name.is_empty(), "empty Service name in {text:?}");
    Ok(name.to_owned())
}

/// The Service named by `service_ref` (`svc/NAME`) in the chosen namespace, with
/// that namespace.
async fn fetch_service(
    client: &kube::Client,
    common: &CommonArgs,
    service_ref: &str,
) -> anyhow::Result<(String, k8s_openapi::api::core::v1::Service)> {
    let name = parse_service_ref(service_ref)?;
    let namespace = common.namespace(client);
    let svc = kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &namespace)
        .get(&name)
        .await
        .with_context(|| format!("getting Service {namespace}/{name}"))?;
    Ok((namespace, svc))
}

/// Prints `report` as the chosen format; `table` renders the human form.
fn emit<T: Serialize>(
    format: OutputFormat,
    report: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let text = match format {
        OutputFormat::Table => table(report),
        OutputFormat::Json => serde_json::to_string_pretty(report).context("encoding JSON")? + "\n",
        OutputFormat::Yaml => serde_yaml::to_string(report).context("encoding YAML")?,
    };
    print!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_refs_accept_kubectl_spellings_and_refuse_other_kinds() {
        assert_eq!(parse_service_ref("svc/web").unwrap(), "web");
        assert_eq!(parse_service_ref("services/web").unwrap(), "web");
        assert_eq!(parse_service_ref("web").unwrap(), "web");
        assert!(parse_service_ref("pod/web").is_err());
        assert!(parse_service_ref("svc/").is_err());
    }
}
