//! Blocks: runs of values a replica reserves ahead (issue #19 item 4), so a
//! dynamic ClusterIP or NodePort is handed out from memory and its claim is
//! written after the answer instead of inside the admission call.
//!
//! A block is an `AllocationClaim` of kind `ClusterIPBlock` or
//! `NodePortBlock`, named after its first value (`block-ip-10-96-3-32`,
//! `block-nodeport-30016`), holding an aligned run of `--webhook-block-size`
//! values (`10.96.3.32/27`, `30016-30047`) for one replica process until
//! `svcplane.dev/block-expires`. Creating it is the lock, as for one value: the
//! apiserver lets one replica have the name. Every replica marks a block's
//! values taken, so only its holder picks them. A value claimed by its own
//! claim (a user asked for it) is skipped by the holder.
//!
//! No I/O here: names, parsing, alignment and the holder's rules of use;
//! `block_keeper.rs` creates and deletes, `index.rs` keeps them.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use ipnetwork::IpNetwork;
use k8s_openapi::jiff::Timestamp;
use svcplane_ipam::{IpFamily, PortRange};

use crate::claim::{AllocationClaim, AllocationClaimSpec, Value};

/// `spec.kind` of a block of ClusterIPs.
pub const IP_BLOCK_KIND: &str = "ClusterIPBlock";
/// `spec.kind` of a block of NodePorts.
pub const PORT_BLOCK_KIND: &str = "NodePortBlock";
/// When the block's holder has stopped handing out from it and anyone may
/// delete it (RFC 3339).
pub const EXPIRES_ANNOTATION: &str = "svcplane.dev/block-expires";

/// How long a block is held: long enough that a burst uses it up, short
/// enough that a crashed replica's blocks come back soon.
pub const BLOCK_LIFETIME: Duration = Duration::from_secs(300);

/// The holder stops handing out this long before the block expires: longer
/// than the apiserver's 60 s request timeout, so a Service given a value
/// from the block has persisted (or failed) before anyone may delete it, and
/// from then on the Service (or the claim written after the answer) keeps
/// the value taken.
pub const HANDOUT_MARGIN: Duration = Duration::from_secs(120);

/// Blocks are used while the pool has at least this many blocks' worth of
/// free values; below, replicas give theirs back and claim one value at a
/// time, so a nearly full pool is never held in other replicas' blocks.
pub const MIN_FREE_BLOCKS: usize = 16;

/// Which values a block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockKind {
    /// ClusterIPs of one family.
    Ip(IpFamily),
    /// NodePorts.
    Port,
}

impl BlockKind {
    /// The kind of `value`.
    pub fn of(value: Value) -> Self {
        match value {
            Value::Ip(ip) => BlockKind::Ip(IpFamily::of(ip)),
            Value::Port(_) => BlockKind::Port,
        }
    }
}

/// A block: its first value and how many values follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId {
    /// The lowest value.
    pub first: Value,
    /// How many consecutive values (fewer at the end of a port range).
    pub size: u16,
}

impl BlockId {
    /// The aligned block of `size` values containing `value`: within `cidr`
    /// for an IP, within `ports` for a port (cut at the range's end).
    pub fn containing(value: Value, size: u16, cidr: Option<IpNetwork>, ports: PortRange) -> Option<Self> {
        match value {
            Value::Ip(ip) => {
                let cidr = cidr?;
                let base = ip_number(cidr.network());
                let first = base + (ip_number(ip) - base) / u128::from(size) * u128::from(size);
                Some(Self { first: Value::Ip(ip_from(first, ip)), size })
            }
            Value::Port(port) => {
                let (lo, hi) = (ports.first(), ports.last());
                let first = lo + (port.checked_sub(lo)?) / size * size;
                let size = size.min(hi - first + 1);
                Some(Self { first: Value::Port(first), size })
            }
        }
    }

    /// The block's values, lowest first.
    pub fn values(self) -> impl Iterator<Item = Value> {
        (0..u128::from(self.size)).map(move |offset| match self.first {
            Value::Ip(ip) => Value::Ip(ip_from(ip_number(ip) + offset, ip)),
            // `size` never runs past the port range, so this stays a u16.
            Value::Port(port) => Value::Port(port + offset as u16),
        })
    }

