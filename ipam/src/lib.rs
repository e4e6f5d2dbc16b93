//! svcplane ipam: bitmap allocators for Service ClusterIPs and NodePorts.
//!
//! Pure library: no Kubernetes client and no Kubernetes types, no I/O. The
//! webhook and the repair loop build on it and own persistence and the API.
//!
//! - [`bitmap`]: the dense bitmap and upstream's two-band random scan.
//! - [`range`]: [`ClusterIpAllocator`] over a CIDR, bands and size caps.
//! - [`ports`]: [`NodePortAllocator`] over a [`PortRange`].
//! - [`assign`]: the nodePorts and healthCheckNodePort of one Service.
//! - [`dualstack`]: kube-apiserver's ipFamilyPolicy decision table.
//! - [`error`]: the crate error, [`IpamError`].

pub mod allocator;
pub mod assign;
pub mod bitmap;
pub mod dualstack;
pub mod error;
pub mod ports;
pub mod range;

pub use allocator::{Allocator, Pool};
pub use assign::{
    NodePortAssignment, NodePortError, NodePortNeeds, Protocol, ServicePort, assign_node_ports,
};
pub use bitmap::{Bitmap, InvalidSnapshot, Snapshot};
pub use dualstack::{
    FamilyPlan, FieldError, FieldErrorKind, IpFamily, IpFamilyPolicy, ServiceInvalid, ServiceIpFields,
    plan_ip_families,
};
pub use error::IpamError;
pub use ports::{NodePortAllocator, PortRange, port_static_band};
pub use range::{ClusterIpAllocator, IpPool, ip_static_band, upstream_range_size};
