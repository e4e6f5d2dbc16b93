//! Issue 20's goals, each stated as met or not with the figures of this run.

use crate::{Run, observer::quantile, ratio};

/// Scenarios with Services of 250 endpoints, where the watcher-bytes goal applies.
const ENDPOINTS_250: [&str; 3] = ["C", "C-unthrottled", "deployment"];
/// At the write floor: converged within this much of the QPS floor.
const FLOOR_SLACK: f64 = 1.10;

/// One line per goal and scenario it applies to, from (scenario key, upstream,
/// svcplane) of this run; goals of scenarios not run are left out.
pub(crate) fn assess(results: &[(&str, Run, Run)]) -> Vec<String> {
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut lines = Vec::new();
    for (key, u, s) in results {
        if ENDPOINTS_250.contains(key) {
            let bytes = ratio(s.watch.bytes as f64, u.watch.bytes as f64);
            let (sp99, up99) = (quantile(&s.latencies_ms, 0.99), quantile(&u.latencies_ms, 0.99));
            let latency_ok = matches!((sp99, up99), (Some(a), Some(b)) if a <= b);
            lines.push(format!(
                "{key}: watcher bytes at most 0.5x with p99 latency no worse: {} ({bytes:.2}x; p99 {} ms vs {} ms)",
                verdict(bytes <= 0.5 && latency_ok),
                sp99.map_or("-".into(), |v| format!("{v:.0}")),
                up99.map_or("-".into(), |v| format!("{v:.0}")),
            ));
        }
        if *key == "B" {
            let cpu = ratio(s.cpu_s, u.cpu_s);
            lines.push(format!("B: CPU at most 0.05x: {} ({cpu:.3}x)", verdict(cpu <= 0.05)));
        }
        if *key == "10k" {
            let at_floor = s.floor_s().is_some_and(|f| s.converge_s <= (f * FLOOR_SLACK).max(f + 2.0));
            lines.push(format!(
                "10k: convergence at the write floor: {} ({:.1} s, floor {})",
                verdict(at_floor),
                s.converge_s,
                s.floor_s().map_or("-".into(), |f| format!("{f:.1} s"))
            ));
        }
        let rss = ratio(s.rss_mib, u.rss_mib);
        lines.push(format!(
            "{key}: peak RSS at most 0.35x: {} ({rss:.2}x; {:.0} vs {:.0} MiB)",
            verdict(rss <= 0.35),
            s.rss_mib,
            u.rss_mib
        ));
    }
    lines
}
