//! Small objects: size classes and the per-vCPU magazines through which the guest gets and
//! returns slab objects without an exit per object, and in the steady state without any exit.
//!
//! Each vCPU has, per class, two single-producer single-consumer rings in its CPU area: an
//! *alloc* ring of ready objects (the VMM produces, the guest consumes) and a *free* ring (the
//! guest produces freed objects, the VMM consumes). Indices run freely (wrapping `u32`); entry
//! `i` lives at `i % RING`. Each side writes only its own index and the entries it owns, and
//! publishes entries before the index that covers them.
//!
//! A VMM thread services the rings while the guest runs: it refills an alloc ring that falls
//! below half its [`target`] and drains a free ring that holds [`DRAIN_AT`] entries, with no
//! exit. When an alloc ring is empty or a free ring full anyway (the service thread sleeps
//! after an idle period, or did not keep up), the guest sends SLAB_EXCHANGE, which does both
//! synchronously and wakes the service. The guest never reuses a freed object itself: every
//! object goes back through the VMM, which checks it belongs to a live slab, sits on an object
//! boundary and is not already free, before it can be handed out again. Bad frees change
//! nothing and are counted in the magazine.
//!
//! The guest does not make the service look at every ring all the time (that would pull the
//! lines the guest writes on every allocation into another core's cache, and make each
//! next write a coherence miss): when an alloc ring falls to half its target, a free ring
//! reaches its drain mark, or the guest is about to wait for the service, it sets the class's
//! bit in the vCPU's [`Doorbell`] (an atomic OR, after it has published its index). The
//! service takes the whole word with an atomic swap and serves those rings; it looks at every
//! ring's indices only now and then, to catch what a doorbell missed.
//!
//! The VMM keeps its own copy of the indices it owns and checks the guest's against them: a
//! guest index that claims more than a ring holds is refused (counted in `ring_errors`), so a
//! guest that writes garbage into its magazines can only lose its own objects.

use super::PAGE_SIZE;

/// Object sizes. The classes above [`SMALL_MAX`] are page runs (10 to 16 pages): blocks just
/// over 32 KiB are frequent (buffers, a benchmark's 32 KiB + 8 batch), and as slab objects they
/// come through the rings like the rest, with no exit and no fault each. Larger blocks are
/// regions: a cached one would hold too much memory per vCPU and class.
pub const CLASSES: [u32; 25] = [
    8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192, 12288, 16384, 24576,
    32768, 40960, 49152, 65536,
];
/// Number of classes.
pub const NR_CLASSES: usize = CLASSES.len();
/// Largest slab object; larger allocations are whole pages (ALLOC).
pub const MAX_OBJECT: u32 = 65_536;
/// Largest object of the small classes (the ones found by table; each slab of theirs fits a
/// 64 KiB slot).
pub const SMALL_MAX: u32 = 32768;
/// The first class above [`SMALL_MAX`].
pub const FIRST_LARGE: usize = 22;
const _: () = assert!(CLASSES[FIRST_LARGE - 1] == SMALL_MAX && NR_CLASSES <= 32);
/// Entries per ring (a power of two).
pub const RING: usize = 2048;
/// Classes up to this size keep deep alloc rings ([`target`]).
pub const FULL_RING_MAX: u32 = 1024;
/// The least a free ring holds before the guest exits ([`free_cap`]).
pub const MIN_FULL: usize = 512;
/// A free ring holding this many entries is drained by the service thread.
pub const DRAIN_AT: u32 = 64;
/// The longest wait [`Magazine::service`] asks for, in microseconds: a few exits' worth. A
/// service that has a CPU of its own comes sooner, and an exit would not be faster (its handler
/// waits for the same lock and does the same work).
pub const SERVICE_WAIT_US: u32 = 100;
/// Offset of the magazines (`[Magazine; NR_CLASSES]`) within the vCPU's CPU area.
pub const MAGAZINES_OFFSET: u64 = 3 * PAGE_SIZE;

/// Offset of the vCPU's [`Doorbell`] within its CPU area: right after the magazines, on a
/// cache line of its own.
pub const DOORBELL_OFFSET: u64 =
    (MAGAZINES_OFFSET + (NR_CLASSES * core::mem::size_of::<Magazine>()) as u64).next_multiple_of(64);

/// The classes whose rings want the service now (bit `c` for class `c`): the guest sets bits,
/// the VMM takes them all at once. Alone on its cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct Doorbell {
    pub due: u32,
    _pad: [u32; 15],
}

