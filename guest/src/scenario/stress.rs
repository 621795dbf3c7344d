//! `scenario=stress` (the default): the main job. Checks the boot layout, then runs page
//! allocation and the allocator workloads one after another on every vCPU, each briefly.

use super::{Ctx, boot, cachescratch, churn, larson, pages, xmalloc};
use crate::args::Args;
use crate::println;

/// A step: its name, the scenario, and its arguments.
type Step = (&'static str, fn(&Ctx), &'static str);

pub fn run(ctx: &Ctx) {
    boot::run(ctx);
    let steps: [Step; 5] = [
        ("pages", pages::run, "iterations=120"),
        ("churn", churn::run, "ops=60000 slots=2048"),
        ("larson", larson::run, "rounds=6 replacements=3000"),
        ("xmalloc", xmalloc::run, "ops=20000"),
        ("cache-scratch", cachescratch::run, "iterations=10000"),
    ];
    for (name, step, args) in steps {
        ctx.barrier();
        if ctx.cpu == 0 {
            println!("guest: stress: {name}");
            super::workload::reset_peak();
        }
        ctx.barrier();
        step(&Ctx { cpu: ctx.cpu, cpus: ctx.cpus, bi: ctx.bi, args: Args(args) });
    }
    ctx.barrier();
    if ctx.cpu == 0 {
        println!("@result scenario=stress steps={}", steps.len());
    }
}
