//! What the tests and the benchmarks read of a running or finished `vmm`: its RSS and the
//! guest's `@result` lines. (The benchmarks include this file too.)

use serde_json::Value;

/// The RSS of process `pid` in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The `@result` lines of `scenario` in a guest's output (tagged by vCPU or not), as JSON
/// objects.
pub fn results(out: &str, scenario: &str) -> Vec<Value> {
    out.lines()
        .filter_map(|l| l.find("@result ").map(|i| &l[i..]))
        .map(|l| serde_json::to_value(vmm::console::parse_result(l)).expect("a result"))
        .filter(|r| r["scenario"] == scenario)
        .collect()
}
