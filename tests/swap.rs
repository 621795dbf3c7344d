//! Host-side swap end to end: real KVM, real userfaultfd, real files and file systems, guests
//! that check every page they wrote.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::vm::{Vm, n, results, rss_kib, wait_for};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A fresh empty directory for a swap file.
fn swap_dir(name: &str) -> PathBuf {
    let d = common::scratch(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

/// Every vCPU's final `workingset` result verified every page.
fn assert_workingset_verified(stdout: &str, cpus: usize) {
    let finals = results(stdout, "workingset");
    assert_eq!(finals.len(), cpus, "{stdout}");
    for r in &finals {
        assert_eq!(n(r, "errors"), 0, "{r}");
        assert_eq!(n(r, "verified_pages"), n(r, "pages"), "{r}");
    }
}

/// The VMM's RSS sampled every 100 ms from outside until `vm` exits: (samples, peak KiB).
fn sample_rss_until_exit(vm: &Vm) -> (usize, u64) {
    let pid = vm.pid();
    let (mut samples, mut peak) = (0, 0);
    while std::fs::metadata(format!("/proc/{pid}")).is_ok() && !is_zombie(pid) {
        peak = peak.max(rss_kib(pid));
        samples += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    (samples, peak)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |s| s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
}

#[test]
fn a_working_set_six_times_the_limit_runs_verified_under_the_limit() {
    let dir = swap_dir("swap-ws");
    let limit = 128 * MIB;
    let vm = Vm::start(&[
        "--memory",
        "size=1G",
        "--cpus",
        "2",
        "--swap",
        &format!("limit=128M,dir={}", dir.display()),
        "--guest-args",
        "scenario=workingset size=768M seconds=8",
    ]);
    // The swap file has no name while the VM runs.
    wait_for("the guest running", Duration::from_secs(30), || vm.output().contains("workingset-tick"));
    assert!(entries(&dir).is_empty(), "the swap file is visible: {:?}", entries(&dir));
    let (samples, peak) = sample_rss_until_exit(&vm);
    let e = vm.wait(Duration::from_secs(60));
    assert_eq!(e.code, 0, "{}", e.stderr);
    assert_workingset_verified(&e.stdout, 2);
    assert!(samples > 50, "{samples} RSS samples");
    assert!(peak * 1024 <= limit + 64 * MIB, "peak RSS {} MiB over the 128 MiB limit + 64 MiB", peak / 1024);
    let s = &e.stats["swap"];
    assert!(n(s, "pages_out") > 100_000 && n(s, "pages_in") > 10_000, "{s}");
    assert_eq!((n(s, "io_errors"), n(s, "enospc")), (0, 0), "{s}");
    assert!(entries(&dir).is_empty(), "left behind: {:?}", entries(&dir));
    eprintln!("peak RSS {} MiB; swap: {s}", peak / 1024);
}

#[test]
fn the_swap_file_is_gone_however_the_vmm_ends() {
    for signal in [None, Some(libc::SIGTERM), Some(libc::SIGKILL)] {
        let dir = swap_dir("swap-gone");
        let vm = Vm::start(&[
            "--memory",
            "size=512M",
            "--swap",
            &format!("limit=64M,dir={}", dir.display()),
            "--guest-args",
            "scenario=workingset size=256M seconds=3",
        ]);
        wait_for("pages to go out", Duration::from_secs(30), || {
            let (_, v) = vm.api("GET", "/swap", None);
            v["pages_out"].as_u64().unwrap_or(0) > 1000
        });
        assert!(entries(&dir).is_empty(), "{signal:?}: visible: {:?}", entries(&dir));
        if let Some(sig) = signal {
            // SAFETY: kill(2) on our own child's pid.
            assert_eq!(unsafe { libc::kill(libc::pid_t::try_from(vm.pid()).unwrap(), sig) }, 0);
        }
        let e = vm.wait(Duration::from_secs(30));
        match signal {
            None => assert_eq!(e.code, 0, "{}", e.stderr),
            // The guest re-checks every page when asked to finish; the VMM may stop it first.
            Some(libc::SIGTERM) => {
                assert!([0, i32::from(vmm::exit_code::STOPPED)].contains(&e.code), "{}", e.stderr);
            }
            _ => assert_eq!(e.code, -1, "killed"),
        }
        assert!(entries(&dir).is_empty(), "{signal:?}: left behind: {:?}", entries(&dir));
        std::fs::remove_dir(&dir).unwrap();
    }
}

#[test]
fn the_limit_follows_patch_swap_while_the_guest_runs() {
    let dir = swap_dir("swap-patch");
    let vm = Vm::start(&[
        "--memory",
        "size=1G",
        "--cpus",
        "2",
        "--swap",
        &format!("limit=512M,dir={}", dir.display()),
        "--guest-args",
        "scenario=workingset size=384M seconds=12",
    ]);
    let pid = vm.pid();
    wait_for("the working set resident", Duration::from_secs(30), || rss_kib(pid) > 300 * 1024);
    let (code, _) = vm.api("PATCH", "/swap", Some(r#"{"limit_mib": 96}"#));
    assert_eq!(code, 204);
    wait_for("RSS down near 96 MiB", Duration::from_secs(10), || rss_kib(pid) < (96 + 48) * 1024);
    let (_, v) = vm.api("GET", "/swap", None);
    assert_eq!(n(&v, "limit_mib"), 96, "{v}");
    assert!(n(&v, "pages_out") > 30_000, "{v}");
    // Bad requests change nothing.
    for (body, want) in
        [(r#"{"limit_mib": 1}"#, "below the least"), (r#"{"limit": 5}"#, "unknown field"), ("{}", "nothing to change")]
    {
        let (code, v) = vm.api("PATCH", "/swap", Some(body));
        assert_eq!(code, 400, "{body}: {v}");
        assert!(v["fault_message"].as_str().unwrap().contains(want), "{body}: {v}");
    }
    // Raised again, with everything brought back in: RSS grows back.
    let (code, _) = vm.api("PATCH", "/swap", Some(r#"{"limit_mib": 768}"#));
    assert_eq!(code, 204);
    let (code, _) = vm.api("PUT", "/swap/in", None);
    assert_eq!(code, 204);
    wait_for("RSS back up", Duration::from_secs(20), || rss_kib(pid) > 300 * 1024);
    let e = vm.wait(Duration::from_secs(60));
    assert_eq!(e.code, 0, "{}", e.stderr);
    assert_workingset_verified(&e.stdout, 2);
}

#[test]
fn swap_out_evicts_cold_pages_now_and_swap_is_off_without_the_flag() {
    let dir = swap_dir("swap-out");
    let vm = Vm::start(&[
        "--memory",
        "size=512M",
        "--swap",
        &format!("limit=400M,dir={}", dir.display()),
        "--guest-args",
        "scenario=hold size=200M seconds=6",
    ]);
    let pid = vm.pid();
    wait_for("the guest holding its memory", Duration::from_secs(30), || vm.output().contains("phase=holding"));
    let before = rss_kib(pid);
    // Within the limit nothing goes out by itself; two passes of the hand: the first clears
    // the accessed bits the fill set, the second evicts what stayed untouched.
    let (_, v) = vm.api("GET", "/swap", None);
    assert_eq!(n(&v, "pages_out"), 0, "{v}");
    for _ in 0..2 {
        assert_eq!(vm.api("PUT", "/swap/out", None).0, 204);
        wait_for("the sweep", Duration::from_secs(20), || vm.api("GET", "/swap", None).1["sweep_requested"] == false);
    }
    let after = rss_kib(pid);
    assert!(after + 150 * 1024 < before, "RSS {before} -> {after} KiB");
    let e = vm.wait(Duration::from_secs(30));
    assert_eq!(e.code, 0, "{}", e.stderr);
    let done = results(&e.stdout, "hold").into_iter().find(|r| r["phase"] == "done").unwrap();
    assert_eq!(n(&done, "intact"), 1, "{done}");

    // Without --swap the endpoints say so.
    let vm = Vm::start(&["--guest-args", "scenario=spin seconds=2"]);
    let (code, v) = vm.api("GET", "/swap", None);
    assert_eq!((code, &v["enabled"]), (200, &Value::Bool(false)));
    for (m, p) in [("PATCH", "/swap"), ("PUT", "/swap/out"), ("PUT", "/swap/in")] {
        let (code, v) = vm.api(m, p, if m == "PATCH" { Some(r#"{"limit_mib": 64}"#) } else { None });
        assert_eq!(code, 400, "{m} {p}");
        assert!(v["fault_message"].as_str().unwrap().contains("swap is off"), "{v}");
    }
    assert_eq!(vm.wait(Duration::from_secs(20)).code, 0);
}

/// Asks for a sweep (`PUT /swap/out`) every 20 ms until the returned flag is set.
fn keep_sweeping(vm: &Vm) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (socket, flag) = (vm.socket.clone(), Arc::clone(&stop));
    let t = std::thread::spawn(move || {
        let mut sweeps = 0;
        while !flag.load(Ordering::Relaxed) {
            if matches!(vmm::api::client::request(&socket, "PUT", "/swap/out", None), Ok((204, _))) {
                sweeps += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        sweeps
    });
    (stop, t)
}

#[test]
fn page_table_races_and_the_cache_stay_exact_with_swap_active() {
    // The randomized map/move/protect/free test, every vCPU checking every page each round,
    // while a blind (fifo) hand sweeps every resident page out again and again: evictions race
    // with every kind of leaf change.
    let dir = swap_dir("swap-race");
    let vm = Vm::start(&[
        "--memory",
        "size=512M",
        "--cpus",
        "2",
        "--swap",
        &format!("limit=256M,policy=fifo,dir={}", dir.display()),
        "--guest-args",
        "scenario=ptstress rounds=300",
    ]);
    let (stop, sweeper) = keep_sweeping(&vm);
    let e = vm.wait(Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    let sweeps = sweeper.join().unwrap();
    assert_eq!(e.code, 0, "{}", e.stderr);
    let r = results(&e.stdout, "ptstress");
    assert_eq!(r.len(), 2, "{}", e.stdout);
    assert!(r.iter().all(|r| n(r, "stale") == 0 && n(r, "errors") == 0), "{r:?}");
    let s = &e.stats["swap"];
    assert!(sweeps > 5 && n(s, "pages_out") > 500 && n(s, "pages_in") > 100, "{sweeps} sweeps; {s}");

    // The cache, its hits checked against checksums, under a limit a fifth of what it fills.
    let swap = format!("limit=96M,dir={}", dir.display());
    let r = common::run(&[
        "--memory",
        "size=512M",
        "--cpus",
        "2",
        "--swap",
        &swap,
        "--guest-args",
        "scenario=cache seconds=6",
    ]);
    r.assert_ok();
    let finals = results(&r.stdout, "cache");
    assert_eq!(finals.len(), 2, "{}", r.stdout);
    assert!(finals.iter().all(|f| n(f, "errors") == 0), "{finals:?}");
    assert!(n(&r.stats.as_ref().unwrap()["swap"], "pages_in") > 0);
}

#[test]
fn the_stress_job_and_lazy_regions_on_two_nodes_with_a_balloon_while_everything_is_swapped_out() {
    // Huge allocations, slabs, every allocator workload, and MAP_LAZY regions on two NUMA nodes
    // with a balloon, while a blind hand keeps sweeping every resident page out; the guest
    // checks all its data and the VMM its invariants at exit.
    let dir = swap_dir("swap-stress");
    for guest in ["scenario=stress", "scenario=lazy"] {
        let vm = Vm::start(&[
            "--numa",
            "node=0,size=256M,cpus=0",
            "--numa",
            "node=1,size=256M,cpus=1",
            "--balloon",
            "size=64M",
            "--swap",
            &format!("limit=256M,policy=fifo,dir={}", dir.display()),
            "-v",
            "--guest-args",
            guest,
        ]);
        let (stop, sweeper) = keep_sweeping(&vm);
        // Everything swept out every 50 ms: the guest crawls (the unoptimised test build serves
        // each refault slowly), but must finish exact.
        let e = vm.wait(Duration::from_secs(240));
        stop.store(true, Ordering::Relaxed);
        sweeper.join().unwrap();
        assert_eq!(e.code, 0, "{guest}: {}", e.stderr);
        assert_eq!(e.stats["memory"]["invariants"], "ok", "{guest}: {}", e.stats["memory"]["invariants"]);
        assert!(
            n(&e.stats["swap"], "pages_out") > 0 && n(&e.stats["swap"], "pages_in") > 0,
            "{guest}: {}",
            e.stats["swap"]
        );
    }
}

/// A loop-mounted ext4 file system of `mib` MiB, unmounted and detached on drop.
struct LoopFs {
    image: PathBuf,
    mount: PathBuf,
    dev: String,
}

impl LoopFs {
    fn new(name: &str, mib: u64) -> Option<LoopFs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: loop mounts need root");
            return None;
        }
        let image = common::scratch(&format!("{name}.img"));
        let mount = common::scratch(name);
        std::fs::create_dir_all(&mount).unwrap();
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        std::fs::File::create(&image).unwrap().set_len(mib * MIB).unwrap();
        if !ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image)) {
            eprintln!("skipping: mkfs.ext4 failed");
            return None;
        }
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&image).output().ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || dev.is_empty() {
            eprintln!("skipping: losetup failed");
            return None;
        }
        let fs = LoopFs { image, mount, dev };
        if !ok(Command::new("mount").arg(&fs.dev).arg(&fs.mount)) {
            eprintln!("skipping: mount failed");
            return None;
        }
        Some(fs)
    }

    /// Makes every further read and write of the device past its first MiB fail with EIO, at
    /// once: the loop device's size limit drops to 1 MiB under the mounted file system
    /// (`LOOP_SET_STATUS64`), so its blocks past that are beyond the device's end. (Shrinking
    /// the backing file instead would let reads see zeros until the capacity is updated.)
    fn break_device(&self) {
        const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
        const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
        // `struct loop_info64`: 232 bytes, `lo_sizelimit` at offset 32.
        let mut info = [0u8; 232];
        let dev = std::fs::File::open(&self.dev).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&dev);
        // SAFETY: LOOP_GET_STATUS64 writes one loop_info64 (232 bytes) into `info`.
        assert_eq!(unsafe { libc::ioctl(fd, LOOP_GET_STATUS64, info.as_mut_ptr()) }, 0);
        info[32..40].copy_from_slice(&MIB.to_ne_bytes());
        // SAFETY: LOOP_SET_STATUS64 reads one loop_info64 from `info`.
        let rc = unsafe { libc::ioctl(fd, LOOP_SET_STATUS64, info.as_ptr()) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.image);
        let _ = std::fs::remove_dir(&self.mount);
    }
}

#[test]
fn a_full_file_system_stops_evictions_and_the_guest_runs_on() {
    let Some(fs) = LoopFs::new("swap-small", 24) else { return };
    let swap = format!("limit=64M,dir={},compress=off", fs.mount.display());
    let r = common::run(&[
        "--memory",
        "size=512M",
        "--swap",
        &swap,
        "--guest-args",
        "scenario=workingset size=192M seconds=4 compress=0",
    ]);
    r.assert_ok();
    assert_workingset_verified(&r.stdout, 1);
    let s = &r.stats.as_ref().unwrap()["swap"];
    assert!(n(s, "enospc") > 0 && s["file_full"] == true, "{s}");
    assert_eq!(n(s, "io_errors"), 0, "{s}");
    assert!(n(s, "limit_not_met") > 0 && r.stderr.contains("(not met "), "{}", r.stderr);
}

#[test]
fn write_errors_keep_pages_resident_and_a_read_error_stops_the_vm_naming_the_page() {
    // Writes fail from the start: nothing goes out, nothing is lost, the guest finishes.
    let Some(fs) = LoopFs::new("swap-eio-w", 64) else { return };
    fs.break_device();
    let swap = format!("limit=64M,dir={},compress=off", fs.mount.display());
    let r = common::run(&[
        "--memory",
        "size=512M",
        "--swap",
        &swap,
        "--guest-args",
        "scenario=workingset size=128M seconds=2 compress=0",
    ]);
    r.assert_ok();
    assert_workingset_verified(&r.stdout, 1);
    let s = &r.stats.as_ref().unwrap()["swap"];
    assert!(n(s, "io_errors") > 0 && n(s, "put_back") > 0, "{s}");
    drop(fs);

    // Pages go out, then the device fails: the next read of one stops the VM with the page's
    // guest-physical address; the guest never sees zeros in place of its data.
    let Some(fs) = LoopFs::new("swap-eio-r", 512) else { return };
    let vm = Vm::start(&[
        "--memory",
        "size=512M",
        "--swap",
        &format!("limit=64M,dir={},compress=off", fs.mount.display()),
        "--guest-args",
        "scenario=workingset size=192M seconds=20 compress=0",
    ]);
    wait_for("pages in the file", Duration::from_secs(30), || {
        vm.api("GET", "/swap", None).1["file_pages"].as_u64().unwrap_or(0) > 10_000
    });
    fs.break_device();
    let start = Instant::now();
    let e = vm.wait(Duration::from_secs(30));
    assert!(start.elapsed() < Duration::from_secs(15), "stopped at once");
    assert_eq!(e.code, i32::from(vmm::exit_code::IO), "{}", e.stderr);
    let lines: Vec<&str> = e.stderr.lines().filter(|l| l.starts_with("vmm: error:")).collect();
    assert_eq!(lines.len(), 1, "{}", e.stderr);
    assert!(lines[0].contains("cannot read guest-physical page 0x"), "{}", lines[0]);
    assert!(!e.stdout.contains("error=mismatch"), "the guest saw wrong data: {}", e.stdout);
    eprintln!("{}", lines[0]);
}

#[test]
fn bad_swap_options_get_one_line() {
    for (arg, want) in [
        ("limit=1M", "below the least"),
        ("dir=/tmp", "limit is missing"),
        ("limit=64M,compress=zstd", "compress `zstd`"),
        ("limit=64M,dir=/nonexistent/swap", "cannot create a swap file in /nonexistent/swap"),
    ] {
        common::run(&["--swap", arg]).assert_error(i32::from(vmm::exit_code::USAGE), want);
    }
    common::run(&["--memory", "backing=demand", "--swap", "limit=64M"])
        .assert_error(i32::from(vmm::exit_code::USAGE), "cannot be used with --memory backing=demand");
}
