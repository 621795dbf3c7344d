//! The guest's `#[global_allocator]`: `Box`, `Vec` and friends get memory from the VMM.
//!
//! Objects up to 32 KiB come from the VMM's slabs through this vCPU's magazines
//! (`protocol::slab`): an allocation pops a ready object, a free pushes the object onto the free
//! magazine, and only an empty alloc magazine or a full free magazine costs an exit (one
//! SLAB_EXCHANGE moves a whole batch both ways). Freed objects are never reused here: each goes
//! back through the VMM, which checks it. Larger allocations are whole pages (ALLOC / FREE).
//!
//! Magazines are per vCPU: every use runs with preemption off (`sched::NoPreempt`), so a thread
//! cannot move to another vCPU half-way, and no locking is needed.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{addr_of, addr_of_mut, null_mut, read_volatile, write_volatile};

use protocol::layout::cpu_area;
use protocol::memcall::{op, policy};
use protocol::slab::{CLASSES, MAGAZINES_OFFSET, Magazine, batch, class_for};
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

/// Pops an object of `class` from this vCPU's alloc magazine (refilling it if empty), or null.
pub fn alloc_small(class: usize) -> *mut u8 {
    let _g = NoPreempt::new();
    *ALLOCS.get_mut() += 1;
    let m = magazine(class);
    // SAFETY: m points into this vCPU's mapped magazines, touched only by this vCPU (the VMM
    // writes them only during this vCPU's exits); preemption is off.
    unsafe {
        let mut n = read_volatile(addr_of!((*m).alloc_count)) as usize;
        if n == 0 {
            exchange(class);
            n = read_volatile(addr_of!((*m).alloc_count)) as usize;
            if n == 0 {
                return null_mut();
            }
        }
        n -= 1;
        write_volatile(addr_of_mut!((*m).alloc_count), n as u32);
        read_volatile(addr_of!((*m).alloc[n])) as *mut u8
    }
}

/// Pushes `ptr` onto this vCPU's free magazine of `class` (the VMM checks it).
pub fn free_small(class: usize, ptr: u64) {
    let _g = NoPreempt::new();
    push_free(class, ptr);
}

fn magazine(class: usize) -> *mut Magazine {
    ((cpu_area(arch::cpu_id()) + MAGAZINES_OFFSET) as *mut Magazine).wrapping_add(class)
}

/// One SLAB_EXCHANGE for `class`: drain the free magazine, refill the alloc magazine.
fn exchange(class: usize) -> u64 {
    *EXITS.get_mut() += 1;
    let want = batch(CLASSES[class]) as u64;
    mem::alloc_call(mem::mk(op::SLAB_EXCHANGE, 0, [class as u64, want, 0, 0])).status
}

/// Drains every free magazine of this vCPU (so the VMM sees every free now); returns the bad
/// frees it reported.
pub fn flush() -> u64 {
    let mut bad = 0;
    for c in 0..CLASSES.len() {
        let m = magazine(c);
        // SAFETY: m points into this vCPU's mapped magazines, touched only by this vCPU.
        if unsafe { read_volatile(addr_of!((*m).free_count)) } > 0 {
            exchange(c);
        }
        // SAFETY: as above.
        bad += u64::from(unsafe { read_volatile(addr_of!((*m).free_errors)) });
    }
    bad
}

/// Refills the alloc magazine of `class` to a full batch (and drains its free magazine).
pub fn top_up(class: usize) {
    exchange(class);
}

/// Pushes `ptr` onto the free magazine of `class` without any check here: the VMM checks it.
pub fn push_free(class: usize, ptr: u64) {
    let m = magazine(class);
    // SAFETY: m points into this vCPU's mapped magazines, touched only by this vCPU.
    unsafe {
        let n = read_volatile(addr_of!((*m).free_count)) as usize;
        if n >= batch(CLASSES[class]) {
            exchange(class);
        }
        let n = read_volatile(addr_of!((*m).free_count)) as usize;
        write_volatile(addr_of_mut!((*m).free[n]), ptr);
        write_volatile(addr_of_mut!((*m).free_count), n as u32 + 1);
    }
}

/// The sum over vCPU `cpu`'s magazines of the `u32` field at `offset` in [`Magazine`].
fn sum_magazines(cpu: u32, offset: usize) -> u64 {
    let base = (cpu_area(cpu) + MAGAZINES_OFFSET) as *const Magazine;
    (0..CLASSES.len())
        .map(|c| {
            let field = base.wrapping_add(c).wrapping_byte_add(offset).cast::<u32>();
            // SAFETY: every vCPU's CPU area is mapped readable for the guest; `offset` names a
            // u32 field of the magazine (callers pass `offset_of!`).
            u64::from(unsafe { read_volatile(field) })
        })
        .sum()
}

/// Objects waiting in vCPU `cpu`'s alloc magazines (handed out by the VMM, not yet used).
pub fn cached_objects(cpu: u32) -> u64 {
    sum_magazines(cpu, core::mem::offset_of!(Magazine, alloc_count))
}

/// Frees the VMM refused on vCPU `cpu` so far (its magazines' reports).
pub fn bad_frees_of(cpu: u32) -> u64 {
    sum_magazines(cpu, core::mem::offset_of!(Magazine, free_errors))
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
