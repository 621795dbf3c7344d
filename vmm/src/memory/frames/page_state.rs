//! The page-state map: one byte per guest frame, owned by the VMM, read lock-free by the fault
//! handler. Every frame is in exactly one state; transitions that race with fault handling are
//! compare-and-swap, so the fault handler never takes the memory manager's lock.
//!
//! ```text
//!            alloc                 first touch (uffd)               free
//!   Free ───────────▶ Allocated ─────────────▶ Populating ──▶ Resident ───▶ Free
//!     ▲                   │     VMM writes it first (populate)   │  ▲
//!     └───────────────────┴──────────────────────── free ────────┼──┘
//!                                                     emptied    ▼  │ written
//!                                                              Zero ┘
//! ```
//! `Zero` is a frame the VMM knows holds only zeroes (an emptied page table, or a page swap
//! found all zero): its private backing was dropped, reads are served with the kernel's shared
//! zero page, mapped write-protected so that the first write (a write-protect fault) makes the
//! frame `Resident` before the kernel copies the page.
//! `Ballooned` frames are held by the balloon: taken from the buddy allocator like an allocation,
//! but never handed out and never backed.
//!
//! Swap adds two states for handed-out frames whose data left host memory:
//! ```text
//!   Resident ──evict──▶ SwappingOut ──written──▶ Swapped ──fault──▶ Populating ──▶ Resident
//!                            │  └──all zero──▶ Zero                      (read back in)
//!                            └──write failed──▶ Populating ──▶ Resident (put back)
//! ```
//! A free takes `SwappingOut` and `Swapped` frames straight to `Free` (their data is dropped
//! with no I/O; the eviction that was under way notices and cleans up).

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::memory::addr::{Gfn, to_usize};
use crate::memory::zeroed::ZeroedVec;

/// What the VMM knows about one guest frame.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum FrameState {
    /// In the buddy allocator. No host backing. A guest access here is a guest error.
    Free = 0,
    /// Handed out; never written, reads as zero; no host backing yet.
    Allocated = 1,
    /// The fault handler is installing its backing right now.
    Populating = 2,
    /// Handed out and backed by host memory.
    Resident = 3,
    /// Handed out, all zeroes, with no private backing: reads get the shared zero page
    /// (write-protected), the first write a private page and `Resident`.
    Zero = 4,
    /// Held by the balloon: out of the buddy allocator, never handed out, never backed.
    Ballooned = 5,
    /// Handed out; its page has just been moved out of guest RAM and is being written to swap.
    /// A fault on it waits until the eviction is over.
    SwappingOut = 6,
    /// Handed out; its data is in swap (the compressed pool or the swap file), not in host
    /// memory. A fault reads it back.
    Swapped = 7,
}

/// Number of states.
pub const NR_STATES: usize = 8;

impl FrameState {
    fn from_u8(v: u8) -> FrameState {
        match v {
            1 => FrameState::Allocated,
            2 => FrameState::Populating,
            3 => FrameState::Resident,
            4 => FrameState::Zero,
            5 => FrameState::Ballooned,
            6 => FrameState::SwappingOut,
            7 => FrameState::Swapped,
            _ => FrameState::Free,
        }
    }
}

/// Per-frame states plus per-node resident counters.
#[derive(Debug)]
pub struct PageStates {
    states: ZeroedVec<AtomicU8>,
    /// One bit per frame, set the first time the frame is handed out and never cleared: a
    /// guest access to a frame without it cannot come from any translation the VMM ever made.
    handed_out: ZeroedVec<AtomicU64>,
    /// `(first frame, one past last frame, node)` for every RAM range, ascending.
    node_of: Vec<(Gfn, Gfn, usize)>,
    resident: Vec<AtomicU64>,
}

