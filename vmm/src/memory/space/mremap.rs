//! MOVE: mapping a region's frames at a new address (like `mremap`).

use std::collections::BTreeMap;

use crate::memory::addr::Gfn;

use super::pagetable::{PageSize, PteFlags};
use super::region::{RegionKind, leaf_flags};
use super::{AddressSpace, Phys, SpaceError};

impl AddressSpace {
    /// MOVE: maps the region's frames at a new address and unmaps the old one.
    pub fn move_region(&mut self, phys: &mut Phys<'_>, va: u64) -> Result<u64, SpaceError> {
        if self.regions.get(&va).is_some_and(|r| r.kind == RegionKind::Slab) {
            return Err(SpaceError::NotFound);
        }
        let mut region = self.regions.remove(&va).ok_or(SpaceError::NotFound)?;
        let zone = match region.page {
            PageSize::Size4K => &mut self.va_small,
            PageSize::Size2M => &mut self.va_huge,
        };
        let Some(new_va) = zone.alloc(region.len) else {
            self.regions.insert(va, region);
            return Err(SpaceError::NoMemory);
        };
        if let Err(e) = self.ensure_tables(phys, new_va, region.len, region.page) {
            self.release_va(new_va, region.len, region.page);
            self.regions.insert(va, region);
            return Err(e);
        }
        let mut present = Vec::new();
        self.unmap_pages_of(phys, &region, 0, region.pages(), &mut present)?;
        let old_va = region.va;
        region.va = new_va;
        // Map every page that has a frame and is accessible, with its own access.
        let mut by_flags: BTreeMap<u64, Vec<(u64, Gfn)>> = BTreeMap::new();
        for i in 0..region.pages() {
            if let (Some(g), Some(f)) = (region.frame(i), leaf_flags(region.prot_at(i))) {
                by_flags.entry(f.bits()).or_default().push((i, g));
            }
        }
        for (bits, pages) in by_flags {
            self.map_pages_of(phys, &region, &pages, PteFlags::from_bits_truncate(bits))?;
        }
        self.invalidate(phys, present)?;
        self.release_va(old_va, region.len, region.page);
        self.regions.insert(new_va, region);
        Ok(new_va)
    }
}
