//! PROTECT: changing the access rights of whole pages of a region.

use protocol::memcall::prot;

use super::mapping::Span;
use super::region::RegionKind;
use super::{AddressSpace, Phys, SpaceError};

impl AddressSpace {
    /// PROTECT: sets the access of whole pages `[va, va + size)` of one region. `prot::NONE`
    /// unmaps them and keeps their frames (parked in their entries); making them accessible
    /// again maps the same frames. Untouched lazy pages keep their new access for when they are
    /// touched.
    pub fn protect_region(&mut self, phys: &mut Phys<'_>, va: u64, size: u64, p: u32) -> Result<(), SpaceError> {
        if p & !prot::ALL != 0 {
            return Err(SpaceError::Invalid("unknown protection bits"));
        }
        if p & (prot::WRITE | prot::EXEC) == prot::WRITE | prot::EXEC {
            return Err(SpaceError::Invalid("memory is never writable and executable at once (W^X)"));
        }
        let start = self.region_containing(va).ok_or(SpaceError::NotFound)?;
        let r = self.regions[&start];
        let ps = r.page.bytes();
        if size == 0 || !va.is_multiple_of(ps) || !size.is_multiple_of(ps) {
            return Err(SpaceError::Invalid("protect needs whole pages"));
        }
        let end = va.checked_add(size).ok_or(SpaceError::Invalid("range overflows"))?;
        if end > start + r.len {
            return Err(SpaceError::Invalid("range crosses the end of the region"));
        }
        // Untouched lazy pages get an entry when their access differs from the region's base:
        // build the tables first, so that nothing changes if there is no memory for them.
        let create = r.kind == RegionKind::Lazy && p != r.base;
        if create {
            self.ensure_tables(phys, va, size, r.page)?;
        }
        let span = Span { base: start, size: r.page, first: (va - start) / ps, end: (end - start) / ps };
        let changed = self.edit(phys, span, create, |_, old| r.entry_for(r.page_entry(old).frame(), p))?;
        self.invalidate(phys, changed)
    }
}
