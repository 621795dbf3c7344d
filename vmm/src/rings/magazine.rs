//! The guest's side of the rings as the VMM sees it: each vCPU's magazines in the VMM's mapping
//! of guest RAM, the indices the VMM owns (kept here, only ever written to guest memory), and one
//! exchange of a class's rings (drain the free ring, refill the alloc ring), with every index and
//! entry the guest controls read once and checked.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use protocol::slab::{
    MAG_ALLOC, MAG_ALLOC_HEAD, MAG_ALLOC_TAIL, MAG_FREE, MAG_FREE_ERRORS, MAG_FREE_HEAD, MAG_FREE_TAIL, MAG_LAST_BAD,
    MAG_LAST_STATUS, Magazine, NR_CLASSES, RING, slot,
};
use protocol::status;

use crate::memory::addr::{NodeId, to_usize};
use crate::memory::{MemoryError, MemoryManager};

/// What one exchange did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Exchanged {
    /// Objects in the alloc ring afterwards (0 if it was refused).
    pub level: u32,
    /// The alloc ring was empty before (the guest ran it dry).
    pub ran_dry: bool,
    pub out: usize,
    pub freed: usize,
    pub bad: usize,
    /// The guest's index of a ring was out of range: that ring was left alone.
    pub refused: bool,
}

/// The VMM's indices of one class's rings on one vCPU.
#[derive(Debug)]
pub(super) struct ClassRing {
    pub(super) alloc_head: AtomicU32,
    pub(super) free_tail: AtomicU32,
    /// Its alloc ring's depth while the service has a CPU (at first
    /// [`protocol::slab::shallow`]): it doubles, up to the class's [`protocol::slab::target`],
    /// each time a refill finds the ring run dry (the guest allocates in bursts the service
    /// cannot follow), and halves back after `CALM_REFILLS` refills in a row that did not.
    pub(super) depth: AtomicU32,
    /// Refills since it last ran dry.
    pub(super) calm: AtomicU32,
}

/// One vCPU's rings.
#[derive(Debug)]
pub(super) struct CpuRings {
    pub(super) id: u32,
    pub(super) node: u32,
    /// Its magazines in the VMM's mapping of guest RAM (contiguous: the CPU area is one run of
    /// frames in one RAM range), for plain atomic and volatile accesses.
    pub(super) host: HostPtr,
    /// Classes the guest has used (SLAB_EXCHANGE sent once, or a doorbell rung): only those
    /// are serviced.
    pub(super) active: AtomicU32,
    /// Its doorbell's `due` word, in the same mapping.
    pub(super) bell: HostPtr,
    pub(super) classes: Vec<ClassRing>,
    /// While the service is parked: how many times the depth of its alloc rings is halved from
    /// their class's target, set by how often this vCPU exits (see `Rings::pace`).
    pub(super) parked_shift: AtomicU32,
    /// Its SLAB_EXCHANGE exits since `window_start` (nanoseconds since the rings were made).
    pub(super) window_exits: AtomicU32,
    pub(super) window_start: AtomicU64,
}

/// A pointer into guest RAM's mapping, which lives as long as the VM.
#[derive(Debug, Clone, Copy)]
pub(super) struct HostPtr(pub(super) *mut u8);

// SAFETY: guest RAM's mapping is shared with the vCPUs by design; every access through the
// pointer is atomic or volatile, and the mapping outlives the rings (both live in the VM).
unsafe impl Send for HostPtr {}
// SAFETY: as above.
unsafe impl Sync for HostPtr {}

/// Takes the classes whose doorbell the guest rang on `c` (only real classes).
pub(super) fn take_doorbell(c: &CpuRings) -> u32 {
    // SAFETY: the doorbell of `c` is mapped guest RAM for the VM's life (see `HostPtr`), 64-aligned;
    // the guest may write it any time, which atomics allow.
    let due = unsafe { AtomicU32::from_ptr(c.bell.0.cast()) };
    // Cheap when nothing is due: a read leaves the guest's copy of the line shared.
    if due.load(Ordering::Relaxed) == 0 {
        return 0;
    }
    due.swap(0, Ordering::Acquire) & ((1 << NR_CLASSES) - 1)
}

/// The `u32` field at `off` of `c`'s magazine of `class`.
fn field(c: &CpuRings, class: usize, off: u64) -> &AtomicU32 {
    debug_assert!(class < NR_CLASSES && off.is_multiple_of(4) && off < MAG_ALLOC);
    // SAFETY: the magazines of `c` are mapped guest RAM for the VM's life (see `HostPtr`);
    // `off` is a 4-aligned field offset inside one magazine and magazines are 8-aligned, so the
    // pointer is valid and aligned for an AtomicU32. The guest may write it at any time, which
    // atomics allow.
    unsafe { AtomicU32::from_ptr(c.host.0.add(class * size_of::<Magazine>() + to_usize(off)).cast()) }
}

pub(super) fn load(c: &CpuRings, class: usize, off: u64) -> u32 {
    field(c, class, off).load(Ordering::Acquire)
}