    /// Whether `value` is one of the block's values.
    pub fn contains(&self, value: Value) -> bool {
        match (self.first, value) {
            (Value::Ip(first), Value::Ip(ip)) if IpFamily::of(first) == IpFamily::of(ip) => {
                (ip_number(first)..ip_number(first) + u128::from(self.size)).contains(&ip_number(ip))
            }
            (Value::Port(first), Value::Port(port)) => {
                (u32::from(first)..u32::from(first) + u32::from(self.size)).contains(&u32::from(port))
            }
            _ => false,
        }
    }

    /// What values it holds.
    pub fn kind(&self) -> BlockKind {
        BlockKind::of(self.first)
    }

    /// The block object's name: `block-` and its first value's claim name.
    pub fn claim_name(&self) -> String {
        format!("block-{}", self.first.claim_name())
    }

    /// `spec.value`: `10.96.3.32/27` or `30016-30047`.
    pub fn spec_value(&self) -> String {
        match self.first {
            Value::Ip(ip) => {
                let bits = if ip.is_ipv4() { 32 } else { 128 };
                format!("{ip}/{}", bits - self.size.trailing_zeros())
            }
            Value::Port(port) => format!("{port}-{}", port + (self.size - 1)),
        }
    }

    /// The block a claim object describes; `None` for a value's claim.
    pub fn of_claim(spec: &AllocationClaimSpec) -> Option<Self> {
        match spec.kind.as_str() {
            IP_BLOCK_KIND => {
                let cidr: IpNetwork = spec.value.parse().ok()?;
                let host_bits = u32::from(if cidr.is_ipv4() { 32u8 } else { 128 } - cidr.prefix());
                let size = u16::try_from(1u32.checked_shl(host_bits)?).ok()?;
                Some(Self { first: Value::Ip(cidr.network()), size })
            }
            PORT_BLOCK_KIND => {
                let (first, last) = spec.value.split_once('-')?;
                let (first, last): (u16, u16) = (first.parse().ok()?, last.parse().ok()?);
                Some(Self { first: Value::Port(first), size: last.checked_sub(first)?.checked_add(1)? })
            }
            _ => None,
        }
    }
}

/// What every replica knows of a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRecord {
    /// The replica process holding it (`spec.service`).
    pub holder: String,
    /// The object's uid, for delete preconditions.
    pub uid: Option<String>,
    /// When it expires; `None` when the annotation is missing or unreadable
    /// (then it is deleted at once by repair).
    pub expires: Option<SystemTime>,
    /// The claim watch has delivered it. Watch events come in the order of
    /// the writes, so by then this replica has seen every claim made before
    /// the block: its holder hands out from it only from then on, never a
    /// value another replica claimed just before.
    pub seen: bool,
}

impl BlockRecord {
    /// The block and its record from a claim object; `None` for a value's claim.
    pub fn of(claim: &AllocationClaim) -> Option<(BlockId, Self)> {
        let id = BlockId::of_claim(&claim.spec)?;
        let expires = claim
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(EXPIRES_ANNOTATION))
            .and_then(|text| text.parse::<Timestamp>().ok())
            .map(SystemTime::from);
        let uid = claim.metadata.uid.clone();
        Some((id, Self { holder: claim.spec.service.clone(), uid, expires, seen: true }))
    }

    /// Whether its holder may still hand out values from it at `now`.
    pub fn usable_at(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|expires| now + HANDOUT_MARGIN < expires)
    }

    /// Whether anyone may delete it at `now`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        self.expires.is_none_or(|expires| now >= expires)
    }
}

/// The block object `holder` creates for `id`, expiring at `expires`.
pub fn build_block(id: BlockId, holder: &str, expires: SystemTime) -> AllocationClaim {
    let kind = match id.kind() {
        BlockKind::Ip(_) => IP_BLOCK_KIND,
        BlockKind::Port => PORT_BLOCK_KIND,
    };
    let mut claim = AllocationClaim::new(
        &id.claim_name(),
        AllocationClaimSpec {
            kind: kind.to_owned(),
            value: id.spec_value(),
            namespace: String::new(),
            service: holder.to_owned(),
        },
    );
    let expires = Timestamp::try_from(expires).unwrap_or(Timestamp::MAX).to_string();
    claim.metadata.annotations = Some([(EXPIRES_ANNOTATION.to_owned(), expires)].into_iter().collect());
    claim.metadata.labels = Some(
        [("app.kubernetes.io/managed-by".to_owned(), "svcplane-webhook".to_owned())].into_iter().collect(),
    );
    claim
}

