//! `scenario=xmalloc ops=N`: the producer-consumer pattern of xmalloc-test. Each vCPU allocates
//! objects and passes them through a queue to the next vCPU, which checks and frees them: every
//! free happens on another vCPU than the allocation (with one vCPU, it consumes its own queue).

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::Ctx;
use super::workload::{Obj, Run, realistic_size};
use crate::arch;
use crate::rng::Rng;

const QUEUE: usize = 1024;
const MAX_CPUS: usize = 8;

/// A single-producer single-consumer ring of object pointers.
struct Ring {
    slots: [AtomicU64; QUEUE],
    head: AtomicUsize,
    tail: AtomicUsize,
}

impl Ring {
    const fn new() -> Self {
        Ring { slots: [const { AtomicU64::new(0) }; QUEUE], head: AtomicUsize::new(0), tail: AtomicUsize::new(0) }
    }

    fn push(&self, v: u64) -> bool {
        let t = self.tail.load(Ordering::Relaxed);
        if t - self.head.load(Ordering::Acquire) == QUEUE {
            return false;
        }
        self.slots[t % QUEUE].store(v, Ordering::Relaxed);
        self.tail.store(t + 1, Ordering::Release);
        true
    }

    fn pop(&self) -> Option<u64> {
        let h = self.head.load(Ordering::Relaxed);
        if h == self.tail.load(Ordering::Acquire) {
            return None;
        }
        let v = self.slots[h % QUEUE].load(Ordering::Relaxed);
        self.head.store(h + 1, Ordering::Release);
        Some(v)
    }
}

static RINGS: [Ring; MAX_CPUS] = [const { Ring::new() }; MAX_CPUS];

pub fn run(ctx: &Ctx) {
    let ops = ctx.args.num("ops", 100_000).unwrap_or(100_000);
    let n = (ctx.cpus as usize).min(MAX_CPUS);
    if ctx.cpu as usize >= n {
        return;
    }
    let out = &RINGS[ctx.cpu as usize];
    let inbox = &RINGS[(ctx.cpu as usize + n - 1) % n];
    let mut rng = Rng::new(ctx.seed());
    let mut run = Run::new(ctx);
    let (mut produced, mut consumed) = (0u64, 0u64);
    let mut pending: Option<Obj> = None;
    // Each vCPU produces `ops` objects and consumes `ops` from its neighbour.
    while produced < ops || consumed < ops {
        if produced < ops {
            if pending.is_none() {
                pending = Obj::new(&mut run, realistic_size(&mut rng).min(4096), produced + 1);
                if pending.is_none() {
                    produced += 1;
                }
            }
            if let Some(o) = pending
                && out.push(o.0 as u64)
            {
                pending = None;
                produced += 1;
            }
        }
        match inbox.pop() {
            Some(p) => {
                Obj(p as *mut u8).free(&mut run);
                consumed += 1;
            }
            None if produced >= ops => arch::pause(),
            None => {}
        }
    }
    run.report(ctx, "xmalloc", format_args!("produced={produced} consumed={consumed}"));
}
