//! `scenario=fastpath ops=N size=N [bursts=N burst=N]`: what the magazines buy. Times raw exits
//! (`out` to the no-op port) and allocation/free pairs through the global allocator in the same
//! VM, and reports both rates and their ratio. With `bursts`, then allocates `burst` objects in
//! a row and frees them all, that many times (more than a shallow ring holds: the VMM should
//! deepen it), and reports the ring's depth afterwards (`ring_depth`).

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
    let bursts = ctx.args.num("bursts", 0).unwrap_or(0);
    let burst = (ctx.args.num("burst", 2000).unwrap_or(2000) as usize).min(BURST_MAX);
    let mut objs = alloc::vec::Vec::with_capacity(burst);
    let t0 = arch::rdtsc();
    for _ in 0..bursts {
        for i in 0..burst {
            // SAFETY: non-zero-size layout.
            let p = unsafe { alloc(layout) };
            if p.is_null() {
                super::fail(protocol::exit::MEMCALL_FAILED);
            }
            // SAFETY: a live allocation of `size` bytes.
            unsafe { p.write_volatile(i as u8) };
            objs.push(p);
        }
        for p in objs.drain(..) {
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(p, layout) };
        }
    }
    let burst_ns = ns(ctx.bi, arch::rdtsc() - t0) / (bursts * burst as u64).max(1);
    let depth = protocol::slab::class_for(size, 8).map_or(0, heap::ring_depth);
    // Times are in picoseconds for precision; ratio = allocator ops per second over exits per second.
    println!(
        "@result scenario=fastpath exit_ps={exit_ns} op_ps={op_ns} ops={ops} allocator_exits={used} ops_per_exit={} ratio={} burst_alloc_ns={burst_ns} ring_depth={depth}",
        ops / used.max(1),
        exit_ns / op_ns.max(1)
    );
}

/// The longest burst (objects allocated before any is freed).
const BURST_MAX: usize = 100_000;