/// One class's rings on one vCPU.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Magazine {
    /// Guest: objects taken from `alloc` (its consumer index).
    pub alloc_tail: u32,
    /// Guest: objects put in `free` (its producer index).
    pub free_head: u32,
    _guest: [u32; 14],
    /// VMM: objects put in `alloc` (its producer index).
    pub alloc_head: u32,
    /// VMM: objects taken from `free` (its consumer index).
    pub free_tail: u32,
    /// VMM: bad frees found in this magazine so far.
    pub free_errors: u32,
    /// VMM: status of the last bad free.
    pub last_status: u32,
    /// VMM: the last bad pointer.
    pub last_bad: u64,
    /// VMM: while a VMM thread services the rings without exits, how many microseconds a guest
    /// that finds its alloc ring empty or its free ring full should wait for it before it sends
    /// SLAB_EXCHANGE (0: no service, or no spare host CPU for it: exit at once, so that the
    /// vCPU's own thread does the work and a waiting vCPU does not keep the service off a CPU).
    pub service: u32,
    /// VMM: how many objects the VMM keeps in the alloc ring now (at most the class's
    /// [`target`]): [`shallow`] while the service thread has a host CPU of its own (deeper, up
    /// to [`target`], for a ring the guest keeps running dry); while it has none, between
    /// [`shallow`] and [`target`] as the vCPU's exit rate asks (0 until a service thread first
    /// runs). The guest rings the doorbell as the ring's level falls to half of it.
    pub depth: u32,
    _vmm: [u32; 8],
    pub alloc: [u64; RING],
    pub free: [u64; RING],
}

/// Offsets of the fields in a [`Magazine`].
pub const MAG_ALLOC_TAIL: u64 = core::mem::offset_of!(Magazine, alloc_tail) as u64;
pub const MAG_FREE_HEAD: u64 = core::mem::offset_of!(Magazine, free_head) as u64;
pub const MAG_ALLOC_HEAD: u64 = core::mem::offset_of!(Magazine, alloc_head) as u64;
pub const MAG_FREE_TAIL: u64 = core::mem::offset_of!(Magazine, free_tail) as u64;
pub const MAG_FREE_ERRORS: u64 = core::mem::offset_of!(Magazine, free_errors) as u64;
pub const MAG_LAST_STATUS: u64 = core::mem::offset_of!(Magazine, last_status) as u64;
pub const MAG_LAST_BAD: u64 = core::mem::offset_of!(Magazine, last_bad) as u64;
pub const MAG_SERVICE: u64 = core::mem::offset_of!(Magazine, service) as u64;
pub const MAG_DEPTH: u64 = core::mem::offset_of!(Magazine, depth) as u64;
pub const MAG_ALLOC: u64 = core::mem::offset_of!(Magazine, alloc) as u64;
pub const MAG_FREE: u64 = core::mem::offset_of!(Magazine, free) as u64;
const _: () = assert!(MAG_ALLOC_HEAD == 64 && MAG_ALLOC == 128);
const _: () = assert!(core::mem::size_of::<Magazine>() == 128 + 16 * RING);
const _: () = assert!(RING.is_power_of_two());
const _: () =
    assert!(DOORBELL_OFFSET + core::mem::size_of::<Doorbell>() as u64 <= super::layout::CPU_AREA_PAGES * PAGE_SIZE);

/// How many freed objects of `size` bytes a free ring holds before the service drains it:
/// [`DRAIN_AT`], or the class's [`target`] if that is smaller (freed page runs should not
/// wait long: they are what the next allocation of the class needs).
pub const fn drain_at(size: u32) -> u32 {
    let t = target(size);
    if t < DRAIN_AT as usize {
        // Below DRAIN_AT, so it fits.
        #[allow(clippy::cast_possible_truncation)]
        {
            t as u32
        }
    } else {
        DRAIN_AT
    }
}

/// The slot of free-running index `i` in a ring.
pub const fn slot(i: u32) -> usize {
    i as usize & (RING - 1)
}

/// Class of each small size in 8-byte steps (for alignments up to 8):
/// `CLASS_OF[size.div_ceil(8)]`.
const CLASS_OF: [u8; SMALL_MAX as usize / 8 + 1] = {
    let mut t = [0u8; SMALL_MAX as usize / 8 + 1];
    let mut i = 0;
    while i < t.len() {
        let mut c = 0;
        while (CLASSES[c] as usize) < i * 8 {
            c += 1;
        }
        // Fewer than 256 classes.
        #[allow(clippy::cast_possible_truncation)]
        {
            t[i] = c as u8;
        }
        i += 1;
    }
    t
};

