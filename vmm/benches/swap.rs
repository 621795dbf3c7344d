//! Host-side swap against the raw mechanisms and against the kernel, side by side in one run.
//!
//! 1. Swap-out throughput: a guest holds `size` of incompressible pages and idles; the limit
//!    drops to 64 MiB and the swapper writes them out (`compress=off`). Against: one sequential
//!    `O_DIRECT` write of the same bytes to the same file system. Also a guest whose pages are
//!    almost empty (one word each) with lz4 on: the bytes that reach the disk.
//! 2. Swap-in latency: the VMM's mean time from a second-level fault on a swapped page to the
//!    page installed (random accesses, pages in the file), against a raw `pread` of one 4 KiB
//!    page from the same file system plus a `UFFDIO_COPY` of it, measured in this process.
//! 3. What users pick today: the same `workingset` guest (hot 15%, 30% writes, half-compressible
//!    pages) under the same limit, ours (clock, and fifo for comparison) against the kernel:
//!    `--memory backing=demand` inside a memory cgroup (v1) with the limit and a kernel swap
//!    file on the same disk (and, where it can be turned on, zswap). Guest ops/s, refaults,
//!    bytes written to disk.
//! 4. Plots (SVG, in `target/bench-plots/`): the VMM's RSS over time while the limit changes,
//!    and the guest's access-time distribution, ours against the kernel's.
//!
//! `cargo bench -p vmm --bench swap` (root: cgroups, swapon). Without `--bench`, a quick pass.

// Harness arithmetic on sizes and times: the casts are intentional.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]

mod common;

use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Vm, results};
use serde_json::Value;
use vmm::memory::backing::swap::file::AlignedBuf;
use vmm::memory::backing::uffd::Uffd;

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

/// Where the swap files go: a fresh directory under `$TMPDIR` (else /var/tmp), removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let d = vmm::config::default_swap_dir().join(format!("vmm-swap-bench-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("bench directory");
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// One sequential O_DIRECT write of `bytes` of random data in 2 MiB calls: MiB/s.
fn raw_write(dir: &Path, bytes: u64) -> f64 {
    let path = dir.join("raw-write");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("raw file");
    let mut buf = AlignedBuf::new(2 << 20);
    let mut x = 0x1234_5678_9abc_def1u64;
    for c in buf.as_mut_slice().chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_ne_bytes());
    }
    let start = Instant::now();
    let mut off = 0;
    while off < bytes {
        f.write_all_at(buf.as_slice(), off).expect("write");
        off += buf.len() as u64;
    }
    let t = start.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&path);
    (bytes / MIB) as f64 / t.as_secs_f64()
}

