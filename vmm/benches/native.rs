//! Our own allocation workloads (churn, larson, xmalloc, cache-scratch) in the guest and natively
//! on the host, side by side in one run: the guest's source files (`guest/src/scenario/*.rs`,
//! `guest/src/{rng,args}.rs`) are compiled here unchanged for the host, over small shims for
//! what the guest gets from its kernel (the TSC, its vCPU id, the allocator's exit counter,
//! `println!`), with one thread per vCPU. Same seeds, same sizes, same fill and check of every
//! object (single-threaded runs must end with the same checksum). Natively the objects come
//! from the Rust system allocator (glibc malloc), and with `LD_PRELOAD` from mimalloc; in the
//! guest from the VMM's slabs through the rings, with the service thread (`rings=on`) and
//! without it (`rings=off`).
//!
//! `cargo bench -p vmm --bench native` (`NATIVE_RUNS=N`, default 7, medians). The binary runs
//! the native side itself when `NATIVE_CHILD` is set.

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
        super::CPU.with(std::cell::Cell::get)
    }

    pub fn pause() {
        std::hint::spin_loop();
    }
}

/// What the guest's allocator counts: natively there are no exits, and no rings.
mod heap {
    pub fn exits() -> u64 {
        0
    }

    pub fn ring_depth(_class: usize) -> u32 {
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

thread_local! {
    /// The "vCPU" this harness thread stands for.
    static CPU: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The native side: `args` (a guest argument string) on `threads` threads, their result lines
/// on stdout.
fn child(args: &str, seed: u64, threads: u32) {
    // SAFETY: BootInfo is plain integers and arrays of them (repr(C)): all zeroes is a valid
    // value; the workloads read only `seed` and `tsc_khz`.
    let mut info: protocol::BootInfo = unsafe { std::mem::zeroed() };
    info.seed = seed;
    info.tsc_khz = tsc_khz();
    let bi: &'static protocol::BootInfo = Box::leak(Box::new(info));
    let spec: &'static str = Box::leak(args.to_string().into_boxed_str());
    let _ = scenario::BARRIER.set(std::sync::Barrier::new(threads as usize));
    let name = args::Args(spec).get("scenario").unwrap_or("churn").to_string();
    let handles: Vec<_> = (0..threads)
        .map(|cpu| {
            let name = name.clone();
            std::thread::spawn(move || {
                CPU.with(|c| c.set(cpu));
                let ctx = scenario::Ctx { cpu, cpus: threads, bi, args: args::Args(spec) };
                match name.as_str() {
                    "larson" => scenario::larson::run(&ctx),
                    "xmalloc" => scenario::xmalloc::run(&ctx),
                    "cache-scratch" => scenario::cachescratch::run(&ctx),
                    _ => scenario::churn::run(&ctx),
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a workload thread");
    }
    std::process::exit(scenario::STATUS.load(std::sync::atomic::Ordering::Acquire).cast_signed());
}

/// What one run reports: the summed `ops_per_sec` of its threads (or vCPUs), their checksums,
/// and the allocator's exits.
struct Outcome {
    ops_per_sec: f64,
    checksums: Vec<String>,
    exits: f64,
    ops: f64,
}

fn outcome(out: &str, scenario: &str, ok: bool) -> Option<Outcome> {
    let rs = common::results(out, scenario);
    (ok && !rs.is_empty()).then(|| Outcome {
        ops_per_sec: rs.iter().map(|r| common::number(r, "ops_per_sec")).sum(),
        checksums: rs.iter().map(|r| text(r, "checksum")).collect(),
        exits: rs.iter().map(|r| common::number(r, "allocator_exits")).sum(),
        ops: rs.iter().map(|r| common::number(r, "ops")).sum(),
    })
}

/// One native run of `args` on `threads` threads (with `preload` as `LD_PRELOAD`).
fn native(args: &str, scenario: &str, seed: u64, threads: u32, preload: Option<&str>) -> Option<Outcome> {
    let mut cmd = Command::new(std::env::current_exe().ok()?);
    cmd.env("NATIVE_CHILD", format!("{seed};{threads};{args}"));
    if let Some(p) = preload {
        cmd.env("LD_PRELOAD", p);
    }
    let o = cmd.output().ok()?;
    outcome(&String::from_utf8_lossy(&o.stdout), scenario, o.status.success())
}

/// One guest run of `args` on `cpus` vCPUs (pinned when a host CPU is spare, as in cbench).
fn guest(args: &str, scenario: &str, seed: u64, cpus: u32, rings: bool) -> Option<Outcome> {
    let memory = if rings { "size=1G" } else { "size=1G,rings=off" };
    let o = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--kernel"])
        .arg(common::guest_image())
        .args(["--cpus", &format!("boot={cpus},affinity=auto"), "--memory", memory])
        .args(["--guest-args", &format!("{args} seed={seed}")])
        .output()
        .ok()?;
    outcome(&String::from_utf8_lossy(&o.stdout), scenario, o.status.success())
}

/// A result field as text.
fn text(r: &serde_json::Value, k: &str) -> String {
    r[k].as_str().map_or_else(|| r[k].to_string(), str::to_string)
}

fn median(v: Vec<f64>) -> f64 {
    common::median(v).unwrap_or(0.0)
}

const MIMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2";

/// The workloads: (scenario name, guest arguments).
const WORKLOADS: &[(&str, &str)] = &[
    ("churn", "scenario=churn ops=2000000"),
    ("larson", "scenario=larson rounds=40 replacements=20000"),
    ("xmalloc", "scenario=xmalloc ops=400000"),
    ("cache-scratch", "scenario=cache-scratch iterations=200000"),
];

fn main() {
    if let Ok(spec) = std::env::var("NATIVE_CHILD") {
        let mut parts = spec.splitn(3, ';');
        let seed = parts.next().and_then(|s| s.parse().ok()).expect("seed");
        let threads = parts.next().and_then(|s| s.parse().ok()).expect("threads");
        child(parts.next().expect("args"), seed, threads);
    }
    common::build_guest();
    let runs: usize = std::env::var("NATIVE_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(7).max(1);
    let mimalloc = std::path::Path::new(MIMALLOC).exists().then_some(MIMALLOC);
    println!(
        "our workloads natively (glibc malloc, mimalloc) and in the guest, median of {runs} (same seeds and checks)"
    );
    println!(
        "{:<14} {:>3} {:>12} {:>12} {:>12} {:>12} {:>9} {:>11} {:>10} {:>9}",
        "workload",
        "thr",
        "guest ops/s",
        "rings off",
        "glibc",
        "mimalloc",
        "vs glibc",
        "vs mimalloc",
        "rings off",
        "exits/1k"
    );
    // The rows again, in `make bench-c`'s CSV format, for its table (it runs this first).
    let mut csv = String::new();
    for &(name, args) in WORKLOADS {
        for threads in [1u32, 2] {
            let (mut on, mut off, mut glibc, mut mi, mut exits) = (vec![], vec![], vec![], vec![], vec![]);
            for k in 0..runs {
                let seed = 17 + k as u64;
                let n = native(args, name, seed, threads, None).expect("the native workload runs");
                let g = guest(args, name, seed, threads, true).expect("the guest's workload runs");
                if threads == 1 {
                    assert_eq!(n.checksums, g.checksums, "{name} seed {seed}: native and guest disagree");
                }
                glibc.push(n.ops_per_sec);
                on.push(g.ops_per_sec);
                exits.push(g.exits * 1000.0 / g.ops.max(1.0));
                off.push(guest(args, name, seed, threads, false).expect("the guest's workload runs").ops_per_sec);
                if let Some(p) = mimalloc {
                    mi.push(native(args, name, seed, threads, Some(p)).expect("with mimalloc").ops_per_sec);
                }
            }
            let (on, off, glibc, mi, exits) = (median(on), median(off), median(glibc), median(mi), median(exits));
            println!(
                "{name:<14} {threads:>3} {on:>12.0} {off:>12.0} {glibc:>12.0} {mi:>12.0} {:>8.2}x {:>10.2}x {:>9.2}x {:>9.2}",
                on / glibc,
                if mi > 0.0 { on / mi } else { 0.0 },
                off / glibc,
                exits
            );
            let mi_col = if mi > 0.0 { format!("{mi}") } else { String::new() };
            let mi_ratio = if mi > 0.0 { format!("{}", on / mi) } else { String::new() };
            csv += &format!(
                "ours/{name},{threads},ops/s,true,{on},{glibc},{mi_col},{},{mi_ratio},{},,\n",
                on / glibc,
                exits
            );
        }
    }
    println!("(ops/s summed over threads or vCPUs; ratios: the guest against native, above 1 = the guest is faster)");
    csv += &first_touch(runs);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-plots");
    std::fs::create_dir_all(&dir).expect("target/ is writable");
    std::fs::write(dir.join(NATIVE_CSV), csv).expect("target/bench-plots is writable");
}

/// First touch of 256 MiB in the guest (`scenario=touch`, every page in order and 10% of them at
/// random) with the default backing against the same guest under kernel demand paging, the
/// anchor the issue sets (a native process has no second-level faults to compare). Prints a
/// table and returns the rows for `make bench-c`'s table: pages per second, the kernel's figure
/// in the glibc column, and the frames made resident per page touched.
fn first_touch(runs: usize) -> String {
    // (pages per second, frames made resident per page touched)
    let run = |memory: &str, pct: u64, rounds: u64| {
        let (ns, _, frames) = common::first_touch(memory, 256, 0, pct, rounds);
        (1e9 / ns.max(1) as f64, frames)
    };
    println!(
        "\nfirst touch of 256 MiB in the guest, median of {runs}: the default backing against kernel demand paging"
    );
    println!(
        "{:<16} {:>14} {:>14} {:>10} {:>18}",
        "pattern", "default pg/s", "kernel pg/s", "ratio", "installed/touched"
    );
    let mut csv = String::new();
    // `touch-10%x3`: three passes in one VM, the fastest counted: what a scattered first touch
    // costs once the default backing has handed that RAM over to the kernel (the first pass
    // pays for finding out that the touches are scattered).
    for (name, pct, rounds) in [("touch-seq", 100, 1), ("touch-10%", 10, 1), ("touch-10%x3", 10, 3)] {
        let (mut ours, mut kernel, mut frames) = (vec![], vec![], vec![]);
        for _ in 0..runs {
            let (o, f) = run("size=1G", pct, rounds);
            ours.push(o);
            frames.push(f);
            kernel.push(run("size=1G,backing=demand", pct, rounds).0);
        }
        let (ours, kernel, frames) = (median(ours), median(kernel), median(frames));
        println!("{name:<16} {ours:>14.0} {kernel:>14.0} {:>9.2}x {frames:>18.2}", ours / kernel);
        csv += &format!("ours/{name},1,pages/s,true,{ours},{kernel},,{},,,,,{frames}\n", ours / kernel);
    }
    csv
}

/// Where the rows go for `make bench-c`'s table (same columns as its CSV, no header).
const NATIVE_CSV: &str = "native-rows.csv";
