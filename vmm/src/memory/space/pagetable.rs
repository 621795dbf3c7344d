//! x86-64 4-level page tables that the VMM builds in guest memory.
//!
//! The guest runs at CPL3 and never sees these pages: table frames are not mapped into its
//! address space. Entries are read and written with atomic operations because the CPU (or KVM's
//! shadow MMU) sets the accessed and dirty bits concurrently; a plain read-modify-write could lose
//! a dirty bit, and a lost dirty bit would lose guest data once swap arrives.
//!
//! Invariants the memory manager relies on (see `protocol::layout`):
//! - Intermediate entries are always `PRESENT | WRITABLE | USER`; leaves carry the permissions.
//! - Once a page-directory entry points to a page table it never becomes a 2 MiB leaf, and a
//!   2 MiB leaf slot never gets a page table. Table pages are never freed or repurposed. Together
//!   these keep shadow-paging hosts (which cache walks by table frame) from using a stale walk.
//! - Changing or clearing a present leaf is not enough on its own: the caller must then drop
//!   the host mapping of the old frame (the address space does) so that every cached
//!   translation goes.
//!
//! A leaf entry that is not present may be a *software entry* ([`Pte::soft`]), the way Linux
//! keeps swap entries and `PROT_NONE` pages in its page tables: the CPU ignores every bit of a
//! non-present entry but the present bit, so the VMM keeps a page's access rights there, and the
//! frame of a page the guest may not access right now. The guest cannot reach its page tables,
//! and the VMM needs no per-page memory of its own for what the tables already hold.

use std::sync::atomic::{AtomicU64, Ordering};

use bitflags::bitflags;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileMemory};

use crate::memory::addr::{Gfn, Gva, HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::memory::backing::ram::GuestMemoryMmap;

bitflags! {
    /// Page-table entry bits (Intel SDM vol. 3, 4.5).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PteFlags: u64 {
        /// The entry maps something.
        const PRESENT = 1 << 0;
        /// Writes allowed.
        const WRITABLE = 1 << 1;
        /// CPL3 accesses allowed.
        const USER = 1 << 2;
        /// Write-through caching.
        const WRITE_THROUGH = 1 << 3;
        /// Caching disabled.
        const NO_CACHE = 1 << 4;
        /// Set by the CPU on any access.
        const ACCESSED = 1 << 5;
        /// Set by the CPU on a write (leaves only).
        const DIRTY = 1 << 6;
        /// In a PDE or PDPTE: the entry maps a 2 MiB or 1 GiB page.
        const HUGE = 1 << 7;
        /// Not flushed on CR3 switches.
        const GLOBAL = 1 << 8;
        /// Instruction fetches not allowed (needs EFER.NXE).
        const NO_EXECUTE = 1 << 63;
    }
}

/// Physical-address bits of an entry (bits 12..51).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// A non-present software entry (bit 9, ignored by the CPU).
const SOFT: u64 = 1 << 9;
/// A software entry that holds a frame (bit 10).
const SOFT_FRAME: u64 = 1 << 10;
/// Where a software entry keeps `protocol::memcall::prot` bits (bits 52..54).
const SOFT_PROT_SHIFT: u32 = 52;
const SOFT_PROT_MASK: u64 = 0x7 << SOFT_PROT_SHIFT;
/// Flags of every non-leaf entry (accessed already, as the walk would set it).
const TABLE_FLAGS: PteFlags =
    PteFlags::PRESENT.union(PteFlags::WRITABLE).union(PteFlags::USER).union(PteFlags::ACCESSED);
/// Bits the CPU sets on its own; preserved or reported, never chosen by the VMM.
const HW_BITS: PteFlags = PteFlags::ACCESSED.union(PteFlags::DIRTY);

/// A page-table entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Pte(pub u64);

impl Pte {
    /// An entry mapping `gfn` with `flags`.
    pub fn new(gfn: Gfn, flags: PteFlags) -> Pte {
        Pte((gfn.gpa().0 & ADDR_MASK) | flags.bits())
    }

