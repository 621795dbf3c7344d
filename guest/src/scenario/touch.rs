//! `scenario=touch size=64M flags=N pct=100`: first-touch cost. Allocates `size` bytes, writes
//! one word per page (or into `pct` percent of the pages, picked at random), and reports the time
//! per touched page and the second-level faults it took and the frames they installed (from the
//! VMM's STATS before and after), and how many frames became resident meanwhile by any path
//! (`installed`: faults through the VMM or, once it handed first touches over to the kernel, the
//! kernel's own demand paging).

use protocol::exit;
use protocol::memcall::{ALL_NODES, flags, policy};

use super::util::{ns, read, write};
use super::{Ctx, fail};
use crate::{arch, mem, println};

pub fn run(ctx: &Ctx) {
    // Every vCPU is up before the first count: the other vCPUs' first touches (their stacks,
    // their CPU areas) are not the region's, but they show in the VM's fault counters.
    ctx.barrier();
    if ctx.cpu != 0 {
        return;
    }
    let size = ctx.args.num("size", 64 << 20).unwrap_or(64 << 20);
    let fl = u32::try_from(ctx.args.num("flags", u64::from(flags::CONTIGUOUS)).unwrap_or(0)).unwrap_or(0);
    let rounds = ctx.args.num("rounds", 1).unwrap_or(1).max(1);
    let pct = ctx.args.num("pct", 100).unwrap_or(100).clamp(1, 100);
    let mut rng = crate::rng::Rng::new(ctx.seed());
    let mut touched = 0;
    let mut best = u64::MAX;
    let mut faults = 0;
    let mut fault_pages = 0;
    let mut fault_around = 0;
    let mut installed = 0;
    for _ in 0..rounds {
        // Before the allocation, so that `installed` counts what POPULATE installs up front.
        let s0 = mem::stats(ALL_NODES).unwrap_or_default();
        let (va, len) = match mem::alloc(size, policy::LOCAL, 0, fl) {
            Ok(r) => r,
            Err(e) => {
                println!("guest: touch: alloc failed: {}", e.name());
                fail(exit::MEMCALL_FAILED);
                return;
            }
        };
        let pages = len / 4096;
        let n = if pct == 100 { pages } else { pages * pct / 100 };
        let t0 = arch::rdtsc();
        if pct == 100 {
            for p in 0..pages {
                write(va + p * 4096, p + 1);
            }
        } else {
            for _ in 0..n {
                let p = rng.below(pages);
                write(va + p * 4096, p + 1);
            }
        }
        let t1 = arch::rdtsc();
        let s1 = mem::stats(ALL_NODES).unwrap_or_default();
        for p in 0..pages {
            let v = read(va + p * 4096);
            if v != p + 1 && (pct == 100 || v != 0) {
                println!("guest: touch: page {p} holds {v:#x}");
                fail(exit::VERIFY_FAILED);
            }
        }
        let _ = mem::free(va);
        touched = n;
        let per_page = ns(ctx.bi, t1 - t0) / n.max(1);
        if per_page < best {
            best = per_page;
        }
        faults = s1.uffd_faults - s0.uffd_faults;
        fault_pages = s1.uffd_pages - s0.uffd_pages;
        installed = s1.resident_frames.saturating_sub(s0.resident_frames);
        fault_around = s1.fault_around;
    }
    println!(
        "@result scenario=touch bytes={size} pages={} touched={touched} faults={faults} fault_pages={fault_pages} fault_around={fault_around} installed={installed} ns_per_page={best}",
        size.div_ceil(4096)
    );
}