pub(super) fn store(c: &CpuRings, class: usize, off: u64, v: u32) {
    field(c, class, off).store(v, Ordering::Release);
}

/// The entries of a ring (`which`: MAG_ALLOC or MAG_FREE) of `c`'s magazine of `class`.
fn ring_entries(c: &CpuRings, class: usize, which: u64) -> *mut u64 {
    // SAFETY: inside the magazines' mapping (see `field`): `which` is the offset of one of the
    // magazine's rings. 8-aligned.
    unsafe { c.host.0.add(class * size_of::<Magazine>() + to_usize(which)).cast() }
}

/// The free ring's entries `[first, first + n)` (free-running indices, `n <= RING`), each
/// read once.
fn read_entries(c: &CpuRings, class: usize, first: u32, n: u32) -> Vec<u64> {
    let base = ring_entries(c, class, MAG_FREE);
    (0..n)
        .map(|i| {
            // SAFETY: slot() < RING: inside the free ring. The guest may change it any time, so
            // it is read once, volatile.
            unsafe { base.add(slot(first.wrapping_add(i))).read_volatile() }
        })
        .collect()
}

/// Writes `objs` (at most RING) as the alloc ring's entries from free-running index `first`.
fn write_entries(c: &CpuRings, class: usize, first: u32, objs: &[u64]) {
    let base = ring_entries(c, class, MAG_ALLOC);
    for (i, &o) in (0u32..).zip(objs) {
        // SAFETY: slot() < RING: inside the alloc ring.
        unsafe { base.add(slot(first.wrapping_add(i))).write_volatile(o) };
    }
}

/// Drains the free ring of `class` on `c` and refills its alloc ring up to `want` (at most
/// [`RING`]; callers pass at most the ring's depth). The caller holds the manager (`mm`), so
/// nothing else changes our indices. A ring whose guest index is out of range is left alone
/// (`refused`); unless `sync`, nothing else is done then either.
pub(super) fn exchange(
    mm: &mut MemoryManager,
    c: &CpuRings,
    class: usize,
    want: usize,
    sync: bool,
) -> Result<Exchanged, MemoryError> {
    let ring = &c.classes[class];
    let mut r = Exchanged::default();

    // The free ring: copy out what the guest published, once.
    let free_tail = ring.free_tail.load(Ordering::Relaxed);
    let pending = load(c, class, MAG_FREE_HEAD).wrapping_sub(free_tail);
    let mut frees = Vec::new();
    if pending as usize > RING {
        r.refused = true;
    } else {
        frees = read_entries(c, class, free_tail, pending);
    }

    // The alloc ring: room up to the target.
    let alloc_head = ring.alloc_head.load(Ordering::Relaxed);
    let level = alloc_head.wrapping_sub(load(c, class, MAG_ALLOC_TAIL)) as usize;
    let need = if level > RING {
        r.refused = true;
        0
    } else {
        want.min(RING).saturating_sub(level)
    };
    if r.refused && !sync && frees.is_empty() && need == 0 {
        return Ok(r);
    }

    let (out, bad) = mm.slab_exchange(c.id, NodeId(c.node), class, &frees, need)?;
    write_entries(c, class, alloc_head, &out);
    let new_head = alloc_head.wrapping_add(u32::try_from(out.len()).expect("at most RING"));
    ring.alloc_head.store(new_head, Ordering::Relaxed);
    store(c, class, MAG_ALLOC_HEAD, new_head);

    if let Some(&(ptr, st)) = bad.last() {
        let errors = load(c, class, MAG_FREE_ERRORS).saturating_add(u32::try_from(bad.len()).expect("at most RING"));
        store(c, class, MAG_FREE_ERRORS, errors);
        store(c, class, MAG_LAST_STATUS, u32::try_from(st).unwrap_or(u32::MAX));
        // SAFETY: the 8-aligned `last_bad` field inside the magazine (see `field`).
        unsafe { ring_entries(c, class, MAG_LAST_BAD).write_volatile(ptr) };
    }
    if !frees.is_empty() {
        // The errors above are visible before the guest sees its frees taken.
        let new_tail = free_tail.wrapping_add(u32::try_from(frees.len()).expect("at most RING"));
        ring.free_tail.store(new_tail, Ordering::Relaxed);
        store(c, class, MAG_FREE_TAIL, new_tail);
    }

    r.level = if level > RING { 0 } else { u32::try_from(level + out.len()).expect("at most RING") };
    // (A ring never filled before is empty, not run dry.)
    r.ran_dry = level == 0 && alloc_head != 0;
    r.out = out.len();
    r.freed = frees.len() - bad.len();
    r.bad = bad.len();
    Ok(r)
}

/// SLAB_EXCHANGE's status for an exchange: ENOMEM when an empty ring could not be refilled,
/// EFAULT when the guest's ring indices were out of range.
pub fn status_of(r: &Exchanged, want: usize) -> u64 {
    if r.refused {
        status::EFAULT
    } else if want > 0 && r.level == 0 {
        status::ENOMEM
    } else {
        status::OK
    }
}
