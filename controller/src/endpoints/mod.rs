//! The legacy Endpoints controller's pure planner (in progress), plus the
//! canonical-subset and IP helpers it shares with the mirroring planner.

pub(crate) mod ip;
pub(crate) mod repack;
