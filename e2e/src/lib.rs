//! svcplane's test harness: a real kube-apiserver + etcd (and optionally
//! kube-controller-manager) on loopback, built from Go modules by
//! `e2e/controlplane/build.sh`, plus helpers for what tests need without a kubelet.
//!
//! The API echoes kube-rs/envtest's shape (a builder → a running control plane with
//! `kubeconfig()` and `client()`, torn down on drop); see e2e/README.md for why
//! svcplane does not use that crate.
//!
//! One control plane per test binary: [`shared`] starts it once; each test builds its
//! own [`kube::Client`] (a client is bound to the tokio runtime that made it, and
//! every `#[tokio::test]` has its own runtime) and works in its own namespace.

pub mod certs;
pub mod cluster;
mod controlplane;
pub mod datapath;
pub mod differential;
pub mod fault;
pub mod fixtures;
pub(crate) mod ports;
pub mod slices;
pub mod svcplane;
pub mod wait;
pub mod webhook;

pub use controlplane::{
    ControlPlane, ControlPlaneOptions, DEFAULT_NODE_PORT_RANGE, DEFAULT_SERVICE_CIDRS, HarnessError,
    KubeconfigAuth, bin_dir, kubernetes_version, shared, shared_with,
};
pub use fixtures::TestNamespace;
