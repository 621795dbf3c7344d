//! `scenario=cache-scratch iterations=N`: Hoard's false-sharing test. vCPU 0 allocates one small
//! object per vCPU and hands them out; each vCPU frees its object, then repeatedly allocates a
//! small object, writes it many times and frees it. An allocator that gives different vCPUs
//! objects on the same cache line makes them fight over it; this one gives each vCPU its own
//! slabs. Then, in synchronised rounds, every vCPU holds one live object and vCPU 0 counts the
//! rounds in which two vCPUs' live objects shared a cache line (real false sharing).

use core::sync::atomic::{AtomicU64, Ordering};

use alloc::alloc::{Layout, alloc, dealloc};

use super::Ctx;
use super::workload::Run;
use crate::{arch, println};

const MAX_CPUS: usize = 8;
const ROUNDS: u64 = 256;
const SIZE: usize = 16;

static HANDOFF: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Each vCPU's live object's cache line in the current round.
static LINES: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

pub fn run(ctx: &Ctx) {
    let iterations = ctx.args.num("iterations", 50_000).unwrap_or(50_000);
    let writes = ctx.args.num("writes", 64).unwrap_or(64);
    let n = (ctx.cpus as usize).min(MAX_CPUS);
    let layout = Layout::from_size_align(SIZE, 8).expect("valid");
    if ctx.cpu == 0 {
        for h in HANDOFF.iter().take(n) {
            // SAFETY: a non-zero-size layout.
            h.store(unsafe { alloc(layout) } as u64, Ordering::Release);
        }
    }
    ctx.barrier();
    let mut run = Run::new(ctx);
    let me = ctx.cpu as usize;
    if me < n {
        let given = HANDOFF[me].load(Ordering::Acquire) as *mut u8;
        // SAFETY: vCPU 0 allocated it with this layout and handed it to this vCPU alone.
        unsafe { dealloc(given, layout) };
        for i in 0..iterations {
            let t0 = arch::rdtsc();
            // SAFETY: a non-zero-size layout.
            let p = unsafe { alloc(layout) };
            run.timed(arch::rdtsc() - t0);
            if p.is_null() {
                continue;
            }
            for w in 0..writes {
                for b in 0..SIZE {
                    // SAFETY: within the 16-byte object.
                    unsafe { p.add(b).write_volatile((w + b as u64) as u8) };
                }
            }
            super::workload::account(SIZE as i64);
            // SAFETY: within the object.
            let last = unsafe { p.add(SIZE - 1).read_volatile() };
            if last != (writes - 1 + SIZE as u64 - 1) as u8 {
                run.errors += 1;
            }
            run.checksum = run.checksum.wrapping_add(u64::from(last) ^ i);
            let t0 = arch::rdtsc();
            // SAFETY: allocated just above with this layout.
            unsafe { dealloc(p, layout) };
            run.timed(arch::rdtsc() - t0);
            super::workload::account(-(SIZE as i64));
        }
    }
    ctx.barrier();
    // False sharing: objects of two vCPUs live on one cache line at the same time.
    let mut shared = 0;
    for _ in 0..ROUNDS {
        // SAFETY: a non-zero-size layout.
        let p = if me < n { unsafe { alloc(layout) } } else { core::ptr::null_mut() };
        if !p.is_null() {
            // SAFETY: a live 16-byte object.
            unsafe { p.write_volatile(me as u8) };
            LINES[me].store(p as u64 / 64, Ordering::Release);
        }
        ctx.barrier();
        if ctx.cpu == 0 {
            let lines: alloc::vec::Vec<u64> = LINES[..n].iter().map(|l| l.load(Ordering::Acquire)).collect();
            if (0..n).any(|a| (a + 1..n).any(|b| lines[a] != 0 && lines[a] == lines[b])) {
                shared += 1;
            }
        }
        ctx.barrier();
        if !p.is_null() {
            LINES[me].store(0, Ordering::Relaxed);
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(p, layout) };
        }
    }
    if shared > 0 {
        println!("guest: cache-scratch: in {shared} of {ROUNDS} rounds two vCPUs had live objects on one cache line");
    }
    run.report(ctx, "cache-scratch", format_args!("shared_lines={shared}"));
}
