//! PROTECT: changing the access rights of whole pages of a region.

use protocol::memcall::prot;

use super::region::{Region, RegionKind, leaf_flags};
use super::{AddressSpace, Phys, SpaceError};

impl AddressSpace {
    /// PROTECT: sets the access of whole pages `[va, va + size)` of one region. `prot::NONE`
    /// unmaps them and keeps their frames; making them accessible again maps the same frames.
    pub fn protect_region(&mut self, phys: &mut Phys<'_>, va: u64, size: u64, p: u32) -> Result<(), SpaceError> {
        if p & !prot::ALL != 0 {
            return Err(SpaceError::Invalid("unknown protection bits"));
        }
        let start = self.region_containing(va).ok_or(SpaceError::NotFound)?;
        if self.regions[&start].kind == RegionKind::Slab {
            return Err(SpaceError::NotFound);
        }
        let mut region = self.regions.remove(&start).expect("found above");
        let res = self.protect_in(phys, &region, va, size, p);
        if res.is_ok() {
            let ps = region.page.bytes();
            region.set_prot((va - start) / ps, (va - start + size) / ps, p);
        }
        self.regions.insert(start, region);
        res
    }

    fn protect_in(
        &mut self,
        phys: &mut Phys<'_>,
        region: &Region,
        va: u64,
        size: u64,
        p: u32,
    ) -> Result<(), SpaceError> {
        let ps = region.page.bytes();
        if size == 0 || !va.is_multiple_of(ps) || !size.is_multiple_of(ps) {
            return Err(SpaceError::Invalid("protect needs whole pages"));
        }
        let end = va.checked_add(size).ok_or(SpaceError::Invalid("range overflows"))?;
        if end > region.va + region.len {
            return Err(SpaceError::Invalid("range crosses the end of the region"));
        }
        let (a, b) = ((va - region.va) / ps, (end - region.va) / ps);
        let mut changed = Vec::new();
        match leaf_flags(p) {
            None => self.unmap_pages_of(phys, region, a, b, &mut changed)?,
            Some(flags) => {
                let mut newly = Vec::new();
                for i in a..b {
                    let Some(gfn) = region.frame(i) else { continue };
                    match self.protect_one(phys, region.page_va(i), region.page, flags)? {
                        Some(old) => changed.push((old.gfn(), region.frames_per_page())),
                        None => newly.push((i, gfn)),
                    }
                }
                self.map_pages_of(phys, region, &newly, flags)?;
            }
        }
        self.invalidate(phys, changed)
    }
}
