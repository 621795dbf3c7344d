//! `scenario=ptstress rounds=N`: the page-table protocol under fire. Each round one vCPU (the
//! owner, in turn) allocates, frees, protects (none / read-only / read-write) and moves regions
//! through the VMM; then every vCPU checks every page of every region: the right data where it
//! may read, a #PF with the right error code where it may not (not present, or a write to a
//! read-only page), and a #PF at every address that was freed or moved away. All vCPUs read all
//! regions every round, so each one holds cached translations that the next round's changes
//! must invalidate: any stale read is counted and fails the run.

use core::cell::UnsafeCell;

use protocol::exit;
use protocol::memcall::{flags, policy, prot};

use super::util::sig;
use super::{Ctx, fail};
use crate::rng::Rng;
use crate::trap::{self, pf};
use crate::{mem, println};

const SLOTS: usize = 16;
const MAX_DEAD: usize = 8;

#[derive(Clone, Copy)]
struct Slot {
    live: bool,
    va: u64,
    pages: u64,
    page_size: u64,
    prot: u32,
    version: u64,
    /// Addresses freed or moved away this round: they must fault.
    dead: [u64; MAX_DEAD],
    ndead: usize,
}

const EMPTY: Slot =
    Slot { live: false, va: 0, pages: 0, page_size: 4096, prot: 0, version: 0, dead: [0; MAX_DEAD], ndead: 0 };

/// The regions, shared by all vCPUs: only the round's owner writes them, between barriers.
struct Shared(UnsafeCell<[Slot; SLOTS]>);

// SAFETY: writes happen only in the owner phase, reads only in the check phase; the barriers
// between phases order them (see `run`).
unsafe impl Sync for Shared {}

static STATE: Shared = Shared(UnsafeCell::new([EMPTY; SLOTS]));

#[derive(Default)]
struct Counts {
    ops: u64,
    checks: u64,
    expected_faults: u64,
    stale: u64,
    errors: u64,
}

fn value(slot: usize, version: u64, page: u64) -> u64 {
    sig(slot as u64, version, page)
}

fn report(c: &mut Counts, cpu: u32, what: &str, addr: u64, detail: u64) {
    c.stale += 1;
    if c.stale <= 8 {
        println!("guest: ptstress: cpu {cpu}: {what} at {addr:#x} ({detail:#x})");
    }
}

/// Owner phase: a few random operations.
fn mutate(slots: &mut [Slot; SLOTS], rng: &mut Rng, ops: u64, huge_pct: u64, op_mask: u64, c: &mut Counts, cpu: u32) {
    for s in slots.iter_mut() {
        s.ndead = 0;
    }
    for _ in 0..ops {
        let i = rng.below(SLOTS as u64) as usize;
        let s = &mut slots[i];
        c.ops += 1;
        if !s.live {
            let huge = rng.below(100) < huge_pct;
            let (pages, page_size, fl) = if huge { (1, 2 << 20, flags::HUGE) } else { (rng.range(1, 8), 4096, 0) };
            match mem::alloc(pages * page_size, policy::LOCAL, 0, fl) {
                Ok((va, _)) => {
                    *s = Slot {
                        live: true,
                        va,
                        pages,
                        page_size,
                        prot: prot::READ | prot::WRITE,
                        version: s.version + 1,
                        ..*s
                    };
                    write_all(s, i);
                }
                Err(e) if e.0 == protocol::status::ENOMEM => {}
                Err(e) => {
                    c.errors += 1;
                    println!("guest: ptstress: alloc failed: {}", e.name());
                }
            }
            continue;
        }
        let mut o = rng.below(5);
        while op_mask & (1 << o) == 0 {
            o = (o + 1) % 5;
        }
        let result = match o {
            0 => mem::free(s.va).map(|()| {
                push_dead(s, s.va);
                s.live = false;
            }),
            1 => set_prot(s, i, prot::READ, c, cpu),
            2 => set_prot(s, i, prot::NONE, c, cpu),
            3 => set_prot(s, i, prot::READ | prot::WRITE, c, cpu),
            _ => mem::mremap(s.va).map(|new| {
                push_dead(s, s.va);
                s.va = new;
                // The data followed the frames to the new address.
                if s.prot != prot::NONE {
                    for p in 0..s.pages {
                        let a = s.va + p * s.page_size;
                        match trap::read(a) {
                            Ok(v) if v == value(i, s.version, p) => {}
                            Ok(v) => report(c, cpu, "moved page has the wrong data", a, v),
                            Err(f) => report(c, cpu, "moved page faults", a, f.error),
                        }
                    }
                }
            }),
        };
        if let Err(e) = result {
            c.errors += 1;
            println!("guest: ptstress: memory call failed: {}", e.name());
        }
    }
}

fn push_dead(s: &mut Slot, va: u64) {
    if s.ndead < MAX_DEAD {
        s.dead[s.ndead] = va;
        s.ndead += 1;
    }
}

