//! What the VMM reads about its host: its own memory use, how KVM translates guest memory, and
//! the host CPUs it may run on (and pins threads to).

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

/// The host CPUs this process may run on (its affinity mask at start), in order.
pub fn allowed_cpus() -> std::io::Result<Vec<u32>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let max = u32::try_from(libc::CPU_SETSIZE).unwrap_or(0);
    // SAFETY: CPU_ISSET reads the set; every index is below CPU_SETSIZE.
    Ok((0..max).filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) }).collect())
}

/// Pins the calling thread to `cpus` (host CPU ids below `CPU_SETSIZE`).
pub fn pin_current_thread(cpus: &[u32]) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c as usize >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        // SAFETY: c < CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(c as usize, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