    /// The flags (unknown bits dropped).
    pub fn flags(self) -> PteFlags {
        PteFlags::from_bits_truncate(self.0)
    }

    /// The frame the entry points to.
    pub fn gfn(self) -> Gfn {
        Gfn::containing(GuestAddress(self.0 & ADDR_MASK))
    }

    /// Whether the entry is present.
    pub fn is_present(self) -> bool {
        self.flags().contains(PteFlags::PRESENT)
    }

    /// A non-present software entry: access rights `prot` (`protocol::memcall::prot` bits) and,
    /// optionally, the frame the page keeps while it is inaccessible.
    pub fn soft(prot: u32, frame: Option<Gfn>) -> Pte {
        let frame = frame.map_or(0, |g| (g.gpa().0 & ADDR_MASK) | SOFT_FRAME);
        Pte(SOFT | (u64::from(prot & 0x7) << SOFT_PROT_SHIFT) | frame)
    }

    /// Whether this is a software entry.
    pub fn is_soft(self) -> bool {
        !self.is_present() && self.0 & SOFT != 0
    }

    /// A software entry's access rights.
    pub fn soft_prot(self) -> u32 {
        // Three bits.
        #[allow(clippy::cast_possible_truncation)]
        let p = ((self.0 & SOFT_PROT_MASK) >> SOFT_PROT_SHIFT) as u32;
        p
    }

    /// A software entry's frame, if it holds one.
    pub fn soft_frame(self) -> Option<Gfn> {
        (self.is_soft() && self.0 & SOFT_FRAME != 0).then(|| Gfn::containing(GuestAddress(self.0 & ADDR_MASK)))
    }

    /// Whether the entry holds anything (a present leaf or a software entry).
    pub fn is_occupied(self) -> bool {
        self.0 != 0
    }
}

impl std::fmt::Debug for Pte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pte({:#x}, {:?})", self.0 & ADDR_MASK, self.flags())
    }
}

/// An index into a 512-entry table; always `< 512`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtIndex(u16);

impl PtIndex {
    /// The index for `level` (4 = PML4 .. 1 = PT) of `va`.
    pub fn of(va: Gva, level: u8) -> PtIndex {
        debug_assert!((1..=4).contains(&level));
        // Masked to 9 bits, so it fits.
        #[allow(clippy::cast_possible_truncation)]
        PtIndex(((va.0 >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff) as u16)
    }

    /// Byte offset of the entry within its table.
    pub fn offset(self) -> u64 {
        u64::from(self.0) * 8
    }
}

/// Leaf size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PageSize {
    Size4K,
    Size2M,
}

impl PageSize {
    /// Bytes mapped by one leaf.
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_SIZE,
            PageSize::Size2M => HUGE_PAGE_SIZE,
        }
    }

    /// Level of the leaf entry (1 = PT, 2 = PD).
    fn leaf_level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PtError {
    #[error("{va} is not canonical or not aligned to a {size:?} page")]
    BadAddress { va: Gva, size: PageSize },
    #[error("{va} is already mapped")]
    AlreadyMapped { va: Gva },
    #[error("{va} is not mapped")]
    NotMapped { va: Gva },
    #[error("{va}: a {size:?} mapping conflicts with the table structure there")]
    Conflict { va: Gva, size: PageSize },
    #[error("no memory for a page-table page")]
    NoTableMemory,
    #[error("page-table entry at {gpa:#x} is not in guest RAM")]
    Access { gpa: u64 },
}

/// Source of zeroed, resident frames for new table pages.
pub trait TableAlloc {
    /// A frame whose contents are zero and which the VMM may write right away.
    fn alloc_table(&mut self) -> Option<Gfn>;
}

impl<F: FnMut() -> Option<Gfn>> TableAlloc for F {
    fn alloc_table(&mut self) -> Option<Gfn> {
        self()
    }
}

/// A guest address space: the root table and a count of table pages.
#[derive(Debug)]
pub struct PageTables {
    root: Gfn,
    tables: u64,
}

