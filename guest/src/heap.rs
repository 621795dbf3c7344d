//! The guest's `#[global_allocator]`: `Box`, `Vec` and friends get memory from the VMM.
//!
//! Objects up to 64 KiB come from the VMM's slabs through this vCPU's rings
//! (`protocol::slab`): an allocation takes a ready object from the alloc ring, a free puts the
//! object in the free ring, and a VMM thread refills and drains the rings while the guest runs,
//! without an exit. Only an empty alloc ring or a full free ring costs an exit (one
//! SLAB_EXCHANGE does both synchronously). The service learns which rings want it from the
//! vCPU's doorbell, rung as a ring passes its mark. Freed objects are never reused here: each
//! goes back through the VMM, which checks it. Larger allocations are whole pages (ALLOC /
//! FREE).
//!
//! Rings are per vCPU: every use runs with preemption off (`sched::NoPreempt`), so a thread
//! cannot move to another vCPU half-way, and the guest side of each ring has one user.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{addr_of, addr_of_mut, null_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, Ordering, compiler_fence};

use protocol::layout::cpu_area;
use protocol::memcall::{op, policy};
use protocol::slab::{
    CLASSES, DOORBELL_OFFSET, Doorbell, MAGAZINES_OFFSET, Magazine, NR_CLASSES, SERVICE_WAIT_US, class_for, drain_at,
    free_cap, slot, target,
};
use protocol::status;

use crate::sched::NoPreempt;
use crate::{arch, mem};

pub struct GuestAlloc;

#[global_allocator]
static ALLOC: GuestAlloc = GuestAlloc;

crate::percpu! {
    /// Exits taken by the allocator on this vCPU.
    static EXITS: u64 = 0;
}

crate::percpu! {
    /// Times this vCPU found a ring empty (or full) and the service thread came in time.
    static SERVICE_WAITS: u64 = 0;
}

/// Exits the service thread saved on every vCPU so far.
pub fn all_service_waits(cpus: u32) -> u64 {
    SERVICE_WAITS.sum(cpus)
}

crate::percpu! {
    /// TSC cycles this vCPU spent waiting for the service thread.
    static WAIT_CYCLES: u64 = 0;
}

crate::percpu! {
    /// TSC cycles this vCPU spent in SLAB_EXCHANGE exits (the round trip and the VMM's work).
    static EXCHANGE_CYCLES: u64 = 0;
}

/// TSC cycles spent waiting for the service and in SLAB_EXCHANGE exits, every vCPU so far.
pub fn all_cycles(cpus: u32) -> (u64, u64) {
    (WAIT_CYCLES.sum(cpus), EXCHANGE_CYCLES.sum(cpus))
}

crate::percpu! {
    /// Allocations served on this vCPU (slab objects and regions).
    static ALLOCS: u64 = 0;
}

/// Allocations served on every vCPU so far.
pub fn all_allocs(cpus: u32) -> u64 {
    ALLOCS.sum(cpus)
}

/// Counts an allocation the caller (with preemption off) served.
pub fn count_alloc() {
    *ALLOCS.get_mut() += 1;
}

/// Allocator exits on this vCPU so far.
pub fn exits() -> u64 {
    *EXITS.get()
}

/// Allocator exits on every vCPU so far.
pub fn all_exits(cpus: u32) -> u64 {
    EXITS.sum(cpus)
}

/// Counts an exit the caller (with preemption off) is about to take for the allocator.
pub fn count_exit() {
    *EXITS.get_mut() += 1;
}

/// Takes an object of `class` from this vCPU's alloc ring (after an exchange if it is empty),
/// or null.
pub fn alloc_small(class: usize) -> *mut u8 {
    let _g = NoPreempt::new();
    *ALLOCS.get_mut() += 1;
    let m = magazine(class);
    // SAFETY: m points into this vCPU's mapped magazines; the guest side of its rings is used
    // only by this vCPU, with preemption off. The VMM writes only `alloc_head` and the entries
    // before it, and publishes the entries first.
    unsafe {
        let tail = read_volatile(addr_of!((*m).alloc_tail));
        let mut head = read_volatile(addr_of!((*m).alloc_head));
        if head == tail {
            if !wait_for_service(m, class, || read_volatile(addr_of!((*m).alloc_head)) != tail) {
                exchange(class);
            }
            head = read_volatile(addr_of!((*m).alloc_head));
            if head == tail {
                return null_mut();
            }
        }
        compiler_fence(Ordering::Acquire);
        let obj = read_volatile(addr_of!((*m).alloc[slot(tail)]));
        compiler_fence(Ordering::Release);
        write_volatile(addr_of_mut!((*m).alloc_tail), tail.wrapping_add(1));
        // The next object of this class comes from the VMM's refill, cold in the caches and
        // often in the TLB: its first touch by the caller was most of larson's time. Ask for
        // it now, so that its line and translation are there by the next allocation.
        if head.wrapping_sub(tail) > 1 {
            arch::prefetch_write(read_volatile(addr_of!((*m).alloc[slot(tail.wrapping_add(1))])));
        }
        // Down to half the ring's depth (which the VMM sets, on the line it writes `alloc_head`
        // on): ask the service for a refill (once, as the level passes).
        if head.wrapping_sub(tail).wrapping_sub(1) == read_volatile(addr_of!((*m).depth)) / 2 {
            ring_doorbell(class);
        }
        obj as *mut u8
    }
}

