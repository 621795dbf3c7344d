//! Scenarios: each runs on every vCPU, checks its own results, and reports a `@result` line.

mod badcalls;
mod balloon;
mod boot;
mod cache;
mod cachescratch;
mod cbench;
mod churn;
mod fastpath;
mod frag;
mod hog;
mod larson;
mod lazy;
mod numa;
mod oom;
mod pages;
mod ptstress;
mod race;
mod segv;
mod slabcheck;
mod stress;
mod touch;
pub mod util;
mod workingset;
mod workload;
mod xmalloc;

use core::sync::atomic::{AtomicU32, Ordering};

use protocol::{BootInfo, exit};

use crate::args::Args;
use crate::sync::Barrier;
use crate::{arch, bootinfo, println};

/// What every scenario gets.
pub struct Ctx {
    pub cpu: u32,
    pub cpus: u32,
    pub bi: &'static BootInfo,
    pub args: Args<'static>,
}

impl Ctx {
    /// Waits for every vCPU.
    pub fn barrier(&self) {
        static B: Barrier = Barrier::new();
        B.wait(self.cpus);
    }

    /// The seed for this vCPU's random choices.
    pub fn seed(&self) -> u64 {
        self.bi.seed ^ (u64::from(self.cpu) << 56)
    }
}

/// The first failure status any vCPU reported (0 = none).
static STATUS: AtomicU32 = AtomicU32::new(0);

/// Records a failure; the VM exits with the first one once every vCPU is done.
pub fn fail(status: u32) {
    let _ = STATUS.compare_exchange(0, status, Ordering::AcqRel, Ordering::Acquire);
}

/// `scenario=spin seconds=N [alloc=K]`: no exits at all, on every vCPU, for N seconds (0:
/// forever); with `alloc`, K allocations and frees of small objects first (the slab rings and
/// their service thread are then busy, then idle), and a `spin-warm` result line.
fn spin(ctx: &Ctx) {
    let warm = ctx.args.num("alloc", 0).unwrap_or(0);
    for i in 0..warm {
        let v: alloc::vec::Vec<u8> = alloc::vec::Vec::with_capacity(16 + (i as usize * 97) % 4000);
        core::hint::black_box(&v);
    }
    if warm > 0 {
        ctx.barrier();
        if ctx.cpu == 0 {
            println!("@result scenario=spin-warm allocs={warm}");
        }
    }
    let seconds = ctx.args.num("seconds", 0).unwrap_or(0);
    let end = arch::rdtsc().saturating_add(seconds.saturating_mul(ctx.bi.tsc_khz).saturating_mul(1000));
    while seconds == 0 || arch::rdtsc() < end {
        arch::pause();
    }
}

pub fn run(cpu: u32, bi: &'static BootInfo) -> ! {
    let ctx = Ctx { cpu, cpus: bi.nr_vcpus, bi, args: Args(bootinfo::args(bi)) };
    let name = ctx.args.get("scenario").unwrap_or("stress");
    match name {
        "stress" => stress::run(&ctx),
        "boot" => boot::run(&ctx),
        "pages" => pages::run(&ctx),
        "oom" => oom::run(&ctx),
        "touch" => touch::run(&ctx),
        "lazy" => lazy::run(&ctx),
        "ptstress" => ptstress::run(&ctx),
        "race" => race::run(&ctx),
        "badcalls" => badcalls::run(&ctx),
        "numa" => numa::run(&ctx),
        "segv" => segv::run(&ctx),
        "churn" => churn::run(&ctx),
        "larson" => larson::run(&ctx),
        "xmalloc" => xmalloc::run(&ctx),
        "cache-scratch" => cachescratch::run(&ctx),
        "frag" => frag::run(&ctx),
        "hog" => hog::run(&ctx),
        "cache" => cache::run(&ctx),
        "hold" => balloon::hold(&ctx),
        "grow" => balloon::grow(&ctx),
        "slabcheck" => slabcheck::run(&ctx),
        "fastpath" => fastpath::run(&ctx),
        "workingset" => workingset::run(&ctx),
        "cbench" => cbench::run(&ctx),
        // Every vCPU computes without an exit: for `seconds=N` (0: forever).
        "spin" => spin(&ctx),
        // Exits at once with `status=N`, whatever it is (the VMM judges it).
        "exit" => {
            if cpu == 0 {
                arch::exit(ctx.args.num("status", 0).unwrap_or(0) as u32);
            }
        }
        _ => {
            if cpu == 0 {
                println!("guest: unknown scenario `{name}`");
            }
            fail(exit::BAD_ARGS);
        }
    }
    ctx.barrier();
    if cpu == 0 {
        arch::exit(STATUS.load(Ordering::Acquire));
    }
    loop {
        arch::pause();
    }
}
