//! The balloon against the raw kernel mechanisms, side by side in one run.
//!
//! - Inflate speed: a guest holds `size` of resident memory (every page written) plus some;
//!   `PATCH /balloon` asks for all the free memory and `size` more, and the guest (`scenario=hold
//!   shrink=1`) frees 1 MiB regions as soon as it sees its lower limit. Measured: from the PATCH
//!   to the balloon holding its target (the VMM's own clock, `last_inflate_us`), and the VMM's
//!   RSS before and after. Against: one `MADV_DONTNEED` of `size` of resident anonymous memory
//!   in this process, the least any balloon has to do to give that memory to the host.
//! - Notification latency: both vCPUs of a 2-vCPU guest spin without exits (`scenario=spin`), or
//!   run the cache workload (`scenario=cache`: memory calls and faults); a series of PATCHes each
//!   notifies the guest. Measured by the VMM: from the request to the handler's entry and to the
//!   handler's NOTIFY_DONE. Against: `pthread_kill` of a busy host thread until its signal
//!   handler runs, the kernel's own way of interrupting a running thread.
//!
//! `cargo bench -p vmm --bench balloon` (after `images/build.sh`; `make bench` does both). Without
//! `--bench` (as `cargo test --benches` runs it), a quick pass with small sizes.

// Harness arithmetic on sizes and times: the casts are intentional.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Vm;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// One inflate of `size` MiB of resident guest memory: (VMM-measured time, time seen by the
/// client, RSS drop in MiB).
fn inflate(size: u64) -> (Duration, Duration, u64) {
    let vm = Vm::start(&[
        "--memory",
        &format!("size={}M", size + 512),
        "--guest-args",
        &format!("scenario=hold size={}M seconds=120 shrink=1", size + 256),
    ]);
    vm.wait_until(Duration::from_secs(60), || vm.output().contains("phase=holding"));
    std::thread::sleep(Duration::from_millis(200));
    let free = vm.api("GET", "/balloon/statistics", None)["free_memory"].as_u64().expect("free_memory");
    let before = vm.rss_mib();
    let amount = free / MIB + size;
    let start = Instant::now();
    vm.api("PATCH", "/balloon", Some(&format!(r#"{{"amount_mib": {amount}}}"#)));
    let s = loop {
        let s = vm.api("GET", "/balloon/statistics", None);
        if s["actual_pages"] == s["target_pages"] && !s["last_inflate_us"].is_null() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the balloon did not reach its target: {s}");
        std::thread::sleep(Duration::from_millis(1));
    };
    let seen = start.elapsed();
    let vmm_time = Duration::from_micros(s["last_inflate_us"].as_u64().expect("last_inflate_us"));
    std::thread::sleep(Duration::from_millis(200));
    let after = vm.rss_mib();
    vm.finish();
    (vmm_time, seen, before.saturating_sub(after))
}

/// One `MADV_DONTNEED` of `size` MiB of resident anonymous memory.
fn raw_dontneed(size: u64) -> Duration {
    let len = usize::try_from(size * MIB).expect("fits");
    let p = common::anon_mapping(len);
    for off in (0..len).step_by(4096) {
        // SAFETY: within the mapping just made.
        unsafe { p.cast::<u8>().add(off).write_volatile(1) };
    }
    let start = Instant::now();
    // SAFETY: the whole mapping, ours.
    let rc = unsafe { libc::madvise(p, len, libc::MADV_DONTNEED) };
    let t = start.elapsed();
    assert_eq!(rc, 0, "madvise");
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(p, len) };
    t
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn gib_per_s(mib: u64, t: Duration) -> f64 {
    mib as f64 / 1024.0 / t.as_secs_f64().max(1e-9)
}

fn inflate_table(size: u64, runs: usize) {
    let (mut raw, mut vmm_t, mut seen, mut dropped) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        raw.push(raw_dontneed(size));
        let (v, s, d) = inflate(size);
        vmm_t.push(v);
        seen.push(s);
        dropped.push(d);
    }
    let (raw, vmm_t, seen) = (median(&mut raw), median(&mut vmm_t), median(&mut seen));
    dropped.sort_unstable();
    println!("inflate: {size} MiB of resident guest memory back to the host, median of {runs} runs");
    println!("{:<52} {:>10} {:>10} {:>10}", "", "ms", "GiB/s", "vs raw");
    let row = |name: &str, t: Duration| {
        println!(
            "{name:<52} {:>10.1} {:>10.2} {:>9.2}x",
            t.as_secs_f64() * 1e3,
            gib_per_s(size, t),
            raw.as_secs_f64() / t.as_secs_f64().max(1e-9)
        );
    };
    row("raw MADV_DONTNEED in one call (host process)", raw);
    row("balloon: PATCH to actual == target (VMM clock)", vmm_t);
    row("balloon: PATCH to actual == target (client polling)", seen);
    println!("VMM RSS drop per inflate: {:?} MiB (goal: >= {} MiB)", dropped, size * 9 / 10);
    println!();
}

/// The kernel's own interrupt of a busy thread: `pthread_kill` until its handler runs.
fn raw_signal_latencies(n: usize) -> Vec<u64> {
    static HANDLED: AtomicU64 = AtomicU64::new(0);
    extern "C" fn on_signal(_: libc::c_int) {
        HANDLED.fetch_add(1, Ordering::Release);
    }
    let sig = libc::SIGRTMIN() + 3;
    // SAFETY: installs a handler that only increments an atomic, for a signal nobody else uses.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigaction(sig, &sa, std::ptr::null_mut());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let spin = |stop: Arc<AtomicBool>| {
        move || {
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
            }
        }
    };
    let target = std::thread::spawn(spin(Arc::clone(&stop)));
    let other = std::thread::spawn(spin(Arc::clone(&stop)));
    let thread = std::os::unix::thread::JoinHandleExt::as_pthread_t(&target);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        std::thread::sleep(Duration::from_millis(10));
        let before = HANDLED.load(Ordering::Acquire);
        let start = Instant::now();
        // SAFETY: a live thread of this process; the handler above is installed.
        unsafe { libc::pthread_kill(thread, sig) };
        while HANDLED.load(Ordering::Acquire) == before {
            std::hint::spin_loop();
        }
        out.push(start.elapsed().as_nanos() as u64);
    }
    stop.store(true, Ordering::Relaxed);
    target.join().expect("spinner");
    other.join().expect("spinner");
    out
}

