//! The one error type of the crate.
//!
//! Messages are lower-case and name the range and the value so a user can act
//! on them ("range 10.96.0.0/16 is full"). [`IpamError::apiserver_detail`]
//! gives kube-apiserver's own wording for callers that must mimic it, since
//! users grep for those strings.

use thiserror::Error;

use crate::bitmap::InvalidSnapshot;

/// Everything an allocator can refuse.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum IpamError {
    /// No free value is left (in the band that was asked for).
    #[error("range {range} is full")]
    Full {
        /// The range, e.g. `10.96.0.0/16` or `30000-32767`.
        range: String,
    },
    /// A static request for a value someone already holds.
    #[error("{value} is already allocated in range {range}")]
    Allocated {
        /// The requested IP or port.
        value: String,
        /// The range it was requested from.
        range: String,
    },
    /// A value outside the allocatable part of the range: outside the CIDR or
    /// port range, the network or IPv4 broadcast address, or beyond the
    /// tracked size of a truncated IPv6 range.
    #[error("{value} is not in range {range}")]
    NotInRange {
        /// The requested IP or port.
        value: String,
        /// The range it was checked against.
        range: String,
    },
    /// A CIDR whose bitmap would exceed the size cap (see README).
    #[error("range {range} is too large: {reason}")]
    RangeTooLarge {
        /// The CIDR as given.
        range: String,
        /// What the cap is and how to stay under it.
        reason: String,
    },
    /// A port range that cannot be parsed or is empty.
    #[error("invalid port range {range:?}: {reason}")]
    InvalidPortRange {
        /// The text as given.
        range: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A range text that is not a CIDR.
    #[error("invalid CIDR {range:?}")]
    InvalidCidr {
        /// The text as given.
        range: String,
    },
    /// A snapshot taken from a different range.
    #[error("snapshot of range {snapshot} does not match range {range}")]
    SnapshotMismatch {
        /// The allocator's range.
        range: String,
        /// The range named in the snapshot.
        snapshot: String,
    },
    /// A snapshot whose data does not fit the range.
    #[error("snapshot of range {range} is corrupt")]
    CorruptSnapshot {
        /// The allocator's range.
        range: String,
        /// Which bit was out of range.
        #[source]
        source: InvalidSnapshot,
    },
}

impl IpamError {
    /// A fixed name for metric labels and Event reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Full { .. } => "Full",
            Self::Allocated { .. } => "AlreadyAllocated",
            Self::NotInRange { .. } => "NotInRange",
            Self::RangeTooLarge { .. } => "RangeTooLarge",
            Self::InvalidPortRange { .. } => "InvalidPortRange",
            Self::InvalidCidr { .. } => "InvalidCidr",
            Self::SnapshotMismatch { .. } => "SnapshotMismatch",
            Self::CorruptSnapshot { .. } => "CorruptSnapshot",
        }
    }

    /// kube-apiserver's detail string for the same failure (v1.37.2
    /// `ipallocator`/`portallocator` errors), for callers that reproduce
    /// apiserver messages. `is_port` picks the NodePort wording.
    pub fn apiserver_detail(&self, is_port: bool) -> String {
        match self {
            Self::Full { .. } => "range is full".to_owned(),
            Self::Allocated { .. } if is_port => "provided port is already allocated".to_owned(),
            Self::Allocated { .. } => "provided IP is already allocated".to_owned(),
            Self::NotInRange { range, .. } if is_port => {
                format!("provided port is not in the valid range. The range of valid ports is {range}")
            }
            Self::NotInRange { value, range } => format!(
                "the provided IP ({value}) is not in the valid range. The range of valid IPs is {range}"
            ),
            Self::SnapshotMismatch { .. } if is_port => {
                "the provided port range does not match the current port range".to_owned()
            }
            Self::SnapshotMismatch { .. } => {
                "the provided network does not match the current range".to_owned()
            }
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_range_and_value() {
        let full = IpamError::Full { range: "10.96.0.0/16".into() };
        assert_eq!(full.to_string(), "range 10.96.0.0/16 is full");
        let out = IpamError::NotInRange { value: "10.96.0.5".into(), range: "10.97.0.0/16".into() };
        assert_eq!(out.to_string(), "10.96.0.5 is not in range 10.97.0.0/16");
        assert_eq!(
            out.apiserver_detail(false),
            "the provided IP (10.96.0.5) is not in the valid range. The range of valid IPs is 10.97.0.0/16"
        );
        let taken = IpamError::Allocated { value: "30080".into(), range: "30000-32767".into() };
        assert_eq!(taken.to_string(), "30080 is already allocated in range 30000-32767");
        assert_eq!(taken.apiserver_detail(true), "provided port is already allocated");
        assert_eq!(taken.reason(), "AlreadyAllocated");
    }
}
