//! A hostile or careless guest cannot hurt the host: its own races never stop the VM, its calls
//! cannot grow the VMM without bound, it cannot pass for the VMM's own failures, and writable
//! memory is never executable. Every test runs a real guest on real KVM with userfaultfd.

mod common;

use common::run;
use serde_json::Value;

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("`{key}` missing from {v}"))
}

#[test]
fn guest_races_between_access_and_free_end_in_data_or_a_fault_never_a_vm_stop() {
    let mut free_frame_faults = 0;
    for huge in [0, 1] {
        let args = format!("scenario=race huge={huge} rounds=2000 seed={}", 40 + huge);
        // Every fault through userfaultfd (as with swap on), so that the VMM sees the races.
        let r = run(&["-v", "--cpus", "2", "--memory", "size=512M,backing=uffd", "--guest-args", &args]);
        r.assert_ok();
        let xs: Vec<Value> = r.results().into_iter().filter(|x| x["scenario"] == "race").collect();
        assert_eq!(xs.len(), 2, "{}", r.stdout);
        for x in &xs {
            assert_eq!(n(x, "violations"), 0, "{x}");
        }
        let mutator = xs.iter().find(|x| x["cpu"] == 0).unwrap();
        let toucher = xs.iter().find(|x| x["cpu"] == 1).unwrap();
        assert_eq!(n(mutator, "rounds"), 2000);
        // The toucher really raced: it saw data and it saw faults.
        assert!(n(toucher, "reads") > 1000 && n(toucher, "faults") > 1000, "{toucher}");
        let stats = r.stats.as_ref().unwrap();
        assert_eq!(stats["memory"]["invariants"], "ok");
        free_frame_faults += n(&stats["faults"], "free_frame");
    }
    // Some second-level faults arrived after their frame was freed: the race the VMM must
    // serve without stopping happened.
    assert!(free_frame_faults > 0, "no fault raced with a free");
}

#[test]
fn a_guest_cannot_pass_for_the_vmms_own_failures() {
    for status in [0, 5, 63] {
        let r = run(&["--guest-args", &format!("scenario=exit status={status}")]);
        assert_eq!(r.code, status, "{}", r.stderr);
        assert!(!r.stderr.contains("error"), "{}", r.stderr);
    }
    // 64-74 are the VMM's own codes (73: "the guest touched memory it was never given"), and
    // anything above 63 is outside the guest's range: one error line, the protocol code.
    for status in [64, 73, 255, 256, 70000] {
        let r = run(&["--guest-args", &format!("scenario=exit status={status}")]);
        assert_eq!(r.code, i32::from(vmm::exit_code::GUEST_PROTOCOL), "{}", r.stderr);
        // The usual two-line report, then exactly one error line.
        let errors: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("vmm: error: ")).collect();
        assert_eq!(errors.len(), 1, "{}", r.stderr);
        assert!(errors[0].contains(&format!("the guest exited with status {status}, outside its range 0-63")));
        assert!(r.stderr.trim_end().ends_with(errors[0]) && !r.stderr.contains("panicked"), "{}", r.stderr);
        let exit = &r.stats.as_ref().unwrap()["exit"];
        assert_eq!(exit["code"], u64::from(vmm::exit_code::GUEST_PROTOCOL), "{exit}");
    }
}

#[test]
fn writable_memory_is_never_executable() {
    // The guest's calls: ALLOC/MAP_LAZY with EXEC and PROTECT(WRITE|EXEC) are refused, reserved
    // arguments must be zero, and code written then made read+exec runs and refuses writes.
    let r = run(&["-v", "--guest-args", "scenario=badcalls"]);
    r.assert_ok();
    let x = r.result("scenario", "badcalls").expect("result");
    assert_eq!(n(&x, "failures"), 0, "{}", r.stdout);
    // An image whose segment is writable and executable is refused before anything runs.
    let mut elf = std::fs::read(common::guest_image()).unwrap();
    let phoff = usize::try_from(u64::from_le_bytes(elf[32..40].try_into().unwrap())).unwrap();
    // The first program header's p_flags: read, write, execute.
    elf[phoff + 4..phoff + 8].copy_from_slice(&7u32.to_le_bytes());
    let path = common::scratch("wx.elf");
    std::fs::write(&path, &elf).unwrap();
    run(&["--kernel", path.to_str().unwrap()])
        .assert_error(i32::from(vmm::exit_code::BAD_IMAGE), "writable and executable (W^X)");
    let _ = std::fs::remove_file(path);
}

/// The documented bound on the VMM's own memory (README, "Bounded VMM memory"), in KiB, for a
/// guest of `ram` bytes holding `objects` slab objects of `size` bytes.
fn own_memory_bound_kib(ram: u64, objects: u64) -> u64 {
    8 * 1024 + 4 * 1024 * ram / (1 << 30) + objects / 8 / 1024
}

