//! `scenario=oom`: ask for more than guest RAM and get a clean out-of-memory error, exhaust
//! memory for real, then recover: free some, allocate and use memory again.

use protocol::exit;
use protocol::memcall::{ALL_NODES, flags, policy};
use protocol::status::ENOMEM;

use super::util::{data_frames, read, sig, write};
use super::{Ctx, fail};
use crate::mem::{self, Error};
use crate::println;

pub fn run(ctx: &Ctx) {
    if ctx.cpu != 0 {
        return;
    }
    let mut checks = super::util::Checks::new("oom");
    let mut check = |cond: bool, what: &str| checks.check(cond, what);
    let before = mem::stats(ALL_NODES).unwrap_or_default();
    // More than all of guest RAM at once.
    check(
        mem::alloc(ctx.bi.mem_bytes * 2, policy::LOCAL, 0, flags::ZERO) == Err(Error(ENOMEM)),
        "oversized request did not fail with ENOMEM",
    );

    // Exhaust memory for real, largest chunks first. Untouched memory costs the host nothing.
    let mut held = [0u64; 96];
    let mut n = 0;
    let mut bytes = 0u64;
    let mut size = 64u64 << 20;
    while size >= 4096 && n < held.len() {
        match mem::alloc(size, policy::LOCAL, 0, 0) {
            Ok((va, len)) => {
                held[n] = va;
                n += 1;
                bytes += len;
            }
            Err(Error(ENOMEM)) => size /= 2,
            Err(e) => {
                check(false, "allocation failed with something other than ENOMEM");
                println!("guest: oom: status {}", e.name());
                break;
            }
        }
    }
    let full = mem::stats(ALL_NODES).unwrap_or_default();
    check(mem::alloc(4096, policy::LOCAL, 0, 0) == Err(Error(ENOMEM)), "a page was still available after exhaustion");
    check(full.free_frames < 64, "memory was not exhausted");

    // Recover: give half back, then allocate and really use memory again.
    for &va in held[..n].iter().step_by(2) {
        check(mem::free(va).is_ok(), "free failed");
    }
    match mem::alloc(8 << 20, policy::LOCAL, 0, flags::ZERO) {
        Ok((va, len)) => {
            for p in 0..len / 4096 {
                check(read(va + p * 4096) == 0, "recovered memory is not zero");
                write(va + p * 4096, sig(1, 2, p));
            }
            for p in 0..len / 4096 {
                check(read(va + p * 4096) == sig(1, 2, p), "recovered memory lost data");
            }
            check(mem::free(va).is_ok(), "free failed");
        }
        Err(e) => check(false, if e.0 == ENOMEM { "no memory after freeing half" } else { "alloc failed" }),
    }
    for &va in held[..n].iter().skip(1).step_by(2) {
        check(mem::free(va).is_ok(), "free failed");
    }
    let after = mem::stats(ALL_NODES).unwrap_or_default();
    check(data_frames(&after) == data_frames(&before), "frames leaked");
    println!(
        "@result scenario=oom exhausted_bytes={bytes} regions={n} free_frames_when_full={} ok={}",
        full.free_frames,
        u8::from(checks.ok)
    );
    if !checks.ok {
        fail(exit::VERIFY_FAILED);
    }
}
