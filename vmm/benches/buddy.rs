//! The buddy allocator against `buddy_system_allocator::FrameAllocator` on the same alloc/free
//! traces, interleaved round by round in one run. Prints ns per operation and the ratio.
//!
//! `cargo bench -p vmm --bench buddy`

// Harness arithmetic on counts and seeds: the casts are intentional.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::hint::black_box;
use std::time::Instant;

use vmm::memory::addr::{Gfn, Order};
use vmm::memory::frames::buddy::BuddyAllocator;

/// 4 GiB of 4 KiB frames.
const FRAMES: u64 = 1 << 20;

#[derive(Clone, Copy)]
enum Step {
    Alloc(u8),
    /// Free the live allocation at this index (mod the live count).
    Free(usize),
}

/// A reproducible trace: `ops` steps, live set bounded by `max_live`, orders from `orders`.
fn trace(seed: u64, ops: usize, max_live: usize, orders: &[(u8, u32)]) -> Vec<Step> {
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let total: u32 = orders.iter().map(|o| o.1).sum();
    let mut live = 0usize;
    let mut out = Vec::with_capacity(ops);
    for _ in 0..ops {
        let r = next();
        if live > 0 && (live >= max_live || r % 100 < 45) {
            out.push(Step::Free((r >> 8) as usize));
            live -= 1;
        } else {
            let mut pick = ((r >> 16) % u64::from(total)) as u32;
            let order = orders.iter().find(|o| {
                if pick < o.1 {
                    true
                } else {
                    pick -= o.1;
                    false
                }
            });
            out.push(Step::Alloc(order.expect("weights").0));
            live += 1;
        }
    }
    out
}

fn run_ours(steps: &[Step]) -> (f64, usize) {
    let mut b = BuddyAllocator::new(Gfn(0), Gfn(FRAMES)).expect("metadata");
    b.add_free_range(Gfn(0), Gfn(FRAMES));
    let mut live: Vec<(Gfn, Order)> = Vec::with_capacity(8192);
    let mut failed = 0;
    let t = Instant::now();
    for s in steps {
        match *s {
            Step::Alloc(k) => {
                let order = Order::new(k).expect("valid order");
                match b.alloc(order) {
                    Ok(g) => live.push((g, order)),
                    Err(_) => failed += 1,
                }
            }
            Step::Free(i) => {
                if !live.is_empty() {
                    let (g, k) = live.swap_remove(i % live.len());
                    b.free(g, k).expect("valid free");
                }
            }
        }
    }
    black_box(&b);
    (t.elapsed().as_nanos() as f64 / steps.len() as f64, failed)
}

fn run_theirs(steps: &[Step]) -> (f64, usize) {
    let mut b = buddy_system_allocator::FrameAllocator::<32>::new();
    b.add_frame(0, FRAMES as usize);
    let mut live: Vec<(usize, usize)> = Vec::with_capacity(8192);
    let mut failed = 0;
    let t = Instant::now();
    for s in steps {
        match *s {
            Step::Alloc(k) => match b.alloc(1 << k) {
                Some(f) => live.push((f, 1 << k)),
                None => failed += 1,
            },
            Step::Free(i) => {
                if !live.is_empty() {
                    let (f, n) = live.swap_remove(i % live.len());
                    b.dealloc(f, n);
                }
            }
        }
    }
    black_box(&b);
    (t.elapsed().as_nanos() as f64 / steps.len() as f64, failed)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs a quick smoke version.
    let quick = !std::env::args().any(|a| a == "--bench");
    let ops = if quick { 20_000 } else { 2_000_000 };
    let rounds = if quick { 1 } else { 7 };
    type Trace = (&'static str, &'static [(u8, u32)], usize);
    let traces: [Trace; 3] = [
        ("pages (order 0)", &[(0, 1)], 4096),
        (
            "mixed (70% 4K, 20% 8-32K, 10% 64K-2M)",
            &[(0, 70), (1, 10), (2, 6), (3, 4), (4, 3), (6, 3), (8, 2), (9, 2)],
            4096,
        ),
        ("fragmenting (small with many live)", &[(0, 50), (1, 30), (2, 20)], 200_000),
    ];
    println!(
        "buddy allocator vs buddy_system_allocator 0.13 (4 GiB of frames, {ops} steps per trace, median of {rounds})"
    );
    println!("{:<42} {:>12} {:>12} {:>8}", "trace", "ours ns/op", "theirs ns/op", "ratio");
    for (name, orders, max_live) in traces {
        let steps = trace(0x5eed_1234, ops, max_live, orders);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            ours.push(run_ours(&steps).0);
            theirs.push(run_theirs(&steps).0);
        }
        let (o, t) = (median(ours), median(theirs));
        println!("{name:<42} {o:>12.1} {t:>12.1} {:>7.2}x", t / o);
    }
    println!("ratio = theirs / ours (above 1: ours is faster)");
}
