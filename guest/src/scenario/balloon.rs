//! Guests for the balloon's edge cases.
//!
//! - `scenario=hold size=SIZE seconds=N [shrink=1] [pattern=random]`: takes `size` of memory,
//!   touches every page, and keeps it until `seconds` pass or it is asked to finish: a guest
//!   without a shrinker. The balloon cannot reach a target that needs those frames; the guest
//!   keeps running. With `shrink=1` it gives memory back as soon as its limit drops (for the
//!   inflate benchmark). With `pattern=random` every word of every page is pseudo-random
//!   (incompressible), else only its first word is set; all of it is checked at the end.
//! - `scenario=grow size=SIZE`: allocates 1 MiB regions up to `size` whatever the balloon's
//!   limit, touching each: with deflate-on-OOM the balloon gives way, without it the guest gets
//!   ENOMEM at its limit. Reports what it got.

use alloc::vec::Vec;

use protocol::memcall::policy;
use protocol::status;

use super::Ctx;
use crate::{arch, mem, notify, println};

const CHUNK: u64 = 1 << 20;

/// The word at `addr` of a `random` page: a cheap hash of the address.
fn word(addr: u64, random: bool, page_start: bool) -> u64 {
    if random {
        let x = addr.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    } else if page_start {
        addr
    } else {
        0
    }
}

/// Allocates up to `size` in 1 MiB regions, writing every page (its first word, or every word
/// when `random`); returns them and the status that stopped it (OK: all of it).
fn take(size: u64, random: bool) -> (Vec<u64>, u64) {
    let mut vas = Vec::new();
    while (vas.len() as u64) * CHUNK < size {
        match mem::alloc(CHUNK, policy::LOCAL, 0, 0) {
            Ok((va, _)) => {
                for p in 0..CHUNK / 4096 {
                    let page = va + p * 4096;
                    let words = if random { 512 } else { 1 };
                    for w in 0..words {
                        super::util::write(page + w * 8, word(page + w * 8, random, w == 0));
                    }
                }
                vas.push(va);
            }
            Err(e) => return (vas, e.0),
        }
    }
    (vas, status::OK)
}

/// Whether every page of `vas` still holds what `take` wrote.
fn intact(vas: &[u64], random: bool) -> bool {
    vas.iter().all(|&va| {
        (0..CHUNK / 8).all(|w| {
            let a = va + w * 8;
            super::util::read(a) == word(a, random, a % 4096 == 0)
        })
    })
}

fn give_back(vas: &[u64]) {
    for &va in vas {
        let _ = mem::free(va);
    }
}

pub fn hold(ctx: &Ctx) {
    if ctx.cpu != 0 {
        return;
    }
    let size = ctx.args.num("size", 64 << 20).unwrap_or(64 << 20);
    let seconds = ctx.args.num("seconds", 5).unwrap_or(5);
    let random = ctx.args.get("pattern") == Some("random");
    let (vas, st) = take(size, random);
    println!("@result scenario=hold phase=holding mib={} status={st}", vas.len());
    let shrink = ctx.args.num("shrink", 0).unwrap_or(0) != 0;
    let khz = ctx.bi.tsc_khz.max(1);
    let end = arch::rdtsc().saturating_add(seconds * khz * 1000);
    let mut vas = vas;
    let mut limit = notify::page().guest_limit_frames;
    while arch::rdtsc() < end && !notify::shutdown_requested() {
        let now = notify::page().guest_limit_frames;
        if shrink && now < limit {
            // Free whole chunks until the VMM's count of our frames fits the new limit, with
            // 64 MiB to spare for what is not data (page tables, slabs).
            let held = mem::stats(protocol::memcall::ALL_NODES).map_or(0, |s| super::util::data_frames(&s));
            let over = (held + 64 * 256).saturating_sub(now);
            for _ in 0..over.div_ceil(CHUNK / 4096) {
                let Some(va) = vas.pop() else { break };
                let _ = mem::free(va);
            }
        }
        limit = now;
        arch::pause();
    }
    // Every page still holds what was written.
    let intact = intact(&vas, random);
    give_back(&vas);
    println!("@result scenario=hold phase=done mib={} intact={}", vas.len(), u8::from(intact));
    if !intact {
        super::fail(protocol::exit::VERIFY_FAILED);
    }
}

pub fn grow(ctx: &Ctx) {
    if ctx.cpu != 0 {
        return;
    }
    let size = ctx.args.num("size", 64 << 20).unwrap_or(64 << 20);
    let limit_mib = notify::page().guest_limit_frames / 256;
    let (vas, st) = take(size, false);
    println!("@result scenario=grow mib={} limit_mib={limit_mib} enomem={}", vas.len(), u8::from(st == status::ENOMEM));
    give_back(&vas);
}
