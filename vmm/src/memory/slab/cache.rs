//! One slab (its objects, which are handed out) and one size class's lists (per-vCPU current
//! slabs, per-node partial lists, a few cached empty slabs, the quarantine). The metadata lives
//! here, never in guest RAM: a few dozen bytes per slab (32 KiB or more) plus one bit per object.

use std::collections::VecDeque;
use std::time::Instant;

use protocol::layout::SLAB_SLOT;
use protocol::slab::{CLASSES, NR_CLASSES, SMALL_MAX};

use crate::memory::addr::{NodeId, PAGE_SIZE};

/// Pages per slab for `size`: at least 16 objects and 32 KiB (so page tables stay under 1% of
/// slab memory, and the VMM's own bytes per slab under 1/300 of it), a power of two, at most a
/// slot.
///
/// A page-run class (above [`SMALL_MAX`]) has slabs of two or three objects, 128 KiB, spanning
/// two slots.
pub fn slab_pages(size: u32) -> u64 {
    if size > SMALL_MAX {
        return (u64::from(size) * 2).div_ceil(PAGE_SIZE).next_power_of_two();
    }
    (u64::from(size) * 16).div_ceil(PAGE_SIZE).next_power_of_two().clamp(8, SLAB_SLOT / PAGE_SIZE)
}

/// Most empty slabs a class keeps per node, mapped and resident, before it gives slabs back: a
/// workload whose live objects swing reuses them instead of paying a second-level fault per
/// page of a new slab, and a TLB shootdown for the old one's discard (the way glibc keeps
/// freed memory). A class keeps up to half the most slabs it had in use since the guest was
/// last idle, at least [`EMPTY_MIN`] and at most this (32 MiB of 32 KiB slabs per class and
/// node). Memory that stays free is given back: the rings' service releases empty slabs that
/// stayed unused for [`crate::rings::PURGE_AFTER`] ([`super::SlabAllocator::purge`]), and when
/// the guest has been idle a while keeps one per class and node and forgets the peak
/// ([`super::SlabAllocator::trim_empty`]).
pub const EMPTY_KEPT: usize = 1024;
/// Empty slabs a class keeps per node however few it uses (at 32 KiB slabs, 256 KiB per class
/// and node).
pub const EMPTY_MIN: usize = 8;

/// [`Slab::bits`]: the word of objects handed out, and the word of objects in quarantine.
pub(super) const HANDED: usize = 0;
pub(super) const HELD: usize = 1;

/// Slab id: index into the arena.
pub(super) type SlabId = u32;

/// One slab.
#[derive(Debug)]
pub struct Slab {
    pub va: u64,
    pub class: usize,
    pub node: NodeId,
    pub objects: u32,
    /// Objects handed out (in a magazine or in use by the guest).
    pub in_use: u32,
    /// Per 64 objects, two words side by side (a free checks both, so one cache line serves
    /// it): `[HANDED]` bit `i` says object `i` is not available (handed out, or in
    /// quarantine); `[HELD]` bit `i` says it is in its class's quarantine (freed, not yet
    /// reusable).
    pub(super) bits: Box<[[u64; 2]]>,
    /// Where the slab sits in its node's partial list, if it is there.
    pub(super) partial_at: Option<u32>,
    /// The vCPU whose current slab this is.
    pub owner: Option<u32>,
    /// The vCPU that owned it last: it gets the slab back first, so a slab whose objects may
    /// still sit in that vCPU's magazines does not move to another vCPU.
    pub last_owner: Option<u32>,
    /// Where the search for a free object starts (next-fit).
    pub(super) cursor: u32,
    /// When it joined its class's cached empty slabs (while it is there).
    pub(super) empty_since: Option<Instant>,
}

impl Slab {
    /// An empty slab of `objects` objects of `class` at `va`, on `node`.
    pub(super) fn new(va: u64, class: usize, node: NodeId, objects: u32) -> Slab {
        let words = objects.div_ceil(64) as usize;
        Slab {
            va,
            class,
            node,
            objects,
            in_use: 0,
            bits: vec![[0; 2]; words].into_boxed_slice(),
            partial_at: None,
            owner: None,
            last_owner: None,
            empty_since: None,
            cursor: 0,
        }
    }

    fn bit(&self, which: usize, i: u32) -> bool {
        self.bits[i as usize / 64][which] & (1 << (i % 64)) != 0
    }

