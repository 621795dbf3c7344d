//! MOVE: mapping a region's frames at a new address (like `mremap`).

use super::mapping::Span;
use super::pagetable::{PageSize, Pte};
use super::{AddressSpace, Phys, SpaceError};

/// Pages moved per step (one leaf table's worth of 4 KiB pages).
const CHUNK: u64 = 512;

impl AddressSpace {
    /// MOVE: maps the region's frames at a new address, each page with its own access, and
    /// unmaps the old one.
    pub fn move_region(&mut self, phys: &mut Phys<'_>, va: u64) -> Result<u64, SpaceError> {
        let region = *self.regions.get(&va).ok_or(SpaceError::NotFound)?;
        let zone = match region.page {
            PageSize::Size4K => &mut self.va_small,
            PageSize::Size2M => &mut self.va_huge,
        };
        let new_va = zone.alloc(region.len).ok_or(SpaceError::NoMemory)?;
        if let Err(e) = self.ensure_tables(phys, new_va, region.len, region.page) {
            self.release_va(new_va, region.len, region.page);
            return Err(e);
        }
        let mut changed = Vec::new();
        let mut moved: Vec<Pte> = Vec::with_capacity(crate::memory::addr::to_usize(CHUNK));
        let mut first = 0;
        while first < region.pages() {
            let end = (first + CHUNK).min(region.pages());
            moved.clear();
            let old = Span { base: va, size: region.page, first, end };
            changed.extend(self.edit(phys, old, false, |_, e| {
                moved.push(e);
                Pte(0)
            })?);
            let new = Span { base: new_va, size: region.page, first, end };
            let mut it = moved.iter();
            self.edit(phys, new, true, |_, _| {
                let e = *it.next().expect("one entry per page");
                // A present leaf keeps its frame and access; at the new address it starts
                // accessed, and dirty when writable, as every new leaf does (`leaf_pte`).
                if e.is_present() { region.entry_for(Some(e.gfn()), super::region::prot_of(e.flags())) } else { e }
            })?;
            first = end;
        }
        self.invalidate(phys, changed)?;
        self.release_va(va, region.len, region.page);
        let region = self.regions.remove(&va).expect("looked up above");
        self.regions.insert(new_va, region);
        Ok(new_va)
    }
}
