//! The block keeper of one replica: creates a block when this replica's
//! usable blocks of a kind run low, and deletes those it no longer uses
//! (used up, too close to expiry, or its pool is nearly full), so admission
//! only hands out from memory. See `blocks.rs` and README.md, "Blocks".
//!
//! Calls the API: creates and deletes block objects (409 on create is the
//! lock, a uid precondition on delete). Decisions come from the index.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::ResourceExt;
use kube::api::{Api, PostParams};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::allocator::{Allocator, delete_claim_named};
use crate::blocks::{BLOCK_LIFETIME, BlockId, BlockKind, BlockRecord, build_block};
use crate::claim::AllocationClaim;

/// How often the keeper looks without being woken (for expiry).
const TICK: Duration = Duration::from_secs(1);

/// The most blocks one acquisition creates (a burst of waiting requests).
const MAX_BLOCKS_AT_ONCE: usize = 8;

/// How long a shutdown waits for the claims of handed-out values.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Keeps `allocator`'s blocks until the task is dropped.
pub async fn run_block_keeper(allocator: Allocator) {
    if allocator.block_size() == 0 {
        return;
    }
    let woken: Arc<Notify> = allocator.blocks_used();
    loop {
        tokio::select! {
            () = woken.notified() => {}
            () = tokio::time::sleep(TICK) => {}
        }
        if allocator.is_ready() {
            keep_once(&allocator).await;
        }
    }
}

/// One pass: return what is not used any more, then top up each kind whose
/// usable blocks have less than half a block free.
async fn keep_once(allocator: &Allocator) {
    let size = allocator.block_size();
    let now = SystemTime::now();
    let (to_return, low) = {
        let index = allocator.index();
        let kinds: Vec<BlockKind> =
            (index.config().families().into_iter().map(BlockKind::Ip)).chain([BlockKind::Port]).collect();
        let mut to_return = index.own_blocks_to_return(now, false);
        // The spare blocks of a pool too full for blocks, each block once.
        let spare: Vec<_> = index
            .own_blocks_to_return(now, true)
            .into_iter()
            .filter(|block| !to_return.contains(block) && !index.blocks_worthwhile(block.0.kind(), size))
            .collect();
        to_return.extend(spare);
        let low: Vec<BlockKind> = kinds
            .into_iter()
            .filter(|kind| {
                index.blocks_worthwhile(*kind, size) && index.own_free(*kind, now) * 2 < usize::from(size)
            })
            .collect();
        (to_return, low)
    };
    let claims = allocator.claims_api();
    for (id, uid) in to_return {
        if delete_block(claims, id, uid).await {
            allocator.index().delete_block(id);
        }
    }
    for kind in low {
        acquire(allocator, kind, size, usize::from(size)).await;
    }
}

/// Creates blocks of `kind` for `wanted` values (at least one block, at most
/// [`MAX_BLOCKS_AT_ONCE`]) at once, one acquisition at a time per replica
/// (the keeper's and admission's). False when none could be had; true also
/// when another call just made enough.
pub(crate) async fn acquire(allocator: &Allocator, kind: BlockKind, size: u16, wanted: usize) -> bool {
    let _one_at_a_time = allocator.acquiring().lock().await;
    let size_usize = usize::from(size);
    let free = allocator.index().own_free(kind, SystemTime::now());
    if free * 2 >= size_usize && free >= wanted {
        return true;
    }
    let count = wanted.saturating_sub(free).div_ceil(size_usize).clamp(1, MAX_BLOCKS_AT_ONCE);
    let mut chosen: Vec<BlockId> = Vec::with_capacity(count);
    for _ in 0..count * 4 {
        if chosen.len() == count {
            break;
        }
        match allocator.index().choose_block(kind, size) {
            Some(id) if !chosen.contains(&id) => chosen.push(id),
            Some(_) => {}
            None => break,
        }
    }
    let holder = allocator.index().replica().to_owned();
    let claims = allocator.claims_api();
    let creates = chosen.iter().map(|id| {
        let expires = SystemTime::now() + BLOCK_LIFETIME;
        let holder = holder.clone();
        async move {
            let created = claims.create(&PostParams::default(), &build_block(*id, &holder, expires)).await;
            (*id, expires, created)
        }
    });
    let mut any = false;
    for (id, expires, created) in futures::future::join_all(creates).await {
        match created {
            Ok(created) => {
                let record = BlockRecord {
                    holder: holder.clone(),
                    uid: created.uid(),
                    expires: Some(expires),
                    seen: false,
                };
                debug!(block = %id.spec_value(), "reserved a block");
                allocator.index().apply_block(id, record);
                any = true;
            }
            // Another replica took it: the watch brings it, and the next
            // acquisition chooses around it.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => warn!(block = %id.spec_value(), %error, "could not reserve a block"),
        }
    }
    any
}

/// Deletes the block object of `id` if it is still the one with `uid`;
/// true when it is gone.
pub(crate) async fn delete_block(claims: &Api<AllocationClaim>, id: BlockId, uid: Option<String>) -> bool {
    delete_claim_named(claims, &id.claim_name(), uid).await.unwrap_or_else(|error| {
        warn!(block = %id.spec_value(), %error, "could not return a block; it expires on its own");
        false
    })
}

/// Deletes every block this replica holds (graceful shutdown), so its free
/// values come back at once instead of at expiry. Waits (at most
/// [`SHUTDOWN_WAIT`]) for the claims of values it handed out to be written
/// first, and keeps a block that still has such a value: deleted, the value
/// would be free to others while its Service may not have persisted yet.
pub async fn return_all_blocks(allocator: &Allocator) {
    let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
    while allocator.index().has_deferred() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let own = allocator.index().own_blocks_to_return(SystemTime::now(), true);
    for (id, uid) in own {
        if delete_block(allocator.claims_api(), id, uid).await {
            allocator.index().delete_block(id);
        }
    }
}
