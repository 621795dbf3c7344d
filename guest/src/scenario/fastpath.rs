//! `scenario=fastpath ops=N size=N`: what the magazines buy. Times raw exits (`out` to the
//! no-op port) and allocation/free pairs through the global allocator in the same VM, and
//! reports both rates and their ratio.

use alloc::alloc::{Layout, alloc, dealloc};

use protocol::port;

use super::Ctx;
use super::util::ns;
use crate::{arch, heap, println};

pub fn run(ctx: &Ctx) {
    if ctx.cpu != 0 {
        return;
    }
    let exits = ctx.args.num("exits", 20_000).unwrap_or(20_000);
    let ops = ctx.args.num("ops", 400_000).unwrap_or(400_000);
    let size = ctx.args.num("size", 64).unwrap_or(64) as usize;
    let t0 = arch::rdtsc();
    for _ in 0..exits {
        arch::out32(port::NOP, 0);
    }
    let exit_ns = ns(ctx.bi, arch::rdtsc() - t0) * 1000 / exits;
    let layout = Layout::from_size_align(size, 8).expect("valid");
    let mut ring = [core::ptr::null_mut::<u8>(); 64];
    let e0 = heap::exits();
    let t0 = arch::rdtsc();
    // A window of 64 live objects: each step frees the oldest and allocates a new one.
    for i in 0..ops as usize / 2 {
        let slot = &mut ring[i % 64];
        if !slot.is_null() {
            // SAFETY: allocated below with this layout.
            unsafe { dealloc(*slot, layout) };
        }
        // SAFETY: non-zero-size layout.
        *slot = unsafe { alloc(layout) };
        // SAFETY: a live allocation of `size` bytes.
        unsafe { slot.write_volatile(i as u8) };
    }
    let op_ns = ns(ctx.bi, arch::rdtsc() - t0) * 1000 / ops;
    let used = heap::exits() - e0;
    for p in ring {
        if !p.is_null() {
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(p, layout) };
        }
    }
    // Times are in picoseconds for precision; ratio = allocator ops per second over exits per second.
    println!(
        "@result scenario=fastpath exit_ps={exit_ns} op_ps={op_ns} ops={ops} allocator_exits={used} ops_per_exit={} ratio={}",
        ops / used.max(1),
        exit_ns / op_ns.max(1)
    );
}
