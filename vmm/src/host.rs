//! What the VMM reads about its host: its own memory use and how KVM translates guest memory.

/// The VMM process's memory, in KiB, from `/proc/self/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessMemory {
    /// Peak resident set (`VmHWM`).
    pub hwm_kib: u64,
    /// Resident set (`VmRSS`).
    pub rss_kib: u64,
    /// Anonymous resident memory (`RssAnon`).
    pub anon_kib: u64,
}

/// Reads the process's memory figures (zeroes where `/proc` is unavailable).
pub fn process_memory() -> ProcessMemory {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    ProcessMemory { hwm_kib: field("VmHWM:"), rss_kib: field("VmRSS:"), anon_kib: field("RssAnon:") }
}

/// Whether KVM uses two-dimensional paging (Intel EPT or AMD NPT) rather than shadow paging.
pub fn has_tdp() -> bool {
    let on = |p: &str| std::fs::read_to_string(p).is_ok_and(|v| matches!(v.trim(), "Y" | "y" | "1"));
    on("/sys/module/kvm_intel/parameters/ept") || on("/sys/module/kvm_amd/parameters/npt")
}
