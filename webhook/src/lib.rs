//! svcplane's admission webhook (in progress; see README.md).

use std::future::Future;

/// Flags of the webhook role (flattened into `svcplane run`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct WebhookArgs {}

/// Why the webhook stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not built yet.
    #[error("the webhook is not implemented yet")]
    NotImplemented,
}

/// Serves the webhook until `shutdown` resolves.
pub async fn run(
    _args: WebhookArgs,
    _client: kube::Client,
    _shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    Err(Error::NotImplemented)
}
