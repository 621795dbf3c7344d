//! Installing and clearing leaves: page tables built on demand, present leaves counted per leaf
//! table (an emptied table loses its host memory), and translations dropped after a present leaf
//! changed.

use std::sync::Arc;

use crate::memory::addr::{Gfn, Gva, PAGE_SIZE};
use crate::memory::frames::Run;
use crate::memory::frames::page_state::FrameState;

use super::pagetable::{self, PageSize, PtError, Pte, PteFlags};
use super::region::{Region, coalesce};
use super::{AddressSpace, Phys, SpaceError};

/// Wraps a page-table failure at `va`.
fn pt_error(va: Gva) -> impl FnOnce(PtError) -> SpaceError {
    move |source| SpaceError::PageTable { va, source }
}

impl AddressSpace {
    /// Maps `pages` consecutive frames from `gfn` at `va` with 4 KiB leaves (boot memory).
    pub fn map_pages(
        &mut self,
        phys: &mut Phys<'_>,
        va: Gva,
        gfn: Gfn,
        pages: u64,
        flags: PteFlags,
    ) -> Result<(), SpaceError> {
        for i in 0..pages {
            self.map_one(phys, Gva(va.0 + i * PAGE_SIZE), gfn.plus(i), PageSize::Size4K, flags)?;
        }
        Ok(())
    }

    /// Maps one leaf (counted in its table; a discarded table gets backing again first).
    pub fn map_one(
        &mut self,
        phys: &mut Phys<'_>,
        va: Gva,
        gfn: Gfn,
        size: PageSize,
        flags: PteFlags,
    ) -> Result<(), SpaceError> {
        let ram = Arc::clone(phys.backing.ram());
        if let Some(t) = self.pt.leaf_table(ram.mem(), va, size) {
            phys.backing.make_resident(t)?;
        }
        let mut alloc = || phys.alloc_table();
        self.pt.map(ram.mem(), &mut alloc, va, gfn, size, flags).map_err(pt_error(va))?;
        let t = self.pt.leaf_table(ram.mem(), va, size).expect("the leaf was just mapped");
        *self.leaves.entry(t).or_default() += 1;
        Ok(())
    }

    /// Changes the permissions of the leaf at `va`; returns the old entry (`None`: not mapped).
    pub(super) fn protect_one(
        &mut self,
        phys: &Phys<'_>,
        va: Gva,
        size: PageSize,
        flags: PteFlags,
    ) -> Result<Option<Pte>, SpaceError> {
        let mem = phys.backing.ram().mem();
        let Some(t) = self.pt.leaf_table(mem, va, size) else { return Ok(None) };
        if phys.frames.states().get(t) != FrameState::Resident {
            return Ok(None);
        }
        match self.pt.protect(mem, va, size, flags) {
            Ok(old) => Ok(Some(old)),
            Err(PtError::NotMapped { .. }) => Ok(None),
            Err(source) => Err(SpaceError::PageTable { va, source }),
        }
    }

    /// Builds every page table `[va, va + len)` needs, before anything is mapped, so a request
    /// that cannot get its tables fails cleanly with `NoMemory`.
    pub(super) fn ensure_tables(
        &mut self,
        phys: &mut Phys<'_>,
        va: u64,
        len: u64,
        size: PageSize,
    ) -> Result<(), SpaceError> {
        let span = pagetable::table_span(size);
        let ram = Arc::clone(phys.backing.ram());
        let mut at = va;
        while at < va + len {
            let mut alloc = || phys.alloc_table();
            match self.pt.walk_to_leaf_table(ram.mem(), Some(&mut alloc), Gva(at), size) {
                Ok(_) => {}
                Err(PtError::NoTableMemory) => return Err(SpaceError::NoMemory),
                Err(source) => return Err(SpaceError::PageTable { va: Gva(at), source }),
            }
            at = (at / span + 1) * span;
        }
        Ok(())
    }

    /// Maps `(page index, frame)` pairs of `region` with `flags`, one leaf table at a time.
    pub(super) fn map_pages_of(
        &mut self,
        phys: &mut Phys<'_>,
        region: &Region,
        pages: &[(u64, Gfn)],
        flags: PteFlags,
    ) -> Result<(), SpaceError> {
        let size = region.page;
        let ram = Arc::clone(phys.backing.ram());
        let mem = ram.mem();
        let mut i = 0;
        while i < pages.len() {
            let va = region.page_va(pages[i].0);
            // The leaf table for this stretch: created if missing, backed if discarded.
            let mut alloc = || phys.alloc_table();
            let table = self
                .pt
                .walk_to_leaf_table(mem, Some(&mut alloc), va, size)
                .map_err(pt_error(va))?
                .expect("tables are created");
            phys.backing.make_resident(table)?;
            let span_end = (va.0 / pagetable::table_span(size) + 1) * pagetable::table_span(size);
            let mut count = 0;
            while i < pages.len() && region.page_va(pages[i].0).0 < span_end {
                let (idx, gfn) = pages[i];
                let v = region.page_va(idx);
                let slot = pagetable::leaf_slot(table, v, size);
                let ok =
                    pagetable::install_entry(mem, slot, pagetable::leaf_pte(gfn, size, flags)).map_err(pt_error(v))?;
                if !ok {
                    return Err(SpaceError::PageTable { va: v, source: PtError::AlreadyMapped { va: v } });
                }
                count += 1;
                i += 1;
            }
            *self.leaves.entry(table).or_default() += count;
        }
        Ok(())
    }

    /// Clears the leaves of pages `[a, b)` of `region`, one leaf table at a time, collecting
    /// the frames that were mapped into `present`. Empty tables lose their backing.
    pub(super) fn unmap_pages_of(
        &mut self,
        phys: &Phys<'_>,
        region: &Region,
        a: u64,
        b: u64,
        present: &mut Vec<Run>,
    ) -> Result<(), SpaceError> {
        let size = region.page;
        let mem = phys.backing.ram().mem();
        let span = pagetable::table_span(size);
        let mut i = a;
        while i < b {
            let va = region.page_va(i);
            let span_end = (va.0 / span + 1) * span;
            let last = ((span_end - region.va) / size.bytes()).min(b);
            let table = self.pt.leaf_table(mem, va, size);
            if let Some(t) = table.filter(|&t| phys.frames.states().get(t) == FrameState::Resident) {
                let mut cleared = 0;
                for j in i..last {
                    let v = region.page_va(j);
                    let old: Pte =
                        pagetable::clear_entry(mem, pagetable::leaf_slot(t, v, size)).map_err(pt_error(v))?;
                    if old.is_present() {
                        present.push((old.gfn(), region.frames_per_page()));
                        cleared += 1;
                    }
                }
                if cleared > 0 {
                    let n = self.leaves.get_mut(&t).expect("mapped leaves are counted");
                    *n -= cleared;
                    if *n == 0 {
                        self.leaves.remove(&t);
                        // An empty leaf table keeps its place (its parent entry never changes)
                        // but not its host memory: KVM's walks through it read the zero page.
                        if phys.backing.zero(t)? {
                            self.counters.tables_discarded += 1;
                        }
                    }
                }
            }
            i = last;
        }
        Ok(())
    }

    /// Drops every translation of frames whose present leaf changed.
    pub(super) fn invalidate(&mut self, phys: &Phys<'_>, changed: Vec<Run>) -> Result<(), SpaceError> {
        if changed.is_empty() {
            return Ok(());
        }
        let runs = coalesce(changed);
        self.counters.invalidations += runs.len() as u64;
        Ok(phys.backing.invalidate(&runs)?)
    }
}