/// Where the guest acts on one class's free ring: the entries at which it rings the doorbell
/// (`protocol::slab::drain_at`), and those at which it exits unless the service drains them
/// (`protocol::slab::free_cap`, at most RING). (Its alloc ring's mark is half the depth the VMM
/// sets in the magazine.)
#[derive(Clone, Copy)]
struct Marks {
    drain: u32,
    free_cap: u32,
}

/// [`Marks`] per class.
const MARKS: [Marks; NR_CLASSES] = {
    let mut m = [Marks { drain: 0, free_cap: 0 }; NR_CLASSES];
    let mut c = 0;
    while c < NR_CLASSES {
        let size = CLASSES[c];
        // Both at most RING.
        #[allow(clippy::cast_possible_truncation)]
        {
            m[c] = Marks { drain: drain_at(size), free_cap: free_cap(size) as u32 };
        }
        c += 1;
    }
    m
};

/// Tells the VMM's service that this vCPU's rings of `class` want it (`protocol::slab`'s
/// doorbell). The caller has published its ring index.
fn ring_doorbell(class: usize) {
    ring_doorbell_bits(1 << class);
}

/// Sets `bits` in this vCPU's doorbell (any bits: the hostile-call scenario rings bits of
/// classes that do not exist).
pub fn ring_doorbell_bits(bits: u32) {
    let bell = (cpu_area(arch::cpu_id()) + DOORBELL_OFFSET) as *mut Doorbell;
    // SAFETY: the doorbell lies in this vCPU's mapped CPU area, 4-aligned; the VMM accesses
    // it only atomically.
    let due = unsafe { AtomicU32::from_ptr(addr_of_mut!((*bell).due)) };
    due.fetch_or(bits, Ordering::Release);
}

/// Waits as long as the VMM's service thread asks (`Magazine::service`, at most
/// [`SERVICE_WAIT_US`]) for `ready()`, after ringing the doorbell of `class`; returns whether
/// it became true (false at once when there is no service to wait for).
fn wait_for_service(m: *const Magazine, class: usize, ready: impl Fn() -> bool) -> bool {
    // SAFETY: m points into this vCPU's mapped magazines.
    let us = unsafe { read_volatile(addr_of!((*m).service)) }.min(SERVICE_WAIT_US);
    if us == 0 {
        return false;
    }
    ring_doorbell(class);
    let khz = crate::bootinfo::get().map_or(0, |bi| bi.tsc_khz);
    let t0 = arch::rdtsc();
    let mut came = false;
    while !came && arch::rdtsc() - t0 < u64::from(us) * khz / 1000 {
        came = ready();
        if !came {
            arch::pause();
        }
    }
    *WAIT_CYCLES.get_mut() += arch::rdtsc() - t0;
    *SERVICE_WAITS.get_mut() += u64::from(came);
    came
}

/// Puts `ptr` in this vCPU's free ring of `class` (the VMM checks it).
pub fn free_small(class: usize, ptr: u64) {
    let _g = NoPreempt::new();
    push_free(class, ptr);
}

/// This vCPU's magazine of `class` (the caller keeps preemption off while it uses it).
pub fn magazine(class: usize) -> *mut Magazine {
    ((cpu_area(arch::cpu_id()) + MAGAZINES_OFFSET) as *mut Magazine).wrapping_add(class)
}

/// One SLAB_EXCHANGE for `class`: drain the free ring, refill the alloc ring.
fn exchange(class: usize) -> u64 {
    *EXITS.get_mut() += 1;
    let want = target(CLASSES[class]) as u64;
    let t0 = arch::rdtsc();
    let st = mem::alloc_call(mem::mk(op::SLAB_EXCHANGE, 0, [class as u64, want, 0, 0])).status;
    *EXCHANGE_CYCLES.get_mut() += arch::rdtsc() - t0;
    st
}

/// Entries of this vCPU's free ring of `class` the VMM has not taken yet.
fn pending_frees(m: *const Magazine) -> u32 {
    // SAFETY: m points into this vCPU's mapped magazines.
    unsafe { read_volatile(addr_of!((*m).free_head)).wrapping_sub(read_volatile(addr_of!((*m).free_tail))) }
}

