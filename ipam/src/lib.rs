//! svcplane ipam (see README.md).
