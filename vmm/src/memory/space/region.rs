//! A guest region: a range of guest-virtual addresses in one of the VA zones and the frames
//! behind its pages, either chosen at allocation (`Alloc`, `Slab`) or allocated page by page when
//! the guest first touches them (`Lazy`), with per-page access rights.

use std::collections::BTreeMap;

use protocol::memcall::prot;

use crate::memory::addr::{Gfn, Gva, NodeId, PAGE_SIZE};
use crate::memory::frames::Run;
use crate::memory::frames::policy::Policy;

use super::pagetable::{PageSize, PteFlags};

/// How a region's pages get frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Frames chosen at allocation.
    Alloc,
    /// Frames allocated when a page is first touched.
    Lazy,
    /// A slab of the slab allocator: mapped for the guest, owned by the VMM (the guest cannot
    /// free, protect or move it).
    Slab,
}

/// One guest region.
#[derive(Debug)]
pub struct Region {
    pub va: u64,
    /// Bytes of address space (whole pages).
    pub len: u64,
    pub page: PageSize,
    pub kind: RegionKind,
    pub policy: Policy,
    /// Node of the vCPU that created it (for `Policy::Local` lazy faults).
    pub home: NodeId,
    pub dma32: bool,
    /// `Alloc`: runs of frames backing consecutive pages, in address order.
    pub runs: Vec<Run>,
    /// `Lazy`: page index -> frame, for pages touched so far.
    pub lazy: BTreeMap<u64, Gfn>,
    /// Access as a step function: page index -> `prot` bits from that page on.
    pub prot: BTreeMap<u64, u32>,
}

impl Region {
    /// A region of `kind` at `va` backed by `runs` (none for lazy regions), all of it with
    /// access `p`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        va: u64,
        len: u64,
        page: PageSize,
        kind: RegionKind,
        policy: Policy,
        home: NodeId,
        dma32: bool,
        runs: Vec<Run>,
        p: u32,
    ) -> Region {
        Region { va, len, page, kind, policy, home, dma32, runs, lazy: BTreeMap::new(), prot: BTreeMap::from([(0, p)]) }
    }

    /// Number of pages of `self.page` size.
    pub fn pages(&self) -> u64 {
        self.len / self.page.bytes()
    }

    /// Frames per page.
    pub(super) fn frames_per_page(&self) -> u64 {
        self.page.bytes() / PAGE_SIZE
    }

    /// Access of page `i`.
    pub fn prot_at(&self, i: u64) -> u32 {
        self.prot.range(..=i).next_back().map_or(prot::NONE, |(_, &p)| p)
    }

    /// Sets the access of pages `[a, b)`.
    pub(super) fn set_prot(&mut self, a: u64, b: u64, p: u32) {
        let after = (b < self.pages()).then(|| self.prot_at(b));
        let inside: Vec<u64> = self.prot.range(a..b).map(|(&k, _)| k).collect();
        for k in inside {
            self.prot.remove(&k);
        }
        self.prot.insert(a, p);
        if let Some(after) = after {
            self.prot.insert(b, after);
        }
    }

    /// The first frame of page `i`, if it has one.
    pub fn frame(&self, i: u64) -> Option<Gfn> {
        match self.kind {
            RegionKind::Lazy => self.lazy.get(&i).copied(),
            RegionKind::Alloc | RegionKind::Slab => {
                let mut frame = i * self.frames_per_page();
                for &(g, n) in &self.runs {
                    if frame < n {
                        return Some(g.plus(frame));
                    }
                    frame -= n;
                }
                None
            }
        }
    }

    /// Address of page `i`.
    pub(super) fn page_va(&self, i: u64) -> Gva {
        Gva(self.va + i * self.page.bytes())
    }

    /// Every frame run the region owns.
    pub(super) fn owned_runs(&self) -> Vec<Run> {
        match self.kind {
            RegionKind::Alloc | RegionKind::Slab => self.runs.clone(),
            RegionKind::Lazy => self.lazy.values().map(|&g| (g, 1)).collect(),
        }
    }
}

/// Leaf flags for `prot` bits (`None`: no access, nothing mapped).
pub(super) fn leaf_flags(p: u32) -> Option<PteFlags> {
    if p & prot::ALL == prot::NONE {
        return None;
    }
    let mut f = PteFlags::USER;
    f.set(PteFlags::WRITABLE, p & prot::WRITE != 0);
    f.set(PteFlags::NO_EXECUTE, p & prot::EXEC == 0);
    Some(f)
}

/// Sorts runs and merges the adjacent ones, for fewer host calls.
pub(super) fn coalesce(mut runs: Vec<Run>) -> Vec<Run> {
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
}