    fn set_bit(&mut self, which: usize, i: u32, on: bool) {
        let w = &mut self.bits[i as usize / 64][which];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    pub(super) fn is_handed(&self, i: u32) -> bool {
        self.bit(HANDED, i)
    }

    pub(super) fn set_handed(&mut self, i: u32, on: bool) {
        self.set_bit(HANDED, i, on);
    }

    pub(super) fn is_held(&self, i: u32) -> bool {
        self.bit(HELD, i)
    }

    pub(super) fn set_held(&mut self, i: u32, on: bool) {
        self.set_bit(HELD, i, on);
    }

    /// The next free object at or after the cursor (wrapping), if any.
    pub(super) fn next_free(&mut self) -> Option<u32> {
        if self.in_use == self.objects {
            return None;
        }
        let words = self.bits.len();
        let start = self.cursor as usize / 64;
        let mut w = start;
        for k in 0..=words {
            // On the first word, ignore the bits below the cursor; they come last.
            let mask = if k == 0 { !0u64 << (self.cursor % 64) } else { !0u64 };
            let free = !self.bits[w][HANDED] & mask;
            if free != 0 {
                let i = u32::try_from(w * 64).ok()? + free.trailing_zeros();
                if i < self.objects {
                    self.cursor = if i + 1 == self.objects { 0 } else { i + 1 };
                    return Some(i);
                }
            }
            w += 1;
            if w == words {
                w = 0;
            }
        }
        None
    }
}

/// Objects of `size` a class keeps in quarantine: about 64 KiB worth, between 8 and 256
/// (page-run classes: 128 KiB worth, 2 or 3). At least 32 made the classes of 4-16 KiB hold
/// 128-512 KiB each: rptest (1 vCPU), which fills each block it gets, ran 1.07-1.18x faster
/// with the freed blocks back in use sooner (warmer).
pub const fn quarantine_len(size: u32) -> usize {
    if size > SMALL_MAX {
        return 131_072 / size as usize;
    }
    let n = 65_536 / size as usize;
    if n < 8 {
        8
    } else if n > 256 {
        256
    } else {
        n
    }
}

/// Validated frees of `size` a class keeps ready past its quarantine, per node: about one
/// ring refill. A guest that frees and allocates at the same rate gets its own objects back
/// (checked, and after the quarantine) without their slabs' bitmaps being searched; one that
/// stops allocating gives the rest back to the slabs.
pub const fn ready_max(size: u32) -> usize {
    protocol::slab::target(size)
}

/// How many freed objects of a class its quarantine holds, and how many it keeps ready past
/// it ([`quarantine_len`], [`ready_max`]).
#[derive(Clone, Copy)]
pub struct Kept {
    pub quarantine: usize,
    pub ready: usize,
}

/// [`Kept`] of each class (the free path looks it up per object: no division there).
pub const KEPT: [Kept; NR_CLASSES] = {
    let mut k = [Kept { quarantine: 0, ready: 0 }; NR_CLASSES];
    let mut c = 0;
    while c < NR_CLASSES {
        k[c] = Kept { quarantine: quarantine_len(CLASSES[c]), ready: ready_max(CLASSES[c]) };
        c += 1;
    }
    k
};

/// Objects per slab of `size`.
pub fn objects_per_slab(size: u32) -> u32 {
    u32::try_from(slab_pages(size) * PAGE_SIZE / u64::from(size)).expect("a slab holds few objects")
}

/// Per-class state.
#[derive(Debug, Default)]
pub(super) struct Cache {
    /// Current slab of each vCPU (by id).
    pub(super) cpu_slab: Vec<Option<SlabId>>,
    /// Per node: slabs with free objects that no vCPU owns (each slab knows its place, so
    /// that leaving the list is O(1)).
    pub(super) partial: Vec<Vec<SlabId>>,
    /// Per node: empty slabs kept for reuse, with their memory (at most [`EMPTY_KEPT`]).
    pub(super) empty: Vec<Vec<SlabId>>,
    /// Per node (of the object's slab): freed objects, oldest first (slab, object index). The
    /// newest [`quarantine_len`] wait before they may be reused; older ones are ready to be
    /// handed out again as they are (up to [`ready_max`] of them, beyond which the oldest go
    /// back to their slabs).
    pub(super) quarantine: Vec<VecDeque<(SlabId, u32)>>,
    pub(super) slabs: u64,
    /// Most slabs in use (not empty) since the last idle trim: the swing the class may see
    /// again, which its cached empty slabs are sized for.
    pub(super) peak: usize,
    /// Objects handed to the guest (not counting the quarantine).
    pub(super) active: u64,
}

impl Cache {
    /// Notes the slabs in use now (all but the cached empty ones) in [`peak`](Self::peak).
    pub(super) fn note_peak(&mut self) {
        let empties: usize = self.empty.iter().map(Vec::len).sum();
        self.peak = self.peak.max(usize::try_from(self.slabs).unwrap_or(usize::MAX).saturating_sub(empties));
    }

    /// Objects in quarantine (or ready past it), every node.
    pub(super) fn quarantined(&self) -> u64 {
        self.quarantine.iter().map(|q| q.len() as u64).sum()
    }
}

/// The slabs by id (`None`: a free id).
pub(super) type Arena = Vec<Option<Slab>>;

fn slab_in(arena: &mut Arena, id: SlabId) -> &mut Slab {
    arena[id as usize].as_mut().expect("live slab id")
}

/// Puts slab `id` at the end of a partial list.
pub(super) fn partial_push(list: &mut Vec<SlabId>, arena: &mut Arena, id: SlabId) {
    let s = slab_in(arena, id);
    debug_assert!(s.partial_at.is_none());
    s.partial_at = Some(u32::try_from(list.len()).expect("fewer slabs than u32"));
    list.push(id);
}

/// Takes slab `id` out of the partial list it is in (O(1): the last entry takes its place).
pub(super) fn partial_remove(list: &mut Vec<SlabId>, arena: &mut Arena, id: SlabId) {
    let Some(at) = slab_in(arena, id).partial_at.take() else { return };
    let at = at as usize;
    debug_assert_eq!(list[at], id);
    list.swap_remove(at);
    if let Some(&moved) = list.get(at) {
        slab_in(arena, moved).partial_at = Some(u32::try_from(at).expect("fewer slabs than u32"));
    }
}
