//! Our own allocation workload, `scenario=churn`, in the guest and natively on the host, side by
//! side in one run: the guest's source files (`guest/src/scenario/{churn,workload,util}.rs`,
//! `guest/src/{rng,args}.rs`) are compiled here unchanged for the host, over small shims for
//! what the guest gets from its kernel (the TSC, its vCPU id, the allocator's exit counter,
//! `println!`). Same seeds, same sizes, same fill and check of every object. Natively the
//! objects come from the Rust system allocator (glibc malloc), and with `LD_PRELOAD` from
//! mimalloc; in the guest from the VMM's slabs through the rings, with the service thread
//! (`rings=on`) and without it (`rings=off`).
//!
//! `cargo bench -p vmm --bench native` (`NATIVE_RUNS=N`, default 3, medians; `NATIVE_OPS=N`,
//! default 2,000,000). The binary runs the native side itself when `NATIVE_CHILD=seed,ops`.

// The guest's files carry their own allowances; here only the harness arithmetic.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss, dead_code)]

extern crate alloc;

mod common;

use std::process::Command;
use std::time::Instant;

/// The guest's `println!`, on stdout.
macro_rules! guest_println {
    ($($t:tt)*) => { std::println!($($t)*) };
}
pub(crate) use guest_println as println;

#[allow(clippy::pedantic, clippy::all)]
#[path = "../../guest/src/args.rs"]
mod args;
#[allow(clippy::pedantic, clippy::all)]
#[path = "../../guest/src/rng.rs"]
mod rng;

/// What the guest's `arch` module gives the workloads: the TSC and the vCPU id.
mod arch {
    pub fn rdtsc() -> u64 {
        // SAFETY: RDTSC has no preconditions on x86-64.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    pub fn cpu_id() -> u32 {
        0
    }
}

/// What the guest's allocator counts: natively there are no exits.
mod heap {
    pub fn exits() -> u64 {
        0
    }
}

/// The guest's scenario module, as far as churn needs it.
#[path = "common/native_scenario.rs"]
mod scenario;

/// TSC ticks per millisecond, measured against the monotonic clock.
fn tsc_khz() -> u64 {
    let (t0, c0) = (Instant::now(), arch::rdtsc());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (dt, dc) = (t0.elapsed(), arch::rdtsc() - c0);
    (dc as f64 / dt.as_secs_f64() / 1000.0).max(1.0) as u64
}

/// The native side: churn with `seed` and `ops`, its result line on stdout.
fn child(seed: u64, ops: u64) {
    // SAFETY: BootInfo is plain integers and arrays of them (repr(C)): all zeroes is a valid
    // value; the workload reads only `seed` and `tsc_khz`.
    let mut info: protocol::BootInfo = unsafe { std::mem::zeroed() };
    info.seed = seed;
    info.tsc_khz = tsc_khz();
    let bi = Box::leak(Box::new(info));
    let spec = Box::leak(format!("scenario=churn ops={ops}").into_boxed_str());
    let ctx = scenario::Ctx { cpu: 0, cpus: 1, bi, args: args::Args(spec) };
    scenario::churn::run(&ctx);
    std::process::exit(scenario::STATUS.load(std::sync::atomic::Ordering::Acquire).cast_signed());
}

/// `ops_per_sec` of one run of the native side (with `preload` as `LD_PRELOAD`).
fn native(seed: u64, ops: u64, preload: Option<&str>) -> Option<(f64, String)> {
    let mut cmd = Command::new(std::env::current_exe().ok()?);
    cmd.env("NATIVE_CHILD", format!("{seed},{ops}"));
    if let Some(p) = preload {
        cmd.env("LD_PRELOAD", p);
    }
    let o = cmd.output().ok()?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let r = common::results(&out, "churn").into_iter().next()?;
    o.status.success().then(|| (num(&r, "ops_per_sec"), text(&r, "checksum")))
}

/// `ops_per_sec`, checksum and allocator exits of one guest run.
fn guest(seed: u64, ops: u64, rings: bool) -> Option<(f64, String, f64)> {
    let memory = if rings { "size=1G" } else { "size=1G,rings=off" };
    let o = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--kernel"])
        .arg(common::guest_image())
        .args(["--memory", memory, "--guest-args", &format!("scenario=churn ops={ops} seed={seed}")])
        .output()
        .ok()?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let r = common::results(&out, "churn").into_iter().next()?;
    o.status.success().then(|| (num(&r, "ops_per_sec"), text(&r, "checksum"), num(&r, "allocator_exits")))
}

/// A result field as a number (the parser keeps big numbers as text).
fn num(r: &serde_json::Value, k: &str) -> f64 {
    r[k].as_f64().or_else(|| r[k].as_str().and_then(|s| s.parse().ok())).unwrap_or(0.0)
}

/// A result field as text.
fn text(r: &serde_json::Value, k: &str) -> String {
    r[k].as_str().map_or_else(|| r[k].to_string(), str::to_string)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

const MIMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2";

fn main() {
    if let Ok(spec) = std::env::var("NATIVE_CHILD") {
        let (seed, ops) = spec.split_once(',').expect("seed,ops");
        child(seed.parse().expect("seed"), ops.parse().expect("ops"));
    }
    common::build_guest();
    let runs: usize = std::env::var("NATIVE_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let ops: u64 = std::env::var("NATIVE_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(2_000_000);
    let mimalloc = std::path::Path::new(MIMALLOC).exists().then_some(MIMALLOC);
    let (mut on, mut off, mut glibc, mut mi, mut exits) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for k in 0..runs {
        let seed = 17 + k as u64;
        let n = native(seed, ops, None).expect("the native churn runs");
        let g = guest(seed, ops, true).expect("the guest's churn runs");
        // The same seed makes the same objects: the checksums agree, natively and in the guest.
        assert_eq!(n.1, g.1, "seed {seed}: the native and the guest churn disagree");
        glibc.push(n.0);
        on.push(g.0);
        exits.push(g.2 * 1000.0 / ops as f64);
        off.push(guest(seed, ops, false).expect("the guest's churn runs").0);
        if let Some(p) = mimalloc {
            mi.push(native(seed, ops, Some(p)).expect("the native churn runs with mimalloc").0);
        }
    }
    let (on, off, glibc) = (median(on), median(off), median(glibc));
    println!("churn, {ops} operations, 1 vCPU / 1 thread, median of {runs} (same seeds and checks natively)");
    println!("{:<34} {:>12} {:>10} {:>10}", "", "ops/s", "vs glibc", "exits/1k");
    println!("{:<34} {:>12.0} {:>9.2}x", "native, glibc malloc", glibc, 1.0);
    if !mi.is_empty() {
        let m = median(mi);
        println!("{:<34} {:>12.0} {:>9.2}x", "native, mimalloc", m, m / glibc);
    }
    println!("{:<34} {:>12.0} {:>9.2}x {:>10.2}", "guest, slab rings serviced", on, on / glibc, median(exits));
    println!("{:<34} {:>12.0} {:>9.2}x", "guest, rings=off (exits only)", off, off / glibc);
}