/// This replica process's name as a block holder: the Pod (or host) name and
/// a random suffix, so a restarted process never takes its predecessor's
/// blocks for its own (it cannot know what that one handed out).
pub fn replica_name() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "webhook".to_owned());
    format!("{host}-{:08x}", rand::random::<u32>())
}

fn ip_number(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(ip) => u128::from(u32::from(ip)),
        IpAddr::V6(ip) => u128::from(ip),
    }
}

/// The address numbered `n` in the family of `like`.
fn ip_from(n: u128, like: IpAddr) -> IpAddr {
    match like {
        // A v4 block never runs past the v4 space: its CIDR is inside it.
        IpAddr::V4(_) => IpAddr::V4(u32::try_from(n).unwrap_or(u32::MAX).into()),
        IpAddr::V6(_) => IpAddr::V6(n.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports() -> PortRange {
        "30000-30100".parse().unwrap()
    }

    #[test]
    fn blocks_are_aligned_and_named_after_their_first_value() {
        let block = BlockId::containing(Value::Port(30021), 16, None, ports()).unwrap();
        assert_eq!(block, BlockId { first: Value::Port(30016), size: 16 });
        assert_eq!(
            (block.claim_name(), block.spec_value()),
            ("block-nodeport-30016".into(), "30016-30031".into())
        );
        let cidr = Some("10.96.0.0/16".parse().unwrap());
        let block = BlockId::containing(Value::Ip("10.96.3.45".parse().unwrap()), 32, cidr, ports()).unwrap();
        assert_eq!(block.first, Value::Ip("10.96.3.32".parse().unwrap()));
        assert_eq!(
            (block.claim_name(), block.spec_value()),
            ("block-ip-10-96-3-32".into(), "10.96.3.32/27".into())
        );
        let cidr = Some("fd00:10:96::/112".parse().unwrap());
        let block =
            BlockId::containing(Value::Ip("fd00:10:96::1:5".parse().unwrap()), 8, cidr, ports()).unwrap();
        assert_eq!(block.spec_value(), "fd00:10:96::1:0/125");
    }

    #[test]
    fn the_last_port_block_is_cut_at_the_range_end() {
        let block = BlockId::containing(Value::Port(30099), 16, None, ports()).unwrap();
        assert_eq!(block, BlockId { first: Value::Port(30096), size: 5 });
        assert_eq!(block.values().last(), Some(Value::Port(30100)));
        assert!(BlockId::containing(Value::Port(29999), 16, None, ports()).is_none());
    }

    #[test]
    fn a_block_round_trips_through_its_object_and_contains_exactly_its_values() {
        let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for id in [
            BlockId { first: Value::Port(30096), size: 5 },
            BlockId { first: Value::Ip("10.96.3.32".parse().unwrap()), size: 32 },
            BlockId { first: Value::Ip("fd00::10".parse().unwrap()), size: 16 },
        ] {
            let claim = build_block(id, "replica-a", expires);
            let (parsed, record) = BlockRecord::of(&claim).unwrap();
            assert_eq!(parsed, id);
            assert_eq!((record.holder.as_str(), record.expires), ("replica-a", Some(expires)));
            assert_eq!(id.values().count(), usize::from(id.size));
            assert!(id.values().all(|v| id.contains(v)));
            assert_eq!(Value::from_spec(&claim.spec), None, "a block is no value's claim");
        }
        let block = BlockId { first: Value::Port(30016), size: 16 };
        assert!(!block.contains(Value::Port(30015)) && !block.contains(Value::Port(30032)));
        assert!(!block.contains(Value::Ip("10.0.0.1".parse().unwrap())));
    }

    #[test]
    fn the_holder_stops_handing_out_a_margin_before_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let record = |expires| BlockRecord { holder: "r".into(), uid: None, expires, seen: true };
        assert!(record(Some(now + BLOCK_LIFETIME)).usable_at(now));
        assert!(!record(Some(now + HANDOUT_MARGIN)).usable_at(now));
        assert!(!record(Some(now + HANDOUT_MARGIN)).expired_at(now));
        assert!(record(Some(now)).expired_at(now));
        assert!(record(None).expired_at(now) && !record(None).usable_at(now));
    }
}
