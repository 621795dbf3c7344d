//! A guest region: a range of guest-virtual addresses in one of the heap zones. What each page
//! holds lives in its leaf entry, not here ([`PageEntry`]): a region costs the VMM the same few
//! bytes whatever its size, however it was protected, and however many of its pages the guest
//! touched.

use protocol::memcall::prot;

use crate::memory::addr::{Gfn, NodeId, PAGE_SIZE};
use crate::memory::frames::Run;
use crate::memory::frames::policy::Policy;

use super::pagetable::{PageSize, Pte, PteFlags, leaf_pte};

/// How a region's pages get frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Frames chosen at allocation: every page always has a frame.
    Alloc,
    /// Frames allocated when a page is first touched.
    Lazy,
}

/// One guest region (its start address is the key it is filed under).
#[derive(Clone, Copy, Debug)]
pub struct Region {
    /// Bytes of address space (whole pages).
    pub len: u64,
    pub page: PageSize,
    pub kind: RegionKind,
    pub policy: Policy,
    /// Node of the vCPU that created it (for `Policy::Local` lazy faults).
    pub home: NodeId,
    pub dma32: bool,
    /// Access of pages whose entry is empty (lazy pages never touched nor protected).
    pub base: u32,
}

impl Region {
    /// Number of pages of `self.page` size.
    pub fn pages(&self) -> u64 {
        self.len / self.page.bytes()
    }

    /// Frames per page.
    pub fn frames_per_page(&self) -> u64 {
        self.page.bytes() / PAGE_SIZE
    }

    /// What a page's leaf entry `e` means in this region.
    pub fn page_entry(&self, e: Pte) -> PageEntry {
        if e.is_present() {
            PageEntry::Mapped(e.gfn(), prot_of(e.flags()))
        } else if let Some(g) = e.soft_frame() {
            PageEntry::Parked(g, e.soft_prot())
        } else if e.is_soft() {
            PageEntry::Untouched(e.soft_prot())
        } else if e.is_occupied() {
            PageEntry::Foreign
        } else {
            PageEntry::Untouched(self.base)
        }
    }

    /// The entry for a page with frame `gfn` (if any) and access `p`.
    pub fn entry_for(&self, gfn: Option<Gfn>, p: u32) -> Pte {
        match (gfn, leaf_flags(p)) {
            (Some(g), Some(flags)) => leaf_pte(g, self.page, flags),
            (Some(g), None) => Pte::soft(p, Some(g)),
            // An untouched page keeps an entry only where its access differs from the base.
            (None, _) if p == self.base => Pte(0),
            (None, _) => Pte::soft(p, None),
        }
    }
}

/// A page as its leaf entry describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageEntry {
    /// Accessible: mapped to this frame with this access.
    Mapped(Gfn, u32),
    /// Has a frame, mapped nowhere right now (`prot::NONE`), access kept.
    Parked(Gfn, u32),
    /// No frame yet (lazy), with this access.
    Untouched(u32),
    /// Something a region never writes (a broken entry).
    Foreign,
}

impl PageEntry {
    /// The page's frame.
    pub fn frame(self) -> Option<Gfn> {
        match self {
            PageEntry::Mapped(g, _) | PageEntry::Parked(g, _) => Some(g),
            PageEntry::Untouched(_) | PageEntry::Foreign => None,
        }
    }

    /// The page's access.
    pub fn prot(self) -> u32 {
        match self {
            PageEntry::Mapped(_, p) | PageEntry::Parked(_, p) | PageEntry::Untouched(p) => p,
            PageEntry::Foreign => prot::NONE,
        }
    }
}

/// Leaf flags for `prot` bits (`None`: no access, nothing mapped).
pub fn leaf_flags(p: u32) -> Option<PteFlags> {
    if p & prot::ALL == prot::NONE {
        return None;
    }
    let mut f = PteFlags::USER;
    f.set(PteFlags::WRITABLE, p & prot::WRITE != 0);
    f.set(PteFlags::NO_EXECUTE, p & prot::EXEC == 0);
    Some(f)
}

/// `prot` bits of a present leaf's flags (every present guest leaf is readable).
pub fn prot_of(f: PteFlags) -> u32 {
    let mut p = prot::READ;
    if f.contains(PteFlags::WRITABLE) {
        p |= prot::WRITE;
    }
    if !f.contains(PteFlags::NO_EXECUTE) {
        p |= prot::EXEC;
    }
    p
}

/// Sorts runs and merges the adjacent ones, for fewer host calls.
pub fn coalesce(mut runs: Vec<Run>) -> Vec<Run> {
    runs.sort_unstable();
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    for (g, n) in runs {
        match out.last_mut() {
            Some((lg, ln)) if lg.plus(*ln) == g => *ln += n,
            _ => out.push((g, n)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_adjacent() {
        let runs = vec![(Gfn(8), 4), (Gfn(0), 4), (Gfn(4), 2), (Gfn(20), 1)];
        assert_eq!(coalesce(runs), vec![(Gfn(0), 6), (Gfn(8), 4), (Gfn(20), 1)]);
    }

    #[test]
    fn entries_round_trip() {
        let rw = prot::READ | prot::WRITE;
        let r = Region {
            len: 8 * PAGE_SIZE,
            page: PageSize::Size4K,
            kind: RegionKind::Lazy,
            policy: Policy::Local,
            home: NodeId(0),
            dma32: false,
            base: rw,
        };
        for p in [prot::NONE, prot::READ, rw, prot::READ | prot::EXEC] {
            for g in [None, Some(Gfn(42))] {
                let e = r.page_entry(r.entry_for(g, p));
                assert_eq!((e.frame(), e.prot()), (g, p));
            }
        }
        assert_eq!(r.entry_for(None, rw), Pte(0));
        assert_eq!(r.page_entry(Pte(0)), PageEntry::Untouched(rw));
    }
}
