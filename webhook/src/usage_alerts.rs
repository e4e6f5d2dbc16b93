//! When a pool runs low: which threshold each pool has reached, and which
//! Events that calls for. No I/O: the repair pass feeds it each pass's usage
//! (the same [`PoolUsage`] the `pool_allocated` gauges show) and publishes
//! what [`UsageAlerts::observe`] returns.
//!
//! A pool reaching a higher threshold (default 80 % and 95 %) gives one
//! Warning; falling back under the lowest gives one Normal. Crossing several
//! thresholds in one pass gives one Warning, for the highest. The levels live
//! in the leader's memory: a new leader warns once more about a pool still
//! above a threshold, which an operator would rather see twice than never.

use std::collections::HashMap;

use crate::index::PoolUsage;

/// The utilisation thresholds, in percent, ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thresholds(Vec<u8>);

impl Thresholds {
    /// Thresholds from percentages (1 to 100, in any order, duplicates ignored).
    pub fn new(mut percents: Vec<u8>) -> Result<Self, String> {
        if let Some(bad) = percents.iter().find(|p| !(1..=100).contains(*p)) {
            return Err(format!("pool usage threshold {bad}: must be a percentage from 1 to 100"));
        }
        percents.sort_unstable();
        percents.dedup();
        Ok(Self(percents))
    }

    /// The highest threshold `used` of `size` has reached, or 0.
    fn level(&self, used: usize, size: usize) -> u8 {
        // Integer arithmetic: 80 % of 10 is reached at exactly 8.
        let reached = |t: &&u8| size > 0 && used * 100 >= usize::from(**t) * size;
        self.0.iter().rev().find(reached).copied().unwrap_or(0)
    }

    fn lowest(&self) -> Option<u8> {
        self.0.first().copied()
    }
}

/// What a pass's usage calls for, for one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// The pool: a CIDR or a port range.
    pub pool: String,
    /// Values taken.
    pub used: usize,
    /// Values in the pool.
    pub size: usize,
    /// The threshold reached (a Warning), or `None`: back under the lowest (a Normal).
    pub reached: Option<u8>,
    /// The lowest threshold, for the Normal's note.
    pub lowest: u8,
}

impl Alert {
    /// `PoolUsageHigh` or `PoolUsageNormal`.
    pub fn reason(&self) -> &'static str {
        if self.reached.is_some() { "PoolUsageHigh" } else { "PoolUsageNormal" }
    }

    /// The Event's note, with what to do about it.
    pub fn note(&self) -> String {
        let percent = (self.used * 100).checked_div(self.size).unwrap_or(0);
        let usage = format!("{percent}% used ({} of {})", self.used, self.size);
        let is_ports = !self.pool.contains('/');
        let is_service_ip_pool = self.pool.contains(" (");
        match self.reached {
            Some(threshold) if is_service_ip_pool => format!(
                "pool {} is {usage}, over {threshold}%: the Services it selects are denied a ClusterIP \
                 when it is full; add CIDRs to the ServiceIPPool or delete unused Services",
                self.pool
            ),
            Some(threshold) if is_ports => format!(
                "NodePort range {} is {usage}, over {threshold}%: NodePort and LoadBalancer Services are \
                 denied a port when it is full; delete unused ones or widen --service-node-port-range \
                 (and --webhook-node-port-range)",
                self.pool
            ),
            Some(threshold) => format!(
                "pool {} is {usage}, over {threshold}%: Services are denied a ClusterIP when it is full; \
                 delete unused Services or add a ServiceCIDR",
                self.pool
            ),
            None => format!("pool {} is {usage}, under {}% again", self.pool, self.lowest),
        }
    }
}

/// The level each pool has reached, across passes.
#[derive(Clone, Debug)]
pub struct UsageAlerts {
    thresholds: Thresholds,
    levels: HashMap<String, u8>,
}

impl UsageAlerts {
    /// No pool has reached anything yet.
    pub fn new(thresholds: Thresholds) -> Self {
        Self { thresholds, levels: HashMap::new() }
    }

