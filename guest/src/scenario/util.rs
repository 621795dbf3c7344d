//! Helpers shared by scenarios.

use protocol::BootInfo;

/// A 64-bit signature for `(a, b, c)`: what a page should hold.
pub fn sig(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ b.rotate_left(21) ^ c.rotate_left(42);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// Reads a word of guest memory the scenario owns.
pub fn read(addr: u64) -> u64 {
    // SAFETY: callers pass addresses inside regions the VMM mapped readable for them.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Writes a word of guest memory the scenario owns.
pub fn write(addr: u64, v: u64) {
    // SAFETY: callers pass addresses inside regions the VMM mapped writable for them.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// Nanoseconds for `cycles` TSC ticks (0 if the TSC rate is unknown).
pub fn ns(bi: &BootInfo, cycles: u64) -> u64 {
    if bi.tsc_khz == 0 { 0 } else { (u128::from(cycles) * 1_000_000 / u128::from(bi.tsc_khz)) as u64 }
}

/// Frames holding data: allocated frames minus page-table pages (tables stay once built, so a
/// scenario that frees everything gets back to the same count of data frames) and the frames
/// the balloon holds.
pub fn data_frames(s: &protocol::MemStats) -> u64 {
    s.allocated_frames - s.page_table_pages - s.balloon_frames
}

/// Node owning guest-physical `gpa` according to BootInfo.
pub fn node_of_gpa(bi: &BootInfo, gpa: u64) -> Option<u32> {
    bi.nodes[..bi.nr_nodes as usize].iter().find_map(|n| {
        n.ranges[..n.nr_ranges as usize].iter().any(|r| r.start <= gpa && gpa < r.start + r.len).then_some(n.id)
    })
}

/// Collects a scenario's checks: prints each failure once, remembers whether all passed.
pub struct Checks {
    name: &'static str,
    pub ok: bool,
}

impl Checks {
    pub fn new(name: &'static str) -> Self {
        Checks { name, ok: true }
    }

    /// Records a check; prints `what` if it failed.
    pub fn check(&mut self, cond: bool, what: &str) {
        if !cond {
            crate::println!("guest: {}: cpu {}: {what}", self.name, crate::arch::cpu_id());
            self.ok = false;
        }
    }
}
