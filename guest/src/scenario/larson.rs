//! `scenario=larson rounds=N`: the Larson server simulation. Every vCPU owns an array of blocks
//! and keeps replacing random ones; after each round the arrays rotate between vCPUs, so blocks
//! are freed by a different vCPU than the one that allocated them.

use core::sync::atomic::{AtomicPtr, Ordering};

use alloc::vec::Vec;

use super::Ctx;
use super::workload::{Obj, Run};
use crate::rng::Rng;

const BLOCKS: usize = 1000;

static ARRAYS: AtomicPtr<Option<Obj>> = AtomicPtr::new(core::ptr::null_mut());

pub fn run(ctx: &Ctx) {
    let rounds = ctx.args.num("rounds", 40).unwrap_or(40);
    let per_round = ctx.args.num("replacements", 5000).unwrap_or(5000);
    let n = ctx.cpus as usize;
    if ctx.cpu == 0 {
        let mut arrays: Vec<Option<Obj>> = Vec::new();
        arrays.resize(n * BLOCKS, None);
        ARRAYS.store(arrays.leak().as_mut_ptr(), Ordering::Release);
    }
    ctx.barrier();
    let base = ARRAYS.load(Ordering::Acquire);
    let mut rng = Rng::new(ctx.seed());
    let mut run = Run::new(ctx);
    let mut id = 0;
    for round in 0..rounds {
        // This round's array: each vCPU takes the one its neighbour used last round.
        let which = (ctx.cpu as usize + round as usize) % n;
        // SAFETY: between two barriers array `which` belongs to this vCPU alone.
        let blocks = unsafe { core::slice::from_raw_parts_mut(base.add(which * BLOCKS), BLOCKS) };
        for _ in 0..per_round {
            let i = rng.below(BLOCKS as u64) as usize;
            if let Some(o) = blocks[i].take() {
                o.free(&mut run);
            }
            id += 1;
            blocks[i] = Obj::new(&mut run, rng.range(16, 1024) as usize, id);
        }
        ctx.barrier();
    }
    // Each vCPU empties one array.
    // SAFETY: after the last barrier array `cpu` belongs to this vCPU.
    let mine = unsafe { core::slice::from_raw_parts_mut(base.add(ctx.cpu as usize * BLOCKS), BLOCKS) };
    for o in mine.iter_mut().filter_map(Option::take) {
        o.free(&mut run);
    }
    ctx.barrier();
    if ctx.cpu == 0 {
        // SAFETY: the leaked vector from above, no longer used by anyone.
        drop(unsafe { Vec::from_raw_parts(base, n * BLOCKS, n * BLOCKS) });
    }
    run.report(ctx, "larson", format_args!("rounds={rounds}"));
}