impl PageTables {
    /// Takes a zeroed frame as the PML4.
    pub fn new(root: Gfn) -> Self {
        PageTables { root, tables: 1 }
    }

    /// The PML4 frame (for CR3).
    pub fn root(&self) -> Gfn {
        self.root
    }

    /// Table pages in use, including the root.
    pub fn table_pages(&self) -> u64 {
        self.tables
    }

    /// Maps `va` to `gfn` with `flags | PRESENT`. Fails if anything is mapped there.
    pub fn map(
        &mut self,
        mem: &GuestMemoryMmap,
        alloc: &mut dyn TableAlloc,
        va: Gva,
        gfn: Gfn,
        size: PageSize,
        flags: PteFlags,
    ) -> Result<(), PtError> {
        check_va(va, size)?;
        let slot = self.leaf_slot(mem, Some(alloc), va, size)?.ok_or(PtError::NoTableMemory)?;
        let new = leaf_pte(gfn, size, flags).0;
        with_entry(mem, slot, |e| {
            e.compare_exchange(0, new, Ordering::AcqRel, Ordering::Acquire)
                .map(|_| ())
                .map_err(|_| PtError::AlreadyMapped { va })
        })?
    }

    /// Clears the leaf for `va`; returns the old entry (with the CPU's accessed/dirty bits).
    pub fn unmap(&mut self, mem: &GuestMemoryMmap, va: Gva, size: PageSize) -> Result<Pte, PtError> {
        check_va(va, size)?;
        let slot = self.leaf_slot(mem, None, va, size)?.ok_or(PtError::NotMapped { va })?;
        let old = with_entry(mem, slot, |e| Pte(e.swap(0, Ordering::AcqRel)))?;
        if !old.is_present() {
            return Err(PtError::NotMapped { va });
        }
        Ok(old)
    }

    /// Replaces the permission bits of the leaf for `va`, keeping its frame and the CPU's
    /// accessed/dirty bits; returns the old entry.
    pub fn protect(&mut self, mem: &GuestMemoryMmap, va: Gva, size: PageSize, flags: PteFlags) -> Result<Pte, PtError> {
        check_va(va, size)?;
        let slot = self.leaf_slot(mem, None, va, size)?.ok_or(PtError::NotMapped { va })?;
        reprotect_entry(mem, slot, size, flags)?.ok_or(PtError::NotMapped { va })
    }

    /// The table holding `va`'s leaf entry of `size`, if the tables above it exist. Only reads
    /// the levels above the leaf table.
    pub fn leaf_table(&self, mem: &GuestMemoryMmap, va: Gva, size: PageSize) -> Option<Gfn> {
        let mut table = self.root;
        for level in (size.leaf_level() + 1..=4).rev() {
            let slot = table.gpa().0 + PtIndex::of(va, level).offset();
            let e = Pte(with_entry(mem, slot, |e| e.load(Ordering::Acquire)).ok()?);
            if !e.is_present() || e.flags().contains(PteFlags::HUGE) {
                return None;
            }
            table = e.gfn();
        }
        Some(table)
    }

    /// Walks the tables for `va`: the leaf entry and its size, if one is present.
    pub fn translate(&self, mem: &GuestMemoryMmap, va: Gva) -> Option<(Pte, PageSize)> {
        let mut table = self.root;
        for level in (1..=4u8).rev() {
            let slot = table.gpa().0 + PtIndex::of(va, level).offset();
            let e = Pte(with_entry(mem, slot, |e| e.load(Ordering::Acquire)).ok()?);
            if !e.is_present() {
                return None;
            }
            if level == 2 && e.flags().contains(PteFlags::HUGE) {
                return Some((e, PageSize::Size2M));
            }
            if level == 1 {
                return Some((e, PageSize::Size4K));
            }
            table = e.gfn();
        }
        None
    }

