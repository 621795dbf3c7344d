//! `scenario=hog`: a hostile guest tries to grow the VMM's own memory with calls that cost it
//! little or no guest memory: one-byte lazy regions until the VMM says ENOMEM, page-by-page
//! PROTECT of a large lazy region, small allocations until ENOMEM, a flood of `@result` lines, and
//! millions of small slab objects. After each phase it frees everything and reports what the VMM
//! held beyond guest memory at the phase's peak and after it (`own_kib`: the VMM's anonymous
//! resident memory minus the guest frames it backs), so that a test outside can check the bound.

use alloc::vec::Vec;
use core::fmt;

use protocol::memcall::{ALL_NODES, op, policy, prot};
use protocol::status::{ENOMEM, OK};

use super::{Ctx, fail};
use crate::mem::{self, BATCH, Batch, mk};
use crate::println;

/// The VMM's own anonymous memory now, in KiB.
fn own_kib() -> u64 {
    let s = mem::stats(ALL_NODES).unwrap_or_default();
    s.host_rss_anon_kib.saturating_sub(s.resident_frames * 4)
}

/// Sends `calls` in full batches; returns each call's `(status, ret0)`.
fn send_all(calls: impl Iterator<Item = protocol::memcall::MemCall>, out: &mut Vec<(u64, u64)>) {
    let mut b = Batch::new();
    let mut n = 0;
    let flush = |b: &mut Batch, n: &mut usize, out: &mut Vec<(u64, u64)>| {
        b.send();
        for i in 0..*n {
            let r = Batch::result(i);
            out.push((r.status, r.ret[0]));
        }
        *n = 0;
    };
    for c in calls {
        if n == BATCH {
            flush(&mut b, &mut n, out);
        }
        b.push(c);
        n += 1;
    }
    flush(&mut b, &mut n, out);
}

/// Creates regions with `call` until the VMM refuses with ENOMEM (or `max`); returns their
/// addresses and whether ENOMEM came.
fn until_enomem(call: protocol::memcall::MemCall, max: usize) -> (Vec<u64>, bool) {
    let mut vas = Vec::new();
    loop {
        let mut out = Vec::new();
        send_all((0..BATCH).map(|_| call), &mut out);
        for (st, va) in out {
            match st {
                OK => vas.push(va),
                ENOMEM => return (vas, true),
                _ => return (vas, false),
            }
        }
        if vas.len() >= max {
            return (vas, false);
        }
    }
}

fn free_all(vas: &[u64]) -> bool {
    let mut out = Vec::new();
    send_all(vas.iter().map(|&va| mk(op::FREE, 0, [va, 0, 0, 0])), &mut out);
    out.iter().all(|&(st, _)| st == OK)
}

/// Several result lines per console write.
struct Flood {
    first: u64,
    n: u64,
}

impl fmt::Display for Flood {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in self.first..self.first + self.n {
            writeln!(f, "@result scenario=hog-flood line={i} padding=0123456789abcdef0123456789abcdef")?;
        }
        Ok(())
    }
}

pub fn run(ctx: &Ctx) {
    if ctx.cpu != 0 {
        return;
    }
    let lines = ctx.args.num("lines", 100_000).unwrap_or(100_000);
    let objects = ctx.args.num("objects", 1 << 20).unwrap_or(1 << 20) as usize;
    let mut ok = true;
    let base = own_kib();
    println!("@result scenario=hog phase=base own_kib={base}");

    // 1. One-byte lazy regions: no guest memory at all.
    let (vas, enomem) = until_enomem(mk(op::MAP_LAZY, 0, [1, policy::LOCAL, 0, 0]), 10_000_000);
    let peak = own_kib();
    ok &= enomem && free_all(&vas);
    println!(
        "@result scenario=hog phase=lazy regions={} enomem={} own_kib={peak} after_kib={}",
        vas.len(),
        u8::from(enomem),
        own_kib()
    );

    // 2. Page-by-page PROTECT of a large lazy region, alternating access.
    let pages = ctx.bi.mem_bytes / 4096 / 8;
    let (lazy, _) = mem::map_lazy(pages * 4096, policy::LOCAL, 0, 0).unwrap_or((0, 0));
    let mut out = Vec::new();
    send_all(
        (0..pages).map(|i| {
            let p = if i % 2 == 0 { prot::READ } else { prot::NONE };
            mk(op::PROTECT, p, [lazy + i * 4096, 4096, 0, 0])
        }),
        &mut out,
    );
    let protected = out.iter().filter(|&&(st, _)| st == OK).count();
    let peak = own_kib();
    ok &= lazy != 0 && mem::free(lazy).is_ok();
    println!("@result scenario=hog phase=protect calls={pages} ok={protected} own_kib={peak} after_kib={}", own_kib());

    // 3. Small allocations until ENOMEM (regions or memory, whichever ends first).
    let (vas, enomem) = until_enomem(mk(op::ALLOC, 0, [4096, policy::LOCAL, 0, 0]), 10_000_000);
    let peak = own_kib();
    ok &= enomem && free_all(&vas);
    println!(
        "@result scenario=hog phase=alloc regions={} enomem={} own_kib={peak} after_kib={}",
        vas.len(),
        u8::from(enomem),
        own_kib()
    );

    // 4. A flood of result lines.
    let mut i = 0;
    while i < lines {
        let n = (lines - i).min(20);
        crate::print!("{}", Flood { first: i, n });
        i += n;
    }
    println!("@result scenario=hog phase=results lines={lines} own_kib={}", own_kib());

    // 5. Small slab objects.
    let layout = core::alloc::Layout::from_size_align(16, 8).expect("layout");
    let mut objs: Vec<*mut u8> = Vec::with_capacity(objects);
    for _ in 0..objects {
        // SAFETY: a valid non-zero-size layout; freed below with the same layout.
        let p = unsafe { alloc::alloc::alloc(layout) };
        if p.is_null() {
            break;
        }
        objs.push(p);
    }
    let peak = own_kib();
    let got = objs.len();
    for p in objs.drain(..) {
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { alloc::alloc::dealloc(p, layout) };
    }
    drop(objs);
    crate::heap::flush();
    println!("@result scenario=hog phase=slab objects={got} own_kib={peak} after_kib={}", own_kib());

    println!("@result scenario=hog phase=end own_kib={} ok={}", own_kib(), u8::from(ok));
    if !ok {
        fail(protocol::exit::VERIFY_FAILED);
    }
}
