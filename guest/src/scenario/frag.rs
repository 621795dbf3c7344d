//! `scenario=frag count=N size=N`: fragmentation. Fill with `count` objects of `size` bytes,
//! free every other one, then allocate `count / 2` objects twice as large: the freed holes are
//! too small for them. Reports external fragmentation (slab bytes not holding live objects) and
//! the host memory the slabs pin, then frees everything and checks the slabs go back (once the
//! guest has been idle long enough for the VMM to give its slab caches back).

use alloc::vec::Vec;

use protocol::memcall::ALL_NODES;

use super::workload::{Obj, Run};
use super::{Ctx, fail};
use crate::{heap, mem, println};

pub fn run(ctx: &Ctx) {
    let count = ctx.args.num("count", 16384).unwrap_or(16384) as usize;
    let size = ctx.args.num("size", 64).unwrap_or(64).max(16) as usize;
    let mut run = Run::new(ctx);
    let mut objs: Vec<Option<Obj>> = Vec::with_capacity(count);
    for i in 0..count {
        objs.push(Obj::new(&mut run, size, i as u64));
    }
    for o in objs.iter_mut().step_by(2) {
        if let Some(o) = o.take() {
            o.free(&mut run);
        }
    }
    let mut large: Vec<Option<Obj>> = Vec::with_capacity(count / 2);
    for i in 0..count / 2 {
        large.push(Obj::new(&mut run, size * 2, (count + i) as u64));
    }
    heap::flush();
    ctx.barrier();
    let mut report = (0, 0, 0);
    if ctx.cpu == 0 {
        let s = mem::stats(ALL_NODES).unwrap_or_default();
        let live = (count / 2 * size + count / 2 * size * 2) as u64 * u64::from(ctx.cpus);
        let slab = s.slab_frames * 4096;
        report = (live, slab, s.resident_frames * 4);
    }
    ctx.barrier();
    for o in objs.into_iter().chain(large).flatten() {
        o.free(&mut run);
    }
    heap::flush();
    ctx.barrier();
    // The VMM keeps freed slabs for reuse while the guest allocates, and gives them back once
    // it has been idle a while (about 100 ms): wait for that, at most 2 s.
    let (live, slab, resident_kib) = report;
    let (mut after, mut settle_ms) = (0, 0);
    if ctx.cpu == 0 {
        loop {
            after = mem::stats(ALL_NODES).unwrap_or_default().slab_frames;
            if after * 4096 <= slab / 4 || settle_ms >= 2000 {
                break;
            }
            crate::arch::spin_ms(20);
            settle_ms += 20;
        }
    }
    ctx.barrier();
    let frag_pct = (live * 100).checked_div(slab).map_or(0, |used| 100 - used);
    if ctx.cpu == 0 && after * 4096 > slab / 4 {
        println!("guest: frag: {after} slab frames remain 2 s after freeing everything");
        fail(protocol::exit::VERIFY_FAILED);
    }
    run.report(
        ctx,
        "frag",
        format_args!(
            "live_bytes={live} slab_bytes={slab} frag_pct={frag_pct} resident_kib={resident_kib} slab_frames_after={after} settle_ms={settle_ms}"
        ),
    );
}
