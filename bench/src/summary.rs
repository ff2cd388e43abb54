//! `megasock-bench summarize`: median, min, max and spread of the headline figures of several
//! reports of one scenario, for "median of N runs" tables.

use crate::cli::SummarizeArgs;
use serde_json::{json, Map, Value};

/// The figures worth comparing across runs, per scenario, as JSON pointers.
fn metrics(scenario: &str) -> &'static [&'static str] {
    match scenario {
        "connect" => &[
            "/connect_rate_per_s",
            "/failed",
            "/latency_us/p50",
            "/latency_us/p99",
            "/server/rss_per_conn_bytes",
            "/server/kernel_slab_per_conn_bytes",
            "/server/kernel_tcp_mem_per_conn_bytes",
        ],
        "echo" => &[
            "/msgs_per_s",
            "/latency_us/p50",
            "/latency_us/p99",
            "/latency_us/max",
            "/server/run_cpu_s",
            "/loadgen/run_cpu_utilization_per_thread",
        ],
        "broadcast" => &[
            "/deliveries_per_s",
            "/latency_us/p50",
            "/latency_us/p99",
            "/latency_us/p99.9",
            "/latency_us/max",
            "/lost",
            "/duplicated",
            "/reordered",
            "/server/deliveries_per_cpu_s",
            "/wire_bytes_per_delivery",
            "/loadgen/run_cpu_utilization_per_thread",
        ],
        "ladder" => &[
            "/max_members_under_bound",
            "/latency_us/p50",
            "/latency_us/p99",
        ],
        _ => &[],
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn run(a: &SummarizeArgs) -> i32 {
    let mut docs = Vec::new();
    for p in &a.reports {
        let doc: Value = match std::fs::read_to_string(p)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        {
            Ok(d) => d,
            Err(e) => {
                eprintln!("megasock-bench summarize: {p}: {e}");
                return 2;
            }
        };
        docs.push(doc);
    }
    let scenario = docs[0]["scenario"].as_str().unwrap_or("").to_string();
    if let Some((p, _)) = a
        .reports
        .iter()
        .zip(&docs)
        .find(|(_, d)| d["scenario"] != docs[0]["scenario"])
    {
        eprintln!("megasock-bench summarize: {p} is not a {scenario} report");
        return 2;
    }
    let mut out = Map::new();
    println!("{scenario}: {} reports", docs.len());
    println!(
        "{:<44} {:>14} {:>14} {:>14} {:>8}",
        "figure", "median", "min", "max", "spread"
    );
    let mut figures: Vec<(String, String)> = metrics(&scenario)
        .iter()
        .map(|p| (p.to_string(), p.trim_start_matches('/').replace('/', ".")))
        .collect();
    if scenario == "ladder" {
        // Time until the last member has the message, per room size.
        let steps = docs[0]["steps"].as_array().cloned().unwrap_or_default();
        for (i, step) in steps.iter().enumerate() {
            let members = step["members"].as_u64().unwrap_or(0);
            for q in ["p50", "p95"] {
                figures.push((
                    format!("/steps/{i}/last_member_ms/{q}"),
                    format!("members_{members}.last_member_ms.{q}"),
                ));
            }
        }
    }
    for (ptr, name) in &figures {
        let vals: Vec<f64> = docs
            .iter()
            .filter_map(|d| d.pointer(ptr).and_then(Value::as_f64))
            .collect();
        if vals.is_empty() {
            continue;
        }
        let med = median(&vals);
        let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let spread = if med != 0.0 {
            (max - min) / med.abs() * 100.0
        } else {
            0.0
        };
        let d = if max.abs() < 100.0 { 3 } else { 1 };
        println!("{name:<44} {med:>14.d$} {min:>14.d$} {max:>14.d$} {spread:>7.1}%");
        out.insert(
            name.clone(),
            json!({"median": med, "min": min, "max": max, "spread_pct": spread, "values": vals}),
        );
    }
    let not_ok = docs.iter().filter(|d| d["ok"] != true).count();
    if not_ok > 0 {
        println!("{not_ok} of {} reports are not ok", docs.len());
    }
    if let Some(p) = &a.json {
        let doc =
            json!({"scenario": scenario, "reports": a.reports, "not_ok": not_ok, "figures": out});
        if let Err(e) = std::fs::write(
            p,
            serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n",
        ) {
            eprintln!("megasock-bench summarize: cannot write {p}: {e}");
            return 2;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
