//! Upstream `truncateEndpoints`: cut an Endpoints to its capacity. Pure.

use k8s_openapi::api::core::v1::EndpointSubset;

/// Truncates `subsets` to at most `max` addresses; returns true when it had to.
///
/// Ready addresses are preferred: if the ready ones alone exceed `max`, every
/// not-ready address is dropped and `max` ready ones are kept; otherwise all ready
/// ones are kept and the remaining room goes to not-ready ones. The kept budget is
/// shared between subsets in proportion to their size, rounded up, so a later
/// subset may get less than its share; within a subset the first addresses (in
/// sorted order) are kept.
///
/// Which subset is "later" follows the subset order. Upstream orders subsets by a
/// hash, svcplane by field (see `repack`), so with several subsets the rounding
/// can favour a different subset than upstream would; the totals are the same.
pub(super) fn truncate_subsets(subsets: &mut [EndpointSubset], max: usize) -> bool {
    let count = |list: &Option<Vec<_>>| list.as_ref().map_or(0, Vec::len);
    let total_ready: usize = subsets.iter().map(|s| count(&s.addresses)).sum();
    let total_not_ready: usize = subsets.iter().map(|s| count(&s.not_ready_addresses)).sum();
    if total_ready + total_not_ready <= max {
        return false;
    }
    let truncate_ready = total_ready > max;
    let (budget, total) =
        if truncate_ready { (max, total_ready) } else { (max - total_ready, total_not_ready) };
    let mut left = budget;
    for subset in subsets.iter_mut() {
        let in_subset =
            if truncate_ready { count(&subset.addresses) } else { count(&subset.not_ready_addresses) };
        // The same float arithmetic as upstream, so the rounding agrees.
        #[expect(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "counts are at most a few thousand; matches Go's float64 math"
        )]
        let share = ((in_subset as f64 / total as f64) * budget as f64).ceil() as usize;
        let keep = share.min(left);
        if truncate_ready {
            if let Some(list) = subset.addresses.as_mut() {
                list.truncate(keep);
            }
            subset.not_ready_addresses = None;
            left -= count(&subset.addresses);
        } else {
            if let Some(list) = subset.not_ready_addresses.as_mut() {
                list.truncate(keep);
            }
            left -= count(&subset.not_ready_addresses);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::EndpointAddress;

    use super::*;

    fn sized(ready: usize, not_ready: usize) -> EndpointSubset {
        let list = |n: usize| Some(vec![EndpointAddress::default(); n]);
        EndpointSubset { addresses: list(ready), not_ready_addresses: list(not_ready), ports: None }
    }

    /// Upstream `TestTruncateEndpoints`.
    #[test]
    fn truncation_matches_upstream_table() {
        type Row = (&'static str, [usize; 5], [usize; 5], [usize; 5], [usize; 5]);
        let rows: [Row; 4] = [
            (
                "total endpoints < max capacity",
                [50, 100, 100, 100, 100],
                [50, 100, 100, 100, 100],
                [50, 100, 100, 100, 100],
                [50, 100, 100, 100, 100],
            ),
            ("total endpoints = max capacity", [100; 5], [100; 5], [100; 5], [100; 5]),
            (
                "total ready endpoints < max capacity, but total endpoints > max capacity",
                [90, 110, 50, 10, 20],
                [101, 200, 200, 201, 298],
                [90, 110, 50, 10, 20],
                [73, 144, 144, 145, 214],
            ),
            (
                "total ready endpoints > max capacity",
                [205, 400, 402, 400, 693],
                [100, 200, 200, 200, 300],
                [98, 191, 192, 191, 328],
                [0; 5],
            ),
        ];
        for (desc, ready, not_ready, want_ready, want_not_ready) in rows {
            let mut subsets: Vec<EndpointSubset> =
                ready.iter().zip(not_ready).map(|(r, n)| sized(*r, n)).collect();
            let truncated = truncate_subsets(&mut subsets, 1000);
            assert_eq!(
                truncated,
                ready.iter().sum::<usize>() + not_ready.iter().sum::<usize>() > 1000,
                "{desc}"
            );
            let got_ready: Vec<usize> =
                subsets.iter().map(|s| s.addresses.as_ref().map_or(0, Vec::len)).collect();
            let got_not_ready: Vec<usize> =
                subsets.iter().map(|s| s.not_ready_addresses.as_ref().map_or(0, Vec::len)).collect();
            assert_eq!(got_ready, want_ready, "{desc}");
            assert_eq!(got_not_ready, want_not_ready, "{desc}");
        }
    }

    #[test]
    fn empty_subsets_are_not_truncated() {
        assert!(!truncate_subsets(&mut [], 1000));
    }
}