    /// The table holding `va`'s leaf of `size`, creating missing tables when `alloc` is given.
    /// `Ok(None)`: a table is missing and none may be created.
    pub fn walk_to_leaf_table(
        &mut self,
        mem: &GuestMemoryMmap,
        mut alloc: Option<&mut dyn TableAlloc>,
        va: Gva,
        size: PageSize,
    ) -> Result<Option<Gfn>, PtError> {
        check_va(va, size)?;
        let mut table = self.root;
        for level in (size.leaf_level() + 1..=4).rev() {
            let slot = table.gpa().0 + PtIndex::of(va, level).offset();
            let e = Pte(with_entry(mem, slot, |e| e.load(Ordering::Acquire))?);
            if e.is_present() {
                if e.flags().contains(PteFlags::HUGE) {
                    return Err(PtError::Conflict { va, size });
                }
                table = e.gfn();
                continue;
            }
            let Some(a) = alloc.as_deref_mut() else { return Ok(None) };
            let new_table = a.alloc_table().ok_or(PtError::NoTableMemory)?;
            let entry = Pte::new(new_table, TABLE_FLAGS).0;
            // Only the memory manager writes tables (under its lock), so this cannot race.
            with_entry(mem, slot, |e| e.store(entry, Ordering::Release))?;
            self.tables += 1;
            table = new_table;
        }
        Ok(Some(table))
    }

    /// The guest-physical address of the leaf slot for `va`, creating missing tables when
    /// `alloc` is given. `Ok(None)`: a table is missing and none may be created.
    fn leaf_slot(
        &mut self,
        mem: &GuestMemoryMmap,
        alloc: Option<&mut dyn TableAlloc>,
        va: Gva,
        size: PageSize,
    ) -> Result<Option<u64>, PtError> {
        let Some(table) = self.walk_to_leaf_table(mem, alloc, va, size)? else { return Ok(None) };
        let slot = leaf_slot(table, va, size);
        if size == PageSize::Size4K {
            return Ok(Some(slot));
        }
        // A 2 MiB leaf must not replace a page-table pointer.
        let e = Pte(with_entry(mem, slot, |e| e.load(Ordering::Acquire))?);
        if e.is_present() && !e.flags().contains(PteFlags::HUGE) {
            return Err(PtError::Conflict { va, size });
        }
        Ok(Some(slot))
    }
}

/// The leaf entry for `(gfn, flags)` of `size` (present; HUGE for 2 MiB), already accessed, and
/// dirty when writable. Shadow paging (and EPT's A/D emulation) prefetches translations only
/// for the neighbours of a faulting page whose guest entries are accessed (KVM's
/// `pte_prefetch`: eight at a time, when the host pages are there), and it maps a clean
/// writable page read-only until a write faults to set its dirty bit. With both bits set, a
/// sequential first touch takes one shadow fault per eight pages, not one or two per page
/// (`scenario=touch`, 64 MiB in order: 16.3k -> 1.9k shadow faults, 5.6 -> 2.5 us per page). The
/// reclaim scan clears the accessed bit it reads; swap clears the dirty bit when it writes a
/// page out.
pub fn leaf_pte(gfn: Gfn, size: PageSize, flags: PteFlags) -> Pte {
    let mut f = (flags - HW_BITS) | PteFlags::PRESENT | PteFlags::ACCESSED;
    if flags.contains(PteFlags::WRITABLE) {
        f |= PteFlags::DIRTY;
    }
    f.set(PteFlags::HUGE, size == PageSize::Size2M);
    Pte::new(gfn, f)
}

/// Guest-physical address of `va`'s entry in its leaf table `table`.
pub fn leaf_slot(table: Gfn, va: Gva, size: PageSize) -> u64 {
    table.gpa().0 + PtIndex::of(va, size.leaf_level()).offset()
}

/// Bytes of address space one leaf table covers for leaves of `size`.
pub fn table_span(size: PageSize) -> u64 {
    size.bytes() * 512
}

/// Installs `new` at `slot` if the slot is empty; `false` if something is there.
pub fn install_entry(mem: &GuestMemoryMmap, slot: u64, new: Pte) -> Result<bool, PtError> {
    with_entry(mem, slot, |e| e.compare_exchange(0, new.0, Ordering::AcqRel, Ordering::Acquire).is_ok())
}

