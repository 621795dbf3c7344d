//! Leaf entries: page tables built on demand, occupied entries (present leaves and software
//! entries) counted per leaf table so that an emptied table loses its host memory, and
//! translations dropped after a present leaf changed.
//!
//! Every change to a range of a region's entries goes through [`AddressSpace::edit`], which
//! walks the range one leaf table at a time and hands each entry to a closure that returns its
//! replacement.

use std::sync::Arc;

use crate::memory::addr::{Gfn, Gva, PAGE_SIZE};
use crate::memory::backing::Backing;
use crate::memory::frames::page_state::FrameState;
use crate::memory::frames::{Frames, Run};

use super::pagetable::{self, PageSize, PtError, Pte, PteFlags};
use super::region::coalesce;
use super::{AddressSpace, Phys, SpaceError};

/// Wraps a page-table failure at `va`.
fn pt_error(va: Gva) -> impl FnOnce(PtError) -> SpaceError {
    move |source| SpaceError::PageTable { va, source }
}

/// A range of pages for [`AddressSpace::edit`]: pages `first..end` of `size` from `base`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Span {
    pub base: u64,
    pub size: PageSize,
    pub first: u64,
    pub end: u64,
}

impl Span {
    fn va(&self, i: u64) -> Gva {
        Gva(self.base + i * self.size.bytes())
    }
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

    /// Replaces the entries of the pages of `span`, one leaf table at a time: `f(page, old)`
    /// returns each page's new entry. With `create`, missing tables are built (the caller ran
    /// [`ensure_tables`](Self::ensure_tables) first, so this cannot run out of memory half-way)
    /// and discarded ones backed again; without it, pages under a missing or discarded table
    /// read as empty and must stay empty. Leaf tables whose last entry goes lose their host
    /// memory. Returns the frames of present leaves that changed: their translations must be
    /// dropped (by a discard or [`invalidate`](Self::invalidate)).
    pub(super) fn edit(
        &mut self,
        phys: &mut Phys<'_>,
        span: Span,
        create: bool,
        mut f: impl FnMut(u64, Pte) -> Pte,
    ) -> Result<Vec<Run>, SpaceError> {
        let size = span.size;
        let frames_per_page = size.bytes() / PAGE_SIZE;
        let ram = Arc::clone(phys.backing.ram());
        let mem = ram.mem();
        let table_span = pagetable::table_span(size);
        let mut changed = Vec::new();
        let mut i = span.first;
        while i < span.end {
            let va = span.va(i);
            let stop = ((va.0 / table_span + 1) * table_span - span.base) / size.bytes();
            let last = stop.min(span.end);
            let table = if create {
                let mut alloc = || phys.alloc_table();
                let t = self
                    .pt
                    .walk_to_leaf_table(mem, Some(&mut alloc), va, size)
                    .map_err(pt_error(va))?
                    .expect("tables are created");
                phys.backing.make_resident(t)?;
                Some(t)
            } else {
                self.pt.leaf_table(mem, va, size).filter(|&t| phys.frames.states().get(t) == FrameState::Resident)
            };
            let Some(t) = table else {
                for j in i..last {
                    let new = f(j, Pte(0));
                    if new.is_occupied() {
                        return Err(SpaceError::PageTable { va: span.va(j), source: PtError::NotMapped { va } });
                    }
                }
                i = last;
                continue;
            };
            let (mut added, mut removed) = (0u32, 0u32);
            for j in i..last {
                let v = span.va(j);
                let slot = pagetable::leaf_slot(t, v, size);
                let old = pagetable::read_entry(mem, slot).map_err(pt_error(v))?;
                let new = f(j, old);
                if new == old {
                    continue;
                }
                let old = pagetable::replace_entry(mem, slot, new).map_err(pt_error(v))?;
                if old.is_present() {
                    changed.push((old.gfn(), frames_per_page));
                }
                match (old.is_occupied(), new.is_occupied()) {
                    (false, true) => added += 1,
                    (true, false) => removed += 1,
                    _ => {}
                }
            }
            if added != removed {
                let n = self.leaves.entry(t).or_default();
                *n = *n + added - removed;
                if *n == 0 {
                    self.leaves.remove(&t);
                    // An empty leaf table keeps its place (its parent entry never changes) but
                    // not its host memory: KVM's walks through it read the shared zero page.
                    if phys.backing.zero(t)? {
                        self.counters.tables_discarded += 1;
                    }
                }
            }
            i = last;
        }
        Ok(changed)
    }

    /// The entry of page `i` of the pages of `size` from `base` (empty where no table holds it).
    pub(super) fn entry(
        &self,
        frames: &Frames,
        backing: &Backing,
        base: u64,
        size: PageSize,
        i: u64,
    ) -> Result<Pte, SpaceError> {
        let va = Gva(base + i * size.bytes());
        let mem = backing.ram().mem();
        match self.pt.leaf_table(mem, va, size).filter(|&t| frames.states().get(t) == FrameState::Resident) {
            Some(t) => pagetable::read_entry(mem, pagetable::leaf_slot(t, va, size)).map_err(pt_error(va)),
            None => Ok(Pte(0)),
        }
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