/// A guest holding `size_mib` of `pattern` pages; the limit drops to 64 MiB: (MiB/s of guest
/// memory out, bytes written to the file, seconds).
fn swap_out(dir: &Path, size_mib: u64, pattern: &str, compress: &str) -> (f64, u64, f64) {
    let vm = Vm::start(&[
        "--memory",
        &format!("size={}M", size_mib + 256),
        "--swap",
        &format!("limit={}M,compress={compress},dir={}", size_mib + 192, dir.display()),
        "--guest-args",
        &format!("scenario=hold size={size_mib}M seconds=600 pattern={pattern}"),
    ]);
    vm.wait_until(Duration::from_secs(60), || vm.output().contains("phase=holding"));
    std::thread::sleep(Duration::from_millis(300));
    let before = vm.api("GET", "/swap", None);
    let start = Instant::now();
    vm.api("PATCH", "/swap", Some(r#"{"limit_mib": 64}"#));
    let after = loop {
        let s = vm.api("GET", "/swap", None);
        if n(&s, "resident_bytes") + n(&s, "pool_bytes") <= 64 * MIB {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "swap-out did not finish: {s}");
        std::thread::sleep(Duration::from_millis(1));
    };
    let t = start.elapsed().as_secs_f64();
    let out = (n(&after, "pages_out") - n(&before, "pages_out")) * PAGE as u64;
    let written = n(&after, "file_written_bytes") - n(&before, "file_written_bytes");
    vm.finish();
    ((out / MIB) as f64 / t, written, t)
}

/// Raw swap-in: `pread` of a random 4 KiB page of a file on the same file system, then
/// `UFFDIO_COPY` of it into a missing page registered with userfaultfd: mean ns over `count`.
fn raw_swap_in(dir: &Path, count: usize, file_mib: u64) -> f64 {
    let pages = file_mib * MIB / PAGE as u64;
    let path = dir.join("raw-read");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("raw file");
    let mut buf = AlignedBuf::new(2 << 20);
    buf.as_mut_slice().fill(0x5a);
    for off in (0..pages * PAGE as u64).step_by(2 << 20) {
        f.write_all_at(buf.as_slice(), off).expect("write");
    }
    let uffd = Uffd::new().expect("userfaultfd");
    let len = count * PAGE;
    let area = common::anon_mapping(len);
    // SAFETY: the mapping above, alive until the munmap below; nothing touches it but COPY.
    unsafe { uffd.register(area as u64, len as u64, false) }.expect("register");
    let mut page = AlignedBuf::new(PAGE);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    for i in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.read_exact_at(page.as_mut_slice(), (x % pages) * PAGE as u64).expect("read");
        // SAFETY: `page` holds PAGE readable bytes; the destination is a missing page of the
        // registered area.
        unsafe { uffd.copy(area as u64 + (i * PAGE) as u64, page.as_slice().as_ptr(), PAGE as u64, true) }
            .expect("copy");
    }
    let mean = start.elapsed().as_nanos() as f64 / count as f64;
    // SAFETY: unmaps the area mapped above, which nothing uses any more.
    unsafe { libc::munmap(area, len) };
    let _ = std::fs::remove_file(&path);
    mean
}

/// What one `workingset` run gave.
#[derive(Debug, Default)]
struct Run {
    /// Mean of the per-second figures, summed over vCPUs (a run killed before its end still
    /// has them).
    ops_per_sec: u64,
    /// The kernel's OOM killer ended the run.
    killed: bool,
    slow: u64,
    refaults: u64,
    written: u64,
    /// The guest's access times: log2 buckets of ns, summed over vCPUs.
    latency: Vec<u64>,
}

fn workingset_guest(size_mib: u64, seconds: u64) -> String {
    format!("scenario=workingset size={size_mib}M hot=15 seconds={seconds} slow_us=20")
}

fn guest_figures(out: &str, r: &mut Run) {
    let ticks = results(out, "workingset-tick");
    let cpus: std::collections::BTreeSet<u64> = ticks.iter().map(|t| n(t, "cpu")).collect();
    for cpu in cpus {
        let mine: Vec<&Value> = ticks.iter().filter(|t| n(t, "cpu") == cpu).collect();
        r.ops_per_sec += mine.iter().map(|t| n(t, "ops_per_sec")).sum::<u64>() / mine.len() as u64;
        r.slow += mine.iter().map(|t| n(t, "slow")).sum::<u64>();
    }
    for l in results(out, "workingset-latency") {
        let counts: Vec<u64> = l["log2_ns"].as_str().unwrap_or("").split(':').filter_map(|c| c.parse().ok()).collect();
        if r.latency.len() < counts.len() {
            r.latency.resize(counts.len(), 0);
        }
        for (a, c) in r.latency.iter_mut().zip(counts) {
            *a += c;
        }
    }
}

/// The workingset under our swap, on `cpus` vCPUs.
fn ours(dir: &Path, size_mib: u64, limit_mib: u64, seconds: u64, cpus: u32, extra: &str) -> Run {
    let vm = Vm::start(&[
        "--memory",
        &format!("size={}M", size_mib + 256),
        "--cpus",
        &cpus.to_string(),
        "--swap",
        &format!("limit={limit_mib}M,dir={}{extra}", dir.display()),
        "--guest-args",
        &workingset_guest(size_mib, seconds),
    ]);
    let (out, stats) = vm.wait();
    let s = &stats["swap"];
    let mut r = Run { refaults: n(s, "refaults"), written: n(s, "file_written_bytes"), ..Run::default() };
    guest_figures(&out, &mut r);
    r
}

/// Mean single-page swap-in time (ns) of a 1-vCPU `workingset` guest: while the swapper holds
/// it under a 128 MiB limit (its writes share the disk with the reads), then after the limit
/// is lifted (the reads have the disk to themselves). One vCPU: the raw side has the CPU to
/// itself too.
fn swap_in_latency(dir: &Path, ws: u64, seconds: u64) -> (f64, f64) {
    let vm = Vm::start(&[
        "--memory",
        &format!("size={}M", ws + 256),
        "--swap",
        &format!("limit=128M,compress=off,dir={}", dir.display()),
        "--guest-args",
        &format!("scenario=workingset size={ws}M seconds={}", seconds * 2),
    ]);
    let lat = |v: &Value| {
        let l = &v["swap_in_latency"];
        (n(l, "count") as f64, n(l, "mean_ns") as f64)
    };
    std::thread::sleep(Duration::from_secs(seconds));
    let (c1, m1) = lat(&vm.api("GET", "/swap", None));
    vm.api("PATCH", "/swap", Some(&format!(r#"{{"limit_mib": {}}}"#, ws + 256)));
    std::thread::sleep(Duration::from_secs(seconds / 2));
    let (c2, m2) = lat(&vm.api("GET", "/swap", None));
    vm.finish();
    let quiet = if c2 > c1 { (m2 * c2 - m1 * c1) / (c2 - c1) } else { 0.0 };
    (m1, quiet)
}

/// What the memory cgroup gets beyond our limit, for the VMM process's own memory.
const KERNEL_SLACK_MIB: u64 = 16;
/// Times a kernel run is tried when the cgroup's OOM killer ends it.
const KERNEL_TRIES: usize = 3;

/// A kernel swap file and a memory cgroup (v1) with a limit; undone on drop.
struct KernelSwap {
    file: PathBuf,
    cgroup: PathBuf,
    zswap_was: Option<String>,
}

impl KernelSwap {
    fn new(dir: &Path, size_mib: u64, limit_mib: u64, zswap: bool) -> Option<KernelSwap> {
        let cgroup = PathBuf::from(format!("/sys/fs/cgroup/memory/vmm-swap-bench-{}", std::process::id()));
        let file = dir.join("kernel.swap");
        let ok = |c: &mut Command| c.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !ok(Command::new("fallocate").args(["-l", &format!("{}M", size_mib + 256)]).arg(&file))
            || !ok(Command::new("chmod").arg("600").arg(&file))
            || !ok(Command::new("mkswap").arg(&file))
            || !ok(Command::new("swapon").arg(&file))
        {
            eprintln!("(kernel swap anchor skipped: cannot set up a swap file; needs root)");
            let _ = std::fs::remove_file(&file);
            return None;
        }
        let zswap_was = if zswap {
            let p = "/sys/module/zswap/parameters/enabled";
            let was = std::fs::read_to_string(p).ok()?;
            std::fs::write(p, "Y").ok()?;
            Some(was.trim().to_string())
        } else {
            None
        };
        let k = KernelSwap { file, cgroup, zswap_was };
        std::fs::create_dir_all(&k.cgroup).ok()?;
        // The cgroup charges the whole VMM process; our limit counts guest RAM only, so the
        // kernel gets 16 MiB more for the VMM's own memory. Swappiness 100: anonymous memory
        // is all there is to reclaim.
        std::fs::write(k.cgroup.join("memory.limit_in_bytes"), format!("{}", (limit_mib + KERNEL_SLACK_MIB) * MIB))
            .ok()?;
        std::fs::write(k.cgroup.join("memory.swappiness"), "100").ok()?;
        Some(k)
    }

    /// The workingset with kernel demand paging inside the cgroup, tried again (up to
    /// [`KERNEL_TRIES`] times) when the OOM killer ends it: the first complete run, or the last
    /// killed one, and how many were killed.
    fn run(&self, size_mib: u64, seconds: u64) -> (Run, usize) {
        let mut kills = 0;
        loop {
            let r = self.run_once(size_mib, seconds);
            if !r.killed || kills + 1 == KERNEL_TRIES {
                let killed = usize::from(r.killed);
                return (r, kills + killed);
            }
            kills += 1;
        }
    }

    fn run_once(&self, size_mib: u64, seconds: u64) -> Run {
        let procs = self.cgroup.join("cgroup.procs");
        let before = pswpout();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
        cmd.args(["run", "--kernel"])
            .arg(common::guest_image())
            .args(["--memory", &format!("size={}M,backing=demand", size_mib + 256), "--cpus", "2", "--guest-args"])
            .arg(workingset_guest(size_mib, seconds))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and only writes a file.
        unsafe {
            cmd.pre_exec(move || {
                let mut f = std::fs::OpenOptions::new().write(true).open(&procs)?;
                f.write_all(b"0")
            });
        }
        let out = cmd.output().expect("vmm in the cgroup");
        let killed = std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(libc::SIGKILL);
        let mut r = Run { written: (pswpout() - before) * PAGE as u64, killed, ..Run::default() };
        guest_figures(&String::from_utf8_lossy(&out.stdout), &mut r);
        r
    }
}

impl Drop for KernelSwap {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(&self.file).status();
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir(&self.cgroup);
        if let Some(w) = &self.zswap_was {
            let _ = std::fs::write("/sys/module/zswap/parameters/enabled", w);
        }
    }
}

/// Pages the kernel swapped out so far.
fn pswpout() -> u64 {
    let v = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    v.lines().find_map(|l| l.strip_prefix("pswpout ")).and_then(|x| x.trim().parse().ok()).unwrap_or(0)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    common::build_guest();
    let dir = Dir::new();
    let plots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-plots");
    let _ = std::fs::create_dir_all(&plots);
    let (size, ws, seconds) = if quick { (128, 256, 3) } else { (512, 512, 10) };

    println!("swap-out: {size} MiB of guest memory, limit lowered to 64 MiB, files in {}", dir.0.display());
    let raw = raw_write(&dir.0, size * MIB);
    let (rand, rand_written, rand_t) = swap_out(&dir.0, size, "random", "off");
    let (sparse, sparse_written, sparse_t) = swap_out(&dir.0, size, "sparse", "lz4");
    println!("{:<58} {:>10} {:>12} {:>10}", "", "MiB/s", "written MiB", "vs raw");
    println!("{:<58} {raw:>10.0} {:>12} {:>9.2}x", "raw sequential O_DIRECT write, 2 MiB calls", size, 1.0);
    println!(
        "{:<58} {rand:>10.0} {:>12} {:>9.2}x",
        format!("swapper, incompressible pages ({rand_t:.2} s)"),
        rand_written / MIB,
        rand / raw
    );
    println!(
        "{:<58} {sparse:>10.0} {:>12} {:>9.2}x",
        format!("swapper, near-empty pages, lz4 ({sparse_t:.2} s)"),
        sparse_written / MIB,
        sparse / raw
    );
    println!("goal: at least 0.7x the raw write\n");

    println!("swap-in latency (random 4 KiB pages from the file; faults that read one page, 1 vCPU)");
    // A file as large as the working set swapped out below, so that neither side gets more help
    // from the disk's caches than the other.
    let raw_in = raw_swap_in(&dir.0, if quick { 2000 } else { 20000 }, ws);
    let (busy, quiet) = swap_in_latency(&dir.0, ws, seconds);
    println!("{:<62} {:>10}", "", "mean us");
    println!("{:<62} {:>10.1}", "raw pread + UFFDIO_COPY of one page", raw_in / 1e3);
    for (name, ns) in
        [("VMM, evictions writing meanwhile (under the limit)", busy), ("VMM, nothing else on the disk", quiet)]
    {
        println!("{name:<62} {:>10.1}   ({:.2}x raw)", ns / 1e3, ns / raw_in);
    }
    println!("(VMM: from the fault's message to the page installed; goal: at most 1.2x the raw mechanism)\n");

    let limit = 128;
    println!("workingset {ws} MiB (hot 15%, 30% writes, 2 vCPUs, {seconds} s) under a {limit} MiB limit");
    let clock = ours(&dir.0, ws, limit, seconds, 2, "");
    let fifo = ours(&dir.0, ws, limit, seconds, 2, ",policy=fifo");
    let kernel = KernelSwap::new(&dir.0, ws, limit, false).map(|k| k.run(ws, seconds));
    let zswap = KernelSwap::new(&dir.0, ws, limit, true).map(|k| k.run(ws, seconds));
    let mut kernel_kills = kernel.as_ref().map_or(0, |k| k.1) + zswap.as_ref().map_or(0, |k| k.1);
    let (kernel, zswap) = (kernel.map(|k| k.0), zswap.map(|k| k.0));
    // When the kernel cannot run the guest at the limit, a figure with 64 MiB more.
    let roomier = if kernel.as_ref().is_some_and(|k| k.killed) {
        KernelSwap::new(&dir.0, ws, limit + 64, false).map(|k| k.run(ws, seconds)).map(|(r, kills)| {
            kernel_kills += kills;
            r
        })
    } else {
        None
    };
    // And ours with the same room, for a like-for-like figure.
    let ours_roomier = roomier.as_ref().map(|_| ours(&dir.0, ws, limit + 64, seconds, 2, ""));
    println!("{:<44} {:>10} {:>12} {:>12} {:>14}", "", "ops/s", "slow (guest)", "refaults", "written MiB");
    let row = |name: &str, r: &Run, refaults: Option<u64>| {
        println!(
            "{name:<44} {:>10} {:>12} {:>12} {:>14}{}",
            r.ops_per_sec,
            r.slow,
            refaults.map_or("-".to_string(), |v| v.to_string()),
            r.written / MIB,
            if r.killed { "   killed by the memory cgroup's OOM killer" } else { "" }
        );
    };
    row("vmm swap, clock (accessed bits)", &clock, Some(clock.refaults));
    row("vmm swap, fifo", &fifo, Some(fifo.refaults));
    if let Some(k) = &kernel {
        row("kernel: memory cgroup + swap file", k, None);
    }
    if let Some(k) = &roomier {
        row(&format!("kernel, with 64 MiB more ({} MiB)", limit + 64), k, None);
    }
    if let Some(o) = &ours_roomier {
        row(&format!("vmm swap, clock, with 64 MiB more ({} MiB)", limit + 64), o, Some(o.refaults));
    }
    if let Some(k) = [&kernel, &roomier].into_iter().flatten().find(|k| !k.killed) {
        println!(
            "ours at {limit} MiB vs the kernel's complete run: {:.2}x the ops/s, {:.2}x the bytes written",
            clock.ops_per_sec as f64 / k.ops_per_sec.max(1) as f64,
            clock.written as f64 / k.written.max(1) as f64
        );
    }
    if let (Some(o), Some(k)) = (&ours_roomier, roomier.as_ref().filter(|k| !k.killed)) {
        println!(
            "same limit ({} MiB), ours vs the kernel's: {:.2}x the ops/s, {:.2}x the bytes written",
            limit + 64,
            o.ops_per_sec as f64 / k.ops_per_sec.max(1) as f64,
            o.written as f64 / k.written.max(1) as f64
        );
    }
    if let Some(z) = &zswap {
        row("kernel: memory cgroup + zswap + swap file", z, None);
    }
    if kernel.is_some() {
        println!(
            "the memory cgroup's OOM killer ended {kernel_kills} of the kernel's runs (each tried up to {KERNEL_TRIES} times)"
        );
    }
    println!(
        "clock vs fifo: {:.2}x fewer refaults, {:.2}x fewer slow guest accesses\n",
        fifo.refaults as f64 / clock.refaults.max(1) as f64,
        fifo.slow as f64 / clock.slow.max(1) as f64
    );

    let rss = rss_under_changing_limit(&dir.0, quick);
    plot_rss(&plots.join("swap-rss.svg"), &rss);
    let mut series = vec![("vmm swap (clock)", clock.latency.clone())];
    if let Some(k) = &kernel {
        series.push(("kernel swap (memory cgroup)", k.latency.clone()));
    }
    plot_latency(&plots.join("swap-latency.svg"), &series);
    println!("plots: {} and {}", plots.join("swap-rss.svg").display(), plots.join("swap-latency.svg").display());
}

/// The VMM's RSS every 100 ms while the limit steps 512 -> 128 -> 256 -> 96 MiB: (seconds,
/// RSS MiB, limit MiB).
fn rss_under_changing_limit(dir: &Path, quick: bool) -> Vec<(f64, f64, f64)> {
    let step = if quick { 2.0 } else { 4.0 };
    let vm = Vm::start(&[
        "--memory",
        "size=1G",
        "--cpus",
        "2",
        "--swap",
        &format!("limit=512M,dir={}", dir.display()),
        "--guest-args",
        &format!("scenario=workingset size=448M seconds={}", (step * 4.0) as u64),
    ]);
    let limits = [512.0, 128.0, 256.0, 96.0];
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut current = 0;
    while vm.child.id() != 0 && start.elapsed().as_secs_f64() < step * 4.0 {
        let t = start.elapsed().as_secs_f64();
        let k = ((t / step) as usize).min(3);
        if k != current {
            current = k;
            vm.api("PATCH", "/swap", Some(&format!(r#"{{"limit_mib": {}}}"#, limits[k] as u64)));
        }
        samples.push((t, vm.rss_mib() as f64, limits[current]));
        std::thread::sleep(Duration::from_millis(100));
    }
    vm.wait();
    samples
}

fn plot_rss(path: &Path, samples: &[(f64, f64, f64)]) {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    let _ = root.fill(&WHITE);
    let t_max = samples.last().map_or(1.0, |s| s.0);
    let y_max = samples.iter().map(|s| s.1.max(s.2)).fold(0.0, f64::max) * 1.15;
    let Ok(mut chart) = ChartBuilder::on(&root)
        .caption("VMM RSS under a changing swap limit (workingset, 448 MiB, 2 vCPUs)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
    else {
        return;
    };
    let _ = chart.configure_mesh().x_desc("seconds").y_desc("MiB").draw();
    let _ = chart
        .draw_series(LineSeries::new(samples.iter().map(|s| (s.0, s.2)), RED.stroke_width(2)))
        .map(|s| s.label("limit").legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED)));
    let _ = chart
        .draw_series(LineSeries::new(samples.iter().map(|s| (s.0, s.1)), BLUE.stroke_width(2)))
        .map(|s| s.label("VMM RSS").legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE)));
    let _ = chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw();
    let _ = root.present();
}

fn plot_latency(path: &Path, series: &[(&str, Vec<u64>)]) {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    let _ = root.fill(&WHITE);
    // Buckets 8 (256 ns) to 27 (~134 ms), as shares of each series' accesses.
    let (lo, hi) = (8usize, 28usize);
    let shares: Vec<Vec<f64>> = series
        .iter()
        .map(|(_, c)| {
            let total = c.iter().sum::<u64>().max(1) as f64;
            (lo..hi).map(|b| c.get(b).copied().unwrap_or(0) as f64 * 100.0 / total).collect()
        })
        .collect();
    let y_max = shares.iter().flatten().copied().fold(0.0, f64::max).max(1.0) * 1.1;
    let Ok(mut chart) = ChartBuilder::on(&root)
        .caption("Guest access time (workingset), share of accesses per log2 bucket", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(lo as f64..hi as f64, (0.01..y_max).log_scale())
    else {
        return;
    };
    let _ = chart
        .configure_mesh()
        .x_desc("access time (log2 ns bucket: 10 = 1 us, 20 = 1 ms)")
        .y_desc("% of accesses")
        .draw();
    for (k, ((name, _), s)) in series.iter().zip(&shares).enumerate() {
        let color = Palette99::pick(k * 3).to_rgba();
        let _ = chart
            .draw_series(LineSeries::new(
                s.iter().enumerate().map(|(i, &v)| ((lo + i) as f64 + 0.5, v.max(0.01))),
                color.stroke_width(2),
            ))
            .map(|s| s.label(*name).legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color)));
    }
    let _ = chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw();
    let _ = root.present();
}