/// Clears the entry at `slot`; returns the old one (with the CPU's accessed/dirty bits).
pub fn clear_entry(mem: &GuestMemoryMmap, slot: u64) -> Result<Pte, PtError> {
    replace_entry(mem, slot, Pte(0))
}

/// Replaces the entry at `slot` with `new`; returns the old one (with the CPU's accessed/dirty
/// bits).
pub fn replace_entry(mem: &GuestMemoryMmap, slot: u64, new: Pte) -> Result<Pte, PtError> {
    with_entry(mem, slot, |e| Pte(e.swap(new.0, Ordering::AcqRel)))
}

/// The entry at `slot`.
pub fn read_entry(mem: &GuestMemoryMmap, slot: u64) -> Result<Pte, PtError> {
    with_entry(mem, slot, |e| Pte(e.load(Ordering::Acquire)))
}

/// Replaces the permission bits of the present entry at `slot`, keeping its frame and the CPU's
/// accessed/dirty bits; returns the old entry, or `None` if it was not present.
pub fn reprotect_entry(
    mem: &GuestMemoryMmap,
    slot: u64,
    size: PageSize,
    flags: PteFlags,
) -> Result<Option<Pte>, PtError> {
    with_entry(mem, slot, |e| {
        let mut cur = e.load(Ordering::Acquire);
        loop {
            let old = Pte(cur);
            if !old.is_present() {
                return None;
            }
            // Not `leaf_pte`: the CPU's bits stay as they are, neither cleared nor preset.
            let mut f = (flags - HW_BITS) | PteFlags::PRESENT | (old.flags() & HW_BITS);
            f.set(PteFlags::HUGE, size == PageSize::Size2M);
            let new = Pte::new(old.gfn(), f).0;
            match e.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(old),
                Err(now) => cur = now,
            }
        }
    })
}

