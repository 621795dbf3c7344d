//! The VMM's slab allocator against glibc malloc on the host, on the same trace: the churn
//! workload's size distribution (objects up to 4 KiB, many small) with random lifetimes. The
//! slab side runs in-process (a memory manager over unregistered guest RAM) with the guest's
//! magazines simulated: objects are popped from and pushed to per-class magazines, and one
//! SLAB_EXCHANGE call moves a batch both ways, every returned object validated by the VMM. No
//! exits are involved here (see `slab_fastpath` for those); neither side touches the objects.
//!
//! `cargo bench -p vmm --bench slab_vs_malloc`

// Harness arithmetic on counts and seeds: the casts are intentional.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::hint::black_box;
use std::time::Instant;

use protocol::slab::{CLASSES, NR_CLASSES, class_for, target};
use vmm::memory::MemoryManager;
use vmm::memory::addr::NodeId;

/// (slot, size): replace the object in `slot` with a new one of `size` (0: just free).
fn trace(ops: usize, slots: usize) -> Vec<(usize, usize)> {
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..ops)
        .map(|_| {
            let r = next();
            let slot = (r % slots as u64) as usize;
            let size = match (r >> 20) % 1000 {
                0..=449 => 16 + (r >> 40) % 17,
                450..=699 => 33 + (r >> 40) % 96,
                700..=849 => 129 + (r >> 40) % 384,
                850..=949 => 513 + (r >> 40) % 1536,
                _ => 2049 + (r >> 40) % 2048,
            };
            (slot, if (r >> 50) % 10 == 0 { 0 } else { size as usize })
        })
        .collect()
}

/// The guest's side of the magazines, on the host.
struct Magazines {
    alloc: Vec<Vec<u64>>,
    free: Vec<Vec<u64>>,
}

fn run_slab(steps: &[(usize, usize)], slots: usize) -> f64 {
    let mut mm = vmm::memory::standalone(&[1 << 30]).expect("memory manager");
    let mut mags = Magazines { alloc: vec![Vec::new(); NR_CLASSES], free: vec![Vec::new(); NR_CLASSES] };
    let mut live: Vec<Option<(u64, usize)>> = vec![None; slots];
    let exchange = |mm: &mut MemoryManager, mags: &mut Magazines, c: usize| {
        let frees = std::mem::take(&mut mags.free[c]);
        let want = target(CLASSES[c]).saturating_sub(mags.alloc[c].len());
        let (out, bad) = mm.slab_exchange(0, NodeId(0), c, &frees, want).expect("exchange");
        assert!(bad.is_empty());
        mags.alloc[c].extend(out);
        mm.flush().expect("flush");
    };
    let t = Instant::now();
    for &(slot, size) in steps {
        if let Some((p, c)) = live[slot].take() {
            if mags.free[c].len() == target(CLASSES[c]) {
                exchange(&mut mm, &mut mags, c);
            }
            mags.free[c].push(p);
        }
        if size > 0 {
            let c = class_for(size, 8).expect("a class");
            if mags.alloc[c].is_empty() {
                exchange(&mut mm, &mut mags, c);
            }
            live[slot] = Some((mags.alloc[c].pop().expect("refilled"), c));
        }
    }
    black_box(&live);
    t.elapsed().as_nanos() as f64 / steps.len() as f64
}

fn run_malloc(steps: &[(usize, usize)], slots: usize) -> f64 {
    let mut live: Vec<*mut libc::c_void> = vec![std::ptr::null_mut(); slots];
    let t = Instant::now();
    for &(slot, size) in steps {
        if !live[slot].is_null() {
            // SAFETY: allocated by malloc below and not freed since.
            unsafe { libc::free(live[slot]) };
            live[slot] = std::ptr::null_mut();
        }
        if size > 0 {
            // SAFETY: malloc of a small size.
            live[slot] = unsafe { libc::malloc(size) };
        }
    }
    let elapsed = t.elapsed().as_nanos() as f64 / steps.len() as f64;
    for p in live {
        // SAFETY: null or a live malloc allocation.
        unsafe { libc::free(p) };
    }
    elapsed
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let (ops, rounds) = if quick { (50_000, 1) } else { (2_000_000, 5) };
    println!(
        "slab allocator (magazines + SLAB_EXCHANGE, in-process) vs glibc malloc, {ops} replacements, median of {rounds}"
    );
    println!("{:<28} {:>12} {:>12} {:>8}", "live objects", "slab ns/op", "malloc ns/op", "ratio");
    for slots in [1024usize, 16_384, 131_072] {
        let steps = trace(ops, slots);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            ours.push(run_slab(&steps, slots));
            theirs.push(run_malloc(&steps, slots));
        }
        let (o, t) = (median(ours), median(theirs));
        println!("{:<28} {o:>12.1} {t:>12.1} {:>7.2}x", format!("up to {slots}"), t / o);
    }
    println!("ratio = malloc / slab (above 1: the slab allocator is faster); an op is one free plus one allocation");
}
