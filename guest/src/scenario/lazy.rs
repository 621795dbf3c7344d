//! `scenario=lazy`: a MAP_LAZY region gets frames only where it is touched. The guest's #PF
//! handler asks the VMM (LAZY_FAULT) and retries the access.

use protocol::exit;
use protocol::memcall::{ALL_NODES, policy};

use super::util::{data_frames, read, sig, write};
use super::{Ctx, fail};
use crate::rng::Rng;
use crate::{mem, println, trap};

pub fn run(ctx: &Ctx) {
    if ctx.cpu != 0 {
        return;
    }
    let size = ctx.args.num("size", 256 << 20).unwrap_or(256 << 20);
    let touches = ctx.args.num("touches", 256).unwrap_or(256);
    let mut checks = super::util::Checks::new("lazy");
    let mut check = |cond: bool, what: &str| checks.check(cond, what);
    let s0 = mem::stats(ALL_NODES).unwrap_or_default();
    let (va, len) = match mem::map_lazy(size, policy::LOCAL, 0, 0) {
        Ok(r) => r,
        Err(e) => {
            println!("guest: lazy: map_lazy failed: {}", e.name());
            fail(exit::MEMCALL_FAILED);
            return;
        }
    };
    let s1 = mem::stats(ALL_NODES).unwrap_or_default();
    check(s1.allocated_frames == s0.allocated_frames, "a lazy region took frames before being touched");
    let mut rng = Rng::new(ctx.seed());
    let pages = len / 4096;
    let mut touched = [0u64; 1024];
    let n = touches.min(touched.len() as u64) as usize;
    let faults_before = trap::LAZY_FAULTS.load(core::sync::atomic::Ordering::Relaxed);
    for t in touched.iter_mut().take(n) {
        let p = rng.below(pages);
        *t = p;
        let a = va + p * 4096;
        check(read(a + 8) == 0 || read(a) == sig(7, p, 0), "lazy memory is not zero");
        write(a, sig(7, p, 0));
    }
    for &p in &touched[..n] {
        check(read(va + p * 4096) == sig(7, p, 0), "lazy page lost its contents");
    }
    let faults = trap::LAZY_FAULTS.load(core::sync::atomic::Ordering::Relaxed) - faults_before;
    let s2 = mem::stats(ALL_NODES).unwrap_or_default();
    let frames = data_frames(&s2) - data_frames(&s1);
    check(frames >= faults && frames <= faults * 16, "frames do not match the faults");
    check(frames < pages / 4, "lazy region allocated most of its frames");
    check(mem::free(va).is_ok(), "free failed");
    check(trap::read(va + touched[0] * 4096).is_err(), "freed lazy page still readable");
    let s3 = mem::stats(ALL_NODES).unwrap_or_default();
    check(data_frames(&s3) == data_frames(&s0), "lazy frames not returned");
    println!(
        "@result scenario=lazy region_pages={pages} touched={n} lazy_faults={faults} frames={frames} ok={}",
        u8::from(checks.ok)
    );
    if !checks.ok {
        fail(exit::VERIFY_FAILED);
    }
}