/// The VMM's notification latencies (entry, handled) over `n` PATCHes to a guest running
/// `guest` on 2 vCPUs.
fn notify_latencies(guest: &str, n: usize) -> (Value, Value) {
    let vm = Vm::start(&["--memory", "size=512M", "--cpus", "2", "--guest-args", guest]);
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..n {
        std::thread::sleep(Duration::from_millis(10));
        vm.api("PATCH", "/balloon", Some(&format!(r#"{{"amount_mib": {}}}"#, 1 + i % 2)));
    }
    let stats = vm.api("GET", "/stats", None);
    vm.finish();
    let n = &stats["notify"];
    (n["latency"].clone(), n["handled_latency"].clone())
}

fn latency_table(n: usize) {
    let mut raw = raw_signal_latencies(n);
    raw.sort_unstable();
    let pct = |v: &[u64], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    let raw_mean = raw.iter().sum::<u64>() / raw.len() as u64;
    println!("notification latency, {n} requests each (VMM figures: power-of-two buckets, upper bounds)");
    println!("{:<58} {:>10} {:>10} {:>10} {:>10}", "", "mean us", "p50 us", "p99 us", "max us");
    let us = |ns: u64| ns as f64 / 1e3;
    println!(
        "{:<58} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
        "raw: pthread_kill of a busy host thread to its handler",
        us(raw_mean),
        us(pct(&raw, 50)),
        us(pct(&raw, 99)),
        us(*raw.last().expect("some"))
    );
    for (name, guest) in
        [("spinning vCPUs (no exits)", "scenario=spin seconds=120"), ("cache workload", "scenario=cache seconds=120")]
    {
        let (entry, handled) = notify_latencies(guest, n);
        for (what, l) in [("handler entered", entry), ("handler done", handled)] {
            let f = |k: &str| us(l[k].as_u64().unwrap_or(0));
            println!(
                "{:<58} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                format!("VMM, {name}: {what}"),
                f("mean_ns"),
                f("p50_ns"),
                f("p99_ns"),
                f("max_ns")
            );
        }
    }
    println!("goal: the handler runs within 10 ms of the request");
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    common::build_guest();
    let (size, runs, n) = if quick { (64, 1, 10) } else { (512, 5, 200) };
    inflate_table(size, runs);
    latency_table(n);
}
