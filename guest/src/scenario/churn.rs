//! `scenario=churn ops=N slots=N`: objects of realistic sizes with random lifetimes. Each step
//! replaces the object in a random slot (freeing the old one after checking it); a tenth of the
//! slots are long-lived and replaced rarely.

use alloc::vec;
use alloc::vec::Vec;

use super::Ctx;
use super::workload::{Obj, Run, realistic_size};
use crate::rng::Rng;

pub fn run(ctx: &Ctx) {
    let ops = ctx.args.num("ops", 200_000).unwrap_or(200_000);
    let slots = ctx.args.num("slots", 4096).unwrap_or(4096).max(16) as usize;
    let mut rng = Rng::new(ctx.seed());
    let mut run = Run::new(ctx);
    let mut live: Vec<Option<Obj>> = vec![None; slots];
    let mut id = 0;
    while run.ops < ops {
        // Long-lived slots are touched one time in twenty.
        let mut i = rng.below(slots as u64) as usize;
        if i < slots / 10 && rng.below(20) != 0 {
            i = slots / 10 + rng.below((slots - slots / 10) as u64) as usize;
        }
        if let Some(o) = live[i].take() {
            o.free(&mut run);
        }
        if rng.below(10) != 0 {
            id += 1;
            live[i] = Obj::new(&mut run, realistic_size(&mut rng), id);
        }
    }
    for o in live.into_iter().flatten() {
        o.free(&mut run);
    }
    run.report(ctx, "churn", format_args!("slots={slots}"));
}