fn set_prot(s: &mut Slot, i: usize, p: u32, c: &mut Counts, cpu: u32) -> Result<(), mem::Error> {
    mem::protect(s.va, s.pages * s.page_size, p)?;
    let was = s.prot;
    s.prot = p;
    if p & prot::READ != 0 && was == prot::NONE {
        // Contents survive PROT_NONE.
        for q in 0..s.pages {
            let a = s.va + q * s.page_size;
            match trap::read(a) {
                Ok(v) if v == value(i, s.version, q) => {}
                Ok(v) => report(c, cpu, "page lost its data under PROT_NONE", a, v),
                Err(f) => report(c, cpu, "re-enabled page faults", a, f.error),
            }
        }
    }
    if p & prot::WRITE != 0 {
        s.version += 1;
        write_all(s, i);
    }
    Ok(())
}

fn write_all(s: &Slot, i: usize) {
    for p in 0..s.pages {
        // The slot is mapped read-write by the VMM right now.
        super::util::write(s.va + p * s.page_size, value(i, s.version, p));
    }
}

/// Check phase: every page of every region, and every dead address.
fn check(slots: &[Slot; SLOTS], c: &mut Counts, cpu: u32) {
    for (i, s) in slots.iter().enumerate() {
        for &d in &s.dead[..s.ndead] {
            c.checks += 1;
            match trap::read(d) {
                Ok(v) => report(c, cpu, "stale read of a freed or moved address", d, v),
                Err(f) if f.error & pf::PRESENT != 0 || f.addr != d => {
                    report(c, cpu, "wrong fault on a dead address", d, f.error)
                }
                Err(_) => c.expected_faults += 1,
            }
        }
        if !s.live {
            continue;
        }
        for p in 0..s.pages {
            let a = s.va + p * s.page_size;
            let want = value(i, s.version, p);
            c.checks += 1;
            match (s.prot, trap::read(a)) {
                (prot::NONE, Ok(v)) => report(c, cpu, "stale read of a PROT_NONE page", a, v),
                (prot::NONE, Err(f)) if f.error & pf::PRESENT != 0 => {
                    report(c, cpu, "wrong fault on PROT_NONE", a, f.error)
                }
                (prot::NONE, Err(_)) => c.expected_faults += 1,
                (_, Ok(v)) if v != want => report(c, cpu, "wrong data", a, v),
                (_, Ok(_)) => {}
                (_, Err(f)) => report(c, cpu, "readable page faults", a, f.error),
            }
            if s.prot & prot::READ != 0 {
                c.checks += 1;
                // Write back what is there: harmless where allowed, a fault where not.
                match (s.prot & prot::WRITE != 0, trap::write(a, want)) {
                    (true, Ok(())) => {}
                    (true, Err(f)) => report(c, cpu, "writable page faults on write", a, f.error),
                    (false, Ok(())) => report(c, cpu, "stale write to a read-only page", a, 0),
                    (false, Err(f)) if f.error & (pf::PRESENT | pf::WRITE) != (pf::PRESENT | pf::WRITE) => {
                        report(c, cpu, "wrong fault on a read-only page", a, f.error)
                    }
                    (false, Err(_)) => c.expected_faults += 1,
                }
            }
        }
    }
}

pub fn run(ctx: &Ctx) {
    let rounds = ctx.args.num("rounds", 600).unwrap_or(600);
    let ops = ctx.args.num("ops", 3).unwrap_or(3);
    let huge_pct = ctx.args.num("huge", 10).unwrap_or(10);
    // Bit per operation: free, read-only, none, read-write, move.
    let op_mask = ctx.args.num("opmask", 0x1f).unwrap_or(0x1f) | 1;
    let mut rng = Rng::new(ctx.seed());
    let mut c = Counts::default();
    ctx.barrier();
    for r in 0..rounds {
        if r % u64::from(ctx.cpus) == u64::from(ctx.cpu) {
            // SAFETY: owner phase: this vCPU alone touches the slots until the barrier.
            let slots = unsafe { &mut *STATE.0.get() };
            mutate(slots, &mut rng, ops, huge_pct, op_mask, &mut c, ctx.cpu);
        }
        ctx.barrier();
        // SAFETY: check phase: every vCPU only reads the slots until the next barrier.
        let slots = unsafe { &*STATE.0.get() };
        check(slots, &mut c, ctx.cpu);
        ctx.barrier();
    }
    if ctx.cpu == 0 {
        // SAFETY: after the last barrier; the other vCPUs only print from here on.
        let slots = unsafe { &mut *STATE.0.get() };
        for s in slots.iter_mut().filter(|s| s.live) {
            if mem::free(s.va).is_err() {
                c.errors += 1;
            }
            s.live = false;
        }
    }
    println!(
        "@result scenario=ptstress cpu={} rounds={rounds} ops={} checks={} expected_faults={} stale={} errors={}",
        ctx.cpu, c.ops, c.checks, c.expected_faults, c.stale, c.errors
    );
    if c.stale > 0 || c.errors > 0 {
        fail(exit::VERIFY_FAILED);
    }
}