/// Clears the accessed bit of the entry at `slot`; returns whether it was set. Atomic, so a
/// dirty bit the CPU sets meanwhile stays.
pub fn test_and_clear_accessed(mem: &GuestMemoryMmap, slot: u64) -> Result<bool, PtError> {
    let bit = PteFlags::ACCESSED.bits();
    with_entry(mem, slot, |e| e.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
}

/// Clears the dirty bit of the entry at `slot`; returns whether it was set.
pub fn test_and_clear_dirty(mem: &GuestMemoryMmap, slot: u64) -> Result<bool, PtError> {
    let bit = PteFlags::DIRTY.bits();
    with_entry(mem, slot, |e| e.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
}

/// Where the walk for `level` (4 = PML4 .. 1 = PT) puts the entry of `va` in `table`.
pub fn entry_slot(table: Gfn, va: Gva, level: u8) -> u64 {
    table.gpa().0 + PtIndex::of(va, level).offset()
}

fn check_va(va: Gva, size: PageSize) -> Result<(), PtError> {
    let canonical = va.0 < (1 << 47);
    if !canonical || !va.is_aligned(size.bytes()) {
        return Err(PtError::BadAddress { va, size });
    }
    Ok(())
}

/// Runs `f` on the 8-byte entry at guest-physical `gpa`, accessed atomically.
fn with_entry<R>(mem: &GuestMemoryMmap, gpa: u64, f: impl FnOnce(&AtomicU64) -> R) -> Result<R, PtError> {
    let slice = mem.get_slice(GuestAddress(gpa), 8).map_err(|_| PtError::Access { gpa })?;
    let atomic = slice.get_atomic_ref::<AtomicU64>(0).map_err(|_| PtError::Access { gpa })?;
    Ok(f(atomic))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (GuestMemoryMmap, PageTables, impl FnMut() -> Option<Gfn>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let mut next = 1u64;
        let alloc = move || {
            next += 1;
            Some(Gfn(next))
        };
        (mem, PageTables::new(Gfn(1)), alloc)
    }

    #[test]
    fn map_translate_unmap() {
        let (mem, mut pt, mut alloc) = setup();
        let va = Gva(0x10_0000_3000);
        let rw = PteFlags::WRITABLE | PteFlags::USER | PteFlags::NO_EXECUTE;
        pt.map(&mem, &mut alloc, va, Gfn(0x1234), PageSize::Size4K, rw).unwrap();
        assert_eq!(pt.table_pages(), 4);
        let (e, size) = pt.translate(&mem, va).unwrap();
        assert_eq!((e.gfn(), size), (Gfn(0x1234), PageSize::Size4K));
        // New leaves come accessed, and dirty when writable (see `leaf_pte`).
        let hw = PteFlags::ACCESSED | PteFlags::DIRTY;
        assert_eq!(e.flags(), rw | PteFlags::PRESENT | hw);
        assert_eq!(pt.map(&mem, &mut alloc, va, Gfn(1), PageSize::Size4K, rw), Err(PtError::AlreadyMapped { va }));
        let old = pt.protect(&mem, va, PageSize::Size4K, PteFlags::USER).unwrap();
        assert_eq!(old.flags(), rw | PteFlags::PRESENT | hw);
        assert!(!pt.translate(&mem, va).unwrap().0.flags().contains(PteFlags::WRITABLE));
        assert_eq!(pt.unmap(&mem, va, PageSize::Size4K).unwrap().gfn(), Gfn(0x1234));
        assert!(pt.translate(&mem, va).is_none());
        assert_eq!(pt.unmap(&mem, va, PageSize::Size4K), Err(PtError::NotMapped { va }));
    }

    #[test]
    fn software_entries() {
        let e = Pte::soft(5, Some(Gfn(0x1234)));
        assert!(e.is_soft() && e.is_occupied() && !e.is_present());
        assert_eq!((e.soft_prot(), e.soft_frame()), (5, Some(Gfn(0x1234))));
        let m = Pte::soft(0, None);
        assert!(m.is_soft() && m.is_occupied());
        assert_eq!((m.soft_prot(), m.soft_frame()), (0, None));
        assert!(!Pte(0).is_occupied() && !Pte(0).is_soft());
        let present = leaf_pte(Gfn(7), PageSize::Size4K, PteFlags::USER);
        assert!(!present.is_soft() && present.soft_frame().is_none());
    }

    #[test]
    fn huge_and_conflicts() {
        let (mem, mut pt, mut alloc) = setup();
        let va = Gva(0x400_0000_0000);
        pt.map(&mem, &mut alloc, va, Gfn(0x200), PageSize::Size2M, PteFlags::USER).unwrap();
        let (e, size) = pt.translate(&mem, Gva(va.0 + 0x1234)).unwrap();
        assert_eq!((e.gfn(), size), (Gfn(0x200), PageSize::Size2M));
        assert!(matches!(
            pt.map(&mem, &mut alloc, Gva(va.0 + 0x1000), Gfn(5), PageSize::Size4K, PteFlags::USER),
            Err(PtError::Conflict { .. })
        ));
        // A 4K table under a PDE forbids a later 2M leaf there.
        let small = Gva(0x10_0000_0000);
        pt.map(&mem, &mut alloc, small, Gfn(9), PageSize::Size4K, PteFlags::USER).unwrap();
        pt.unmap(&mem, small, PageSize::Size4K).unwrap();
        assert!(matches!(
            pt.map(&mem, &mut alloc, small, Gfn(0x400), PageSize::Size2M, PteFlags::USER),
            Err(PtError::Conflict { .. })
        ));
        assert!(matches!(
            pt.map(&mem, &mut alloc, Gva(0x1001), Gfn(1), PageSize::Size4K, PteFlags::USER),
            Err(PtError::BadAddress { .. })
        ));
        assert!(matches!(
            pt.map(&mem, &mut alloc, Gva(1 << 47), Gfn(1), PageSize::Size4K, PteFlags::USER),
            Err(PtError::BadAddress { .. })
        ));
    }
}