impl PageStates {
    /// States for frames `[0, end)`, all `Free`. `ranges` gives each RAM range's node.
    pub fn new(end: Gfn, ranges: Vec<(Gfn, Gfn, usize)>, nodes: usize) -> std::io::Result<Self> {
        Ok(PageStates {
            states: ZeroedVec::try_new(to_usize(end.0))?,
            handed_out: ZeroedVec::try_new(to_usize(end.0.div_ceil(64)))?,
            node_of: ranges,
            resident: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Whether `gfn` is guest RAM.
    pub fn is_ram(&self, gfn: Gfn) -> bool {
        self.node(gfn).is_some()
    }

    /// The RAM range `[first, end)` containing `gfn`.
    pub fn range_of(&self, gfn: Gfn) -> Option<(Gfn, Gfn)> {
        self.node_of.iter().find(|(s, e, _)| *s <= gfn && gfn < *e).map(|r| (r.0, r.1))
    }

    /// `runs` of frames `(first, count)` cut where RAM ranges end.
    pub fn split_at_ranges(&self, runs: &[(Gfn, u64)]) -> Vec<(Gfn, u64)> {
        let mut out = Vec::with_capacity(runs.len());
        for &(g, n) in runs {
            let (mut at, end) = (g, g.plus(n));
            while at < end {
                let stop = self.range_of(at).map_or(end, |(_, e)| e.min(end));
                out.push((at, stop.0 - at.0));
                at = stop;
            }
        }
        out
    }

    /// Node of a RAM frame.
    pub fn node(&self, gfn: Gfn) -> Option<usize> {
        self.node_of.iter().find(|(s, e, _)| *s <= gfn && gfn < *e).map(|r| r.2)
    }

    /// The state of `gfn` (`Free` for frames that are not RAM).
    pub fn get(&self, gfn: Gfn) -> FrameState {
        self.states.get(to_usize(gfn.0)).map_or(FrameState::Free, |s| FrameState::from_u8(s.load(Ordering::Acquire)))
    }

    /// Moves `gfn` from `from` to `to` if it is in `from`; returns whether it did.
    pub fn transition(&self, gfn: Gfn, from: FrameState, to: FrameState) -> bool {
        let Some(slot) = self.states.get(to_usize(gfn.0)) else { return false };
        let ok = slot.compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if ok {
            self.count(gfn, from, to);
        }
        ok
    }

    /// Whether `gfn` was ever handed out (it has been `Allocated` at least once).
    pub fn ever_handed_out(&self, gfn: Gfn) -> bool {
        let i = to_usize(gfn.0);
        self.handed_out.get(i / 64).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    /// Sets every frame of `[gfn, gfn + n)` to `to`, waiting out in-flight population, and
    /// returns how many were `Resident` before (their host backing must be discarded).
    /// The frames must belong to the caller (allocated to it, or free and being allocated).
    pub fn set_range(&self, gfn: Gfn, n: u64, to: FrameState) -> u64 {
        let mut was_resident = 0;
        if to == FrameState::Allocated {
            for i in 0..n {
                let g = to_usize(gfn.0 + i);
                self.handed_out[g / 64].fetch_or(1 << (g % 64), Ordering::AcqRel);
            }
        }
        for i in 0..n {
            let g = gfn.plus(i);
            let slot = &self.states[to_usize(g.0)];
            loop {
                let cur = slot.load(Ordering::Acquire);
                if cur == FrameState::Populating as u8 {
                    // The fault handler is mid-copy; it finishes in microseconds.
                    std::hint::spin_loop();
                    continue;
                }
                if slot.compare_exchange(cur, to as u8, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    let from = FrameState::from_u8(cur);
                    if from == FrameState::Resident {
                        was_resident += 1;
                    }
                    self.count(g, from, to);
                    break;
                }
            }
        }
        was_resident
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.resident.len()
    }

    /// The RAM ranges: `(first frame, one past the last, node)`, ascending.
    pub fn ranges(&self) -> &[(Gfn, Gfn, usize)] {
        &self.node_of
    }

    /// Resident frames on `node`.
    pub fn resident(&self, node: usize) -> u64 {
        self.resident[node].load(Ordering::Relaxed)
    }

    /// Resident frames on every node.
    pub fn resident_total(&self) -> u64 {
        self.resident.iter().map(|r| r.load(Ordering::Relaxed)).sum()
    }

    /// Counts frames by state in `[gfn, gfn + n)` (for tests and invariant checks).
    pub fn census(&self, gfn: Gfn, n: u64) -> [u64; NR_STATES] {
        let mut c = [0; NR_STATES];
        for i in 0..n {
            c[self.get(gfn.plus(i)) as usize] += 1;
        }
        c
    }

    /// Bytes reserved for the map (resident only where touched).
    pub fn metadata_bytes(&self) -> u64 {
        self.states.len() as u64 + self.handed_out.len() as u64 * 8
    }

    fn count(&self, gfn: Gfn, from: FrameState, to: FrameState) {
        if from == to {
            return;
        }
        let Some(node) = self.node(gfn) else { return };
        if to == FrameState::Resident {
            self.resident[node].fetch_add(1, Ordering::Relaxed);
        } else if from == FrameState::Resident {
            self.resident[node].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_and_counts() {
        let s = PageStates::new(Gfn(100), vec![(Gfn(0), Gfn(50), 0), (Gfn(50), Gfn(100), 1)], 2).unwrap();
        assert_eq!(s.set_range(Gfn(40), 20, FrameState::Allocated), 0);
        assert!(s.transition(Gfn(55), FrameState::Allocated, FrameState::Resident));
        assert!(!s.transition(Gfn(55), FrameState::Allocated, FrameState::Resident));
        assert_eq!(s.resident(1), 1);
        assert_eq!(s.set_range(Gfn(40), 20, FrameState::Free), 1);
        assert_eq!(s.resident(1), 0);
        assert_eq!(s.census(Gfn(0), 100), [100, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(s.node(Gfn(70)), Some(1));
        // Handed out once, remembered after the free.
        assert!(s.ever_handed_out(Gfn(40)) && s.ever_handed_out(Gfn(59)));
        assert!(!s.ever_handed_out(Gfn(39)) && !s.ever_handed_out(Gfn(60)));
        assert_eq!(s.get(Gfn(1000)), FrameState::Free);
    }
}
