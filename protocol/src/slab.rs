//! Small objects: size classes and the per-vCPU magazines through which the guest gets and
//! returns slab objects without an exit per object.
//!
//! Each vCPU has, per class, an *alloc* magazine of ready objects (the guest pops from it) and a
//! *free* magazine (the guest pushes freed objects onto it). When the alloc magazine is empty or
//! the free magazine full, one SLAB_EXCHANGE call drains and refills it. The guest never reuses
//! a freed object itself: every object goes back through the VMM, which checks it belongs to a
//! live slab, sits on an object boundary and is not already free, before it can be handed out
//! again. Bad frees change nothing and are counted in the magazine.

use super::PAGE_SIZE;

/// Object sizes.
pub const CLASSES: [u32; 22] = [
    8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192, 12288, 16384, 24576, 32768,
];
/// Number of classes.
pub const NR_CLASSES: usize = CLASSES.len();
/// Largest slab object; larger allocations are whole pages (ALLOC).
pub const MAX_OBJECT: u32 = 32768;
/// Entries per magazine.
pub const MAG: usize = 128;
/// Offset of the magazines (`[Magazine; NR_CLASSES]`) within the vCPU's CPU area.
pub const MAGAZINES_OFFSET: u64 = 3 * PAGE_SIZE;

/// One class's magazines on one vCPU.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Magazine {
    /// Objects in `alloc` (the guest pops from the end; the VMM refills).
    pub alloc_count: u32,
    /// Objects in `free` (the guest pushes; the VMM drains).
    pub free_count: u32,
    /// Bad frees found in this magazine so far (VMM).
    pub free_errors: u32,
    /// Status of the last bad free (VMM).
    pub last_status: u32,
    /// The last bad pointer (VMM).
    pub last_bad: u64,
    pub alloc: [u64; MAG],
    pub free: [u64; MAG],
}

/// Offset of `alloc` in a [`Magazine`].
pub const MAG_ALLOC: u64 = core::mem::offset_of!(Magazine, alloc) as u64;
/// Offset of `free` in a [`Magazine`].
pub const MAG_FREE: u64 = core::mem::offset_of!(Magazine, free) as u64;
const _: () = assert!(core::mem::size_of::<Magazine>() == 24 + 16 * MAG);
const _: () = assert!(
    MAGAZINES_OFFSET + (NR_CLASSES * core::mem::size_of::<Magazine>()) as u64
        <= super::layout::CPU_AREA_PAGES * PAGE_SIZE
);

/// Class of each size in 8-byte steps (for alignments up to 8): `CLASS_OF[size.div_ceil(8)]`.
const CLASS_OF: [u8; MAX_OBJECT as usize / 8 + 1] = {
    let mut t = [0u8; MAX_OBJECT as usize / 8 + 1];
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
pub const fn class_for(size: usize, align: usize) -> Option<usize> {
    if align <= 8 {
        return if size <= MAX_OBJECT as usize { Some(CLASS_OF[size.div_ceil(8)] as usize) } else { None };
    }
    let mut i = 0;
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
    // The table agrees with the search for every size.
    let mut size = 0;
    while size <= MAX_OBJECT as usize {
        let mut c = 0;
        while (CLASSES[c] as usize) < size {
            c += 1;
        }
        assert!(CLASS_OF[size.div_ceil(8)] as usize == c);
        size += 1;
    }
};

/// How many objects one exchange moves for a class of `size` bytes: about 32 KiB worth,
/// between 16 and [`MAG`] (so even 4 KiB objects make 32 operations per exit).
pub const fn batch(size: u32) -> usize {
    let n = 32768 / size as usize;
    if n < 16 {
        16
    } else if n > MAG {
        MAG
    } else {
        n
    }
}