/// The size class of the slab object at `va` (by the zone it lies in), if `va` lies in the slab
/// zone of a class. Says nothing about whether an object is there.
pub const fn class_of_addr(va: u64) -> Option<usize> {
    use crate::layout::{SLAB_CLASS_SPAN, SLAB_VA_START};
    if va < SLAB_VA_START {
        return None;
    }
    let c = ((va - SLAB_VA_START) / SLAB_CLASS_SPAN) as usize;
    if c < NR_CLASSES { Some(c) } else { None }
}

/// The slab zone of class `class`: `[start, end)`.
pub const fn class_zone(class: usize) -> (u64, u64) {
    use crate::layout::{SLAB_CLASS_SPAN, SLAB_VA_START};
    let start = SLAB_VA_START + class as u64 * SLAB_CLASS_SPAN;
    (start, start + SLAB_CLASS_SPAN)
}

/// The smallest class holding `size` bytes at `align`, if any.
#[inline]
pub const fn class_for(size: usize, align: usize) -> Option<usize> {
    if align <= 16 && size <= SMALL_MAX as usize {
        // By table, also at malloc's 16-byte alignment: every class but the first is a
        // multiple of 16 (asserted below).
        let c = CLASS_OF[size.div_ceil(8)] as usize;
        return Some(if align > 8 && c == 0 { 1 } else { c });
    }
    class_by_search(size, align)
}

/// [`class_for`] by a search of the classes.
const fn class_by_search(size: usize, align: usize) -> Option<usize> {
    let mut i = if size > SMALL_MAX as usize { FIRST_LARGE } else { 0 };
    while i < NR_CLASSES {
        let c = CLASSES[i] as usize;
        // A class's objects are aligned to its largest power-of-two divisor.
        if c >= size && (1 << c.trailing_zeros()) >= align {
            return Some(i);
        }
        i += 1;
    }
    None
}

const _: () = {
    // The table agrees with the search for every small size, at both alignments it serves.
    let mut size = 0;
    while size <= SMALL_MAX as usize {
        let mut align = 8;
        while align <= 16 {
            match (class_for(size, align), class_by_search(size, align)) {
                (Some(a), Some(b)) => assert!(a == b),
                _ => panic!("every small size has a class"),
            }
            align *= 2;
        }
        size += 1;
    }
};

/// The most objects the VMM keeps in an alloc ring of a class of `size` bytes: [`RING`] for
/// classes up to [`FULL_RING_MAX`]; above, about 128 KiB worth, at least 16 up to
/// [`SMALL_MAX`] (page-run classes: 128 KiB, 2 or 3 objects). This is the deepest a ring gets
/// while no host CPU is free for the service thread, for a vCPU that exits often: then each
/// ring that runs empty (or free ring that fills) costs an exit, and the small classes are the
/// frequent ones. Deeper rings mean fewer exits but colder objects; for such a vCPU the fewer
/// exits win up to [`RING`]: C larson on 2 vCPUs ran 1.2-1.35x faster with 2048 for every class
/// up to 1 KiB than with 128 KiB worth and at least 512, and 1.1-1.35x slower with 4096.
pub const fn target(size: u32) -> usize {
    let n = 131_072 / size as usize;
    if size <= FULL_RING_MAX {
        RING
    } else if size > SMALL_MAX || n >= 16 {
        n
    } else {
        16
    }
}

/// The depth of an alloc ring of a class of `size` bytes while the service thread has a host
/// CPU of its own and refills rings as they fall to half of it: [`target`], at most
/// [`SHALLOW_RING`] (a ring the guest runs dry grows deeper for a while, see `Magazine::depth`). An object then comes back to the guest after a few hundred allocations of
/// its class rather than a few thousand, still warm in the caches: larson on 1 vCPU ran
/// 1.2-1.8x faster with 256 than with 2048, about as fast as with 128, and slower with 512.
pub const fn shallow(size: u32) -> usize {
    let t = target(size);
    if t < SHALLOW_RING { t } else { SHALLOW_RING }
}

/// The depth small classes' alloc rings start at, and go back to, while the service thread has
/// a host CPU ([`shallow`]).
pub const SHALLOW_RING: usize = 256;

/// How many freed objects of a class of `size` bytes the guest puts in its free ring before it
/// must exit (when the service has not drained it): the class's [`target`], at least
/// [`MIN_FULL`].
pub const fn free_cap(size: u32) -> usize {
    let t = target(size);
    if t < MIN_FULL { MIN_FULL } else { t }
}