/// Drains every free ring of this vCPU (so the VMM has seen every free now); returns the bad
/// frees it reported.
pub fn flush() -> u64 {
    let mut bad = 0;
    for c in 0..CLASSES.len() {
        let m = magazine(c);
        if pending_frees(m) > 0 {
            exchange(c);
        }
        // SAFETY: m points into this vCPU's mapped magazines.
        bad += u64::from(unsafe { read_volatile(addr_of!((*m).free_errors)) });
    }
    bad
}

/// Refills the alloc ring of `class` to its target (and drains its free ring) now.
pub fn top_up(class: usize) {
    exchange(class);
}

/// Puts `ptr` in the free ring of `class` without any check here: the VMM checks it.
pub fn push_free(class: usize, ptr: u64) {
    let m = magazine(class);
    let mut pending = pending_frees(m);
    let cap = MARKS[class].free_cap;
    if pending >= cap && !wait_for_service(m, class, || pending_frees(m) < cap) {
        exchange(class);
        pending = pending_frees(m);
    }
    // SAFETY: m points into this vCPU's mapped magazines; the guest side of the free ring is
    // used only by this vCPU. The slot at `head` is free: the VMM has taken everything up to
    // `free_tail`, and the ring holds fewer than its cap (at most RING) entries.
    unsafe {
        let head = read_volatile(addr_of!((*m).free_head));
        write_volatile(addr_of_mut!((*m).free[slot(head)]), ptr);
        compiler_fence(Ordering::Release);
        write_volatile(addr_of_mut!((*m).free_head), head.wrapping_add(1));
    }
    // Up to the drain mark: ask the service to take them (once, as the count passes).
    if pending.wrapping_add(1) == MARKS[class].drain {
        ring_doorbell(class);
    }
}

/// The sum over vCPU `cpu`'s magazines of `f(magazine)`.
fn sum_magazines(cpu: u32, f: impl Fn(*const Magazine) -> u32) -> u64 {
    let base = (cpu_area(cpu) + MAGAZINES_OFFSET) as *const Magazine;
    (0..CLASSES.len()).map(|c| u64::from(f(base.wrapping_add(c)))).sum()
}

/// Objects waiting in vCPU `cpu`'s alloc rings (handed out by the VMM, not yet used).
pub fn cached_objects(cpu: u32) -> u64 {
    // SAFETY: every vCPU's CPU area is mapped readable for the guest.
    sum_magazines(cpu, |m| unsafe {
        read_volatile(addr_of!((*m).alloc_head)).wrapping_sub(read_volatile(addr_of!((*m).alloc_tail)))
    })
}

/// Frees the VMM refused on vCPU `cpu` so far (its magazines' reports).
pub fn bad_frees_of(cpu: u32) -> u64 {
    // SAFETY: as above.
    sum_magazines(cpu, |m| unsafe { read_volatile(addr_of!((*m).free_errors)) })
}

/// How deep the VMM keeps this vCPU's alloc ring of `class` now (`Magazine::depth`).
pub fn ring_depth(class: usize) -> u32 {
    let _g = NoPreempt::new();
    let m = magazine(class);
    // SAFETY: m points into this vCPU's mapped magazines.
    unsafe { read_volatile(addr_of!((*m).depth)) }
}

/// The magazine's bad-free report: (count, last status, last pointer).
pub fn bad_frees(class: usize) -> (u32, u32, u64) {
    let m = magazine(class);
    // SAFETY: m points into this vCPU's mapped magazines.
    unsafe {
        (
            read_volatile(addr_of!((*m).free_errors)),
            read_volatile(addr_of!((*m).last_status)),
            read_volatile(addr_of!((*m).last_bad)),
        )
    }
}

// SAFETY: alloc returns either null or memory of at least `layout.size()` bytes aligned to
// `layout.align()` (slab objects are aligned to their class's power-of-two divisor, pages to
// 4 KiB) that nothing else uses until dealloc; dealloc only hands memory back to the VMM.
unsafe impl GlobalAlloc for GuestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class_for(layout.size().max(1), layout.align()) else {
            if layout.align() > 4096 {
                return null_mut();
            }
            let _g = NoPreempt::new();
            *EXITS.get_mut() += 1;
            return match mem::alloc_call(mem::mk(op::ALLOC, 0, [layout.size() as u64, policy::LOCAL, 0, 0])) {
                r if r.status == status::OK => r.ret[0] as *mut u8,
                _ => null_mut(),
            };
        };
        alloc_small(class)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_for(layout.size().max(1), layout.align()) {
            Some(class) => free_small(class, ptr as u64),
            None => {
                let _g = NoPreempt::new();
                *EXITS.get_mut() += 1;
                mem::alloc_call(mem::mk(op::FREE, 0, [ptr as u64, 0, 0, 0]));
            }
        }
    }
}