#[test]
fn a_hostile_guest_cannot_grow_the_vmm_beyond_its_bound_and_frees_give_it_back() {
    for (mem, ram) in [("256M", 256u64 << 20), ("1G", 1 << 30)] {
        let r = run(&["--memory", &format!("size={mem}"), "--guest-args", "scenario=hog lines=100000 objects=1048576"]);
        r.assert_ok();
        let phase = |p: &str| {
            r.results()
                .into_iter()
                .find(|x| x["scenario"] == "hog" && x["phase"] == p)
                .unwrap_or_else(|| panic!("no hog phase {p}: {}", r.stdout))
        };
        let base = n(&phase("base"), "own_kib");
        let bound = own_memory_bound_kib(ram, 1 << 20);
        for p in ["lazy", "protect", "alloc", "results", "slab"] {
            let x = phase(p);
            assert!(n(&x, "own_kib") <= bound, "{mem}: phase {p} holds {} KiB, bound {bound} KiB", n(&x, "own_kib"));
            if x.get("after_kib").is_some() {
                // What the guest freed, the VMM gave back (within a little heap slack).
                assert!(n(&x, "after_kib") <= base + 1024, "{mem}: after {p}: {x}, base {base} KiB");
            }
        }
        // Regions that cost no guest memory ran into the region limit, not the host's memory.
        let limit = vmm::memory::space::region_limit(ram) as u64;
        let lazy = phase("lazy");
        assert_eq!(n(&lazy, "enomem"), 1, "{lazy}");
        assert!(n(&lazy, "regions") + 8 >= limit && n(&lazy, "regions") <= limit, "{lazy} vs limit {limit}");
        assert_eq!(n(&phase("alloc"), "enomem"), 1);
        assert_eq!(n(&phase("protect"), "ok"), n(&phase("protect"), "calls"));
        assert_eq!(n(&phase("end"), "ok"), 1);
        // The flood of result lines: the newest kept, the rest counted.
        let stats = r.stats.as_ref().unwrap();
        let kept = r.results().iter().filter(|x| x["scenario"] == "hog-flood").count() as u64;
        assert_eq!(kept, vmm::console::KEEP_PER_SCENARIO as u64);
        assert_eq!(n(&stats["guest"]["results_dropped"], "hog-flood"), 100_000 - kept);
    }
}

/// Starts `vmm` with `args` and a stats file, lets it run a moment, sends `signal`, and returns
/// its exit code, stderr and stats.
fn stop_with(signal: libc::c_int, args: &[&str]) -> (i32, String, Value) {
    let stats = common::scratch("stop-stats.json");
    let mut all = args.to_vec();
    all.extend(["--stats-file", stats.to_str().unwrap()]);
    let child = common::spawn(&all);
    std::thread::sleep(std::time::Duration::from_millis(700));
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    let sent = std::time::Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    let out = child.wait_with_output().unwrap();
    assert!(sent.elapsed() < std::time::Duration::from_secs(5), "the stop took {:?}", sent.elapsed());
    let stats: Value = serde_json::from_str(&std::fs::read_to_string(&stats).expect("stats written")).unwrap();
    let _ = std::fs::remove_file(common::scratch("stop-stats.json"));
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned(), stats)
}

#[test]
fn sigterm_and_sigint_stop_the_vm_cleanly_with_the_stats_written() {
    // Busy vCPUs that never exit, and vCPUs in the middle of memory calls and faults.
    for (signal, name, guest) in [
        (libc::SIGTERM, "SIGTERM", "scenario=spin"),
        (libc::SIGINT, "SIGINT", "scenario=race rounds=100000000"),
        (libc::SIGTERM, "SIGTERM", "scenario=churn ops=100000000"),
    ] {
        let (code, stderr, stats) = stop_with(signal, &["--cpus", "2", "-v", "--guest-args", guest]);
        assert_eq!(code, i32::from(vmm::exit_code::STOPPED), "{guest}: {stderr}");
        assert!(stderr.contains(&format!("vmm: stopped by {name} before the guest finished")), "{stderr}");
        assert!(!stderr.contains("did not stop") && !stderr.contains("panicked"), "{stderr}");
        assert_eq!(stats["exit"]["code"], u64::from(vmm::exit_code::STOPPED));
        assert_eq!(stats["exit"]["error"], format!("stopped by {name} before the guest finished"));
        // The vCPUs were out of KVM_RUN when the allocator was checked.
        assert_eq!(stats["memory"]["invariants"], "ok", "{guest}");
    }
}

#[test]
fn every_vmm_thread_runs_under_seccomp_and_a_forbidden_call_stops_the_vmm() {
    // The whole suite runs with the filters on (the default); here each kind of thread makes a
    // call its filter forbids.
    for kind in ["main", "vcpu", "fault", "signals", "api", "swapper", "ticker", "rings"] {
        let socket = common::scratch("seccomp.sock");
        let out = std::process::Command::new(common::vmm_bin())
            .args(["run", "--kernel"])
            .arg(common::guest_image())
            .args(["--guest-args", "scenario=spin seconds=3", "--swap", "limit=64M", "--api-socket"])
            .arg(&socket)
            .env("VMM_SECCOMP_SELFTEST", kind)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(i32::from(vmm::exit_code::SECCOMP)), "{kind}: {stderr}");
        let name = match kind {
            "vcpu" => "vCPU",
            "fault" => "fault handler",
            "api" => "API",
            "rings" => "slab rings",
            k => k,
        };
        assert_eq!(
            stderr.trim_end(),
            format!(
                "vmm: error: seccomp: the {name} thread made a forbidden system call, 41 (socket); the VMM stops \
                 (--seccomp=off disables the filters)"
            )
        );
    }
    // With the filters off, the same call goes through and the guest finishes.
    let out = std::process::Command::new(common::vmm_bin())
        .args(["run", "--seccomp", "off", "--kernel"])
        .arg(common::guest_image())
        .args(["--guest-args", "scenario=spin seconds=1"])
        .env("VMM_SECCOMP_SELFTEST", "vcpu")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    run(&["--seccomp", "maybe"])
        .assert_error(i32::from(vmm::exit_code::USAGE), "--seccomp `maybe` is not `on` or `off`");
}