    /// Records this pass's usage and returns the Events it calls for. A pool
    /// that is gone is forgotten.
    pub fn observe(&mut self, usage: &[PoolUsage]) -> Vec<Alert> {
        let Some(lowest) = self.thresholds.lowest() else { return Vec::new() };
        self.levels.retain(|pool, _| usage.iter().any(|u| &u.pool == pool));
        let mut alerts = Vec::new();
        for pool in usage {
            let size = pool.used + pool.free;
            let level = self.thresholds.level(pool.used, size);
            let before = self.levels.insert(pool.pool.clone(), level).unwrap_or(0);
            let reached = if level > before {
                Some(level)
            } else if level == 0 && before > 0 {
                None
            } else {
                continue;
            };
            alerts.push(Alert { pool: pool.pool.clone(), used: pool.used, size, reached, lowest });
        }
        alerts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(pool: &str, used: usize, size: usize) -> PoolUsage {
        PoolUsage { pool: pool.into(), used, free: size - used }
    }

    fn reached(alerts: &[Alert]) -> Vec<(String, Option<u8>)> {
        alerts.iter().map(|a| (a.pool.clone(), a.reached)).collect()
    }

    #[test]
    fn each_threshold_warns_once_on_the_way_up_and_once_back_under_the_lowest() {
        let mut alerts = UsageAlerts::new(Thresholds::new(vec![95, 80]).unwrap());
        let pass =
            |alerts: &mut UsageAlerts, used| reached(&alerts.observe(&[usage("10.0.0.0/28", used, 14)]));
        assert_eq!(pass(&mut alerts, 11), vec![], "78 %");
        assert_eq!(pass(&mut alerts, 12), vec![("10.0.0.0/28".into(), Some(80))]);
        assert_eq!(pass(&mut alerts, 12), vec![], "already said");
        assert_eq!(pass(&mut alerts, 13), vec![], "92 %: still the 80 % level");
        assert_eq!(pass(&mut alerts, 14), vec![("10.0.0.0/28".into(), Some(95))]);
        assert_eq!(pass(&mut alerts, 12), vec![], "down to 80: no news");
        assert_eq!(pass(&mut alerts, 14), vec![("10.0.0.0/28".into(), Some(95))], "up again");
        assert_eq!(pass(&mut alerts, 3), vec![("10.0.0.0/28".into(), None)]);
        assert_eq!(pass(&mut alerts, 3), vec![]);
    }

    #[test]
    fn a_jump_over_both_thresholds_warns_once_for_the_highest() {
        let mut alerts = UsageAlerts::new(Thresholds::new(vec![80, 95]).unwrap());
        let got = alerts.observe(&[usage("30000-30003", 4, 4), usage("10.0.0.0/24", 1, 254)]);
        assert_eq!(reached(&got), vec![("30000-30003".into(), Some(95))]);
        assert_eq!(
            got[0].note(),
            "NodePort range 30000-30003 is 100% used (4 of 4), over 95%: NodePort and LoadBalancer Services \
             are denied a port when it is full; delete unused ones or widen --service-node-port-range (and \
             --webhook-node-port-range)"
        );
    }

    #[test]
    fn a_pool_that_goes_away_is_forgotten_and_warns_again_when_it_returns() {
        let mut alerts = UsageAlerts::new(Thresholds::new(vec![80]).unwrap());
        assert_eq!(alerts.observe(&[usage("10.1.0.0/30", 2, 2)]).len(), 1);
        assert_eq!(alerts.observe(&[]).len(), 0);
        let back = alerts.observe(&[usage("10.1.0.0/30", 2, 2)]);
        assert_eq!(
            back[0].note(),
            "pool 10.1.0.0/30 is 100% used (2 of 2), over 80%: Services are denied a ClusterIP when it is full; delete unused Services or add a ServiceCIDR"
        );
    }

    #[test]
    fn a_service_ip_pool_is_told_to_grow_its_own_cidrs() {
        let mut alerts = UsageAlerts::new(Thresholds::new(vec![80]).unwrap());
        let got = alerts.observe(&[usage("tenant-a (10.96.8.0/30)", 2, 2)]);
        assert_eq!(
            got[0].note(),
            "pool tenant-a (10.96.8.0/30) is 100% used (2 of 2), over 80%: the Services it selects are denied a \
             ClusterIP when it is full; add CIDRs to the ServiceIPPool or delete unused Services"
        );
    }

    #[test]
    fn thresholds_are_percentages() {
        assert!(Thresholds::new(vec![0]).is_err());
        assert_eq!(
            Thresholds::new(vec![101]).unwrap_err(),
            "pool usage threshold 101: must be a percentage from 1 to 100"
        );
        assert_eq!(UsageAlerts::new(Thresholds::new(vec![]).unwrap()).observe(&[usage("p", 1, 1)]), vec![]);
    }
}
