//! Boot tests: real KVM, the real guest, checked through the guest's own output and the stats.

mod common;

use common::{run, scratch};

#[test]
fn boots_with_one_and_two_vcpus() {
    for cpus in ["1", "2"] {
        let r = run(&["--cpus", cpus, "--guest-args", "scenario=boot"]);
        r.assert_ok();
        let boot = r.result("scenario", "boot").expect("boot result line");
        assert_eq!(boot["vcpus"].as_u64().unwrap().to_string(), cpus);
        for c in 0..cpus.parse::<u32>().unwrap() {
            assert!(r.stdout.contains(&format!("cpu {c} (node 0) is up")), "{}", r.stdout);
        }
        if cpus == "2" {
            assert!(r.stdout.lines().all(|l| l.starts_with("[cpu")), "untagged output: {}", r.stdout);
        }
    }
}

/// A `Cpus_allowed_list` (`0-2,5`) as CPU ids: `--numa cpus=`'s form, with commas.
fn cpu_list(s: &str) -> Vec<u32> {
    vmm::config::parse_cpu_list(&s.trim().replace(',', ":")).expect("a CPU list")
}

/// The CPUs `/proc/<pid>/task/<tid>/status` (or `/proc/self/status`) lets the thread run on.
fn allowed(status: &str) -> Option<Vec<u32>> {
    let text = std::fs::read_to_string(status).ok()?;
    text.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(cpu_list)
}

#[test]
fn vcpus_and_the_ring_service_run_where_the_affinity_puts_them() {
    let host = allowed("/proc/self/status").expect("own affinity");
    let last = *host.last().unwrap();
    // vCPU 0 on the last CPU this test may use; the rings' service on the others (if any).
    let spec = format!("boot=1,affinity=[0@[{last}]]");
    let mut child = common::spawn(&["--cpus", &spec, "--guest-args", "scenario=churn ops=4000000 seed=5"]);
    let pid = child.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let rest: Vec<u32> = host.iter().copied().filter(|&c| c != last).collect();
    // One CPU: the service is not pinned.
    let want_rings = if rest.is_empty() { host.clone() } else { rest };
    // Each thread pins itself as it starts: look until both are as wanted (or the VM ends).
    let (mut vcpu, mut rings) = (None, None);
    while (vcpu.as_ref() != Some(&vec![last]) || rings.as_ref() != Some(&want_rings))
        && std::time::Instant::now() < deadline
        && child.try_wait().expect("vmm status").is_none()
    {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let dir = t.path();
                let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
                let cpus = allowed(&dir.join("status").to_string_lossy());
                match comm.trim() {
                    "vcpu0" if cpus.is_some() => vcpu = cpus,
                    "rings" if cpus.is_some() => rings = cpus,
                    _ => {}
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = child.wait().expect("vmm ends");
    assert!(status.success(), "vmm failed: {status:?}");
    assert_eq!(vcpu, Some(vec![last]), "vCPU 0's thread");
    assert_eq!(rings, Some(want_rings), "the service runs on the CPUs no vCPU has");
    // Without affinity nothing is pinned (the default).
    let r = run(&["--cpus", "boot=1", "--guest-args", "scenario=boot"]);
    r.assert_ok();
    assert_eq!(r.stats.as_ref().unwrap()["config"]["affinity"], "off");
}

#[test]
fn boots_with_256m_2g_and_64g() {
    for size in ["256M", "2G", "64G"] {
        let r = run(&["--memory", &format!("size={size}"), "--cpus", "2", "--guest-args", "scenario=boot"]);
        r.assert_ok();
        let stats = r.stats.as_ref().expect("stats");
        let bytes: u64 = match size {
            "256M" => 256 << 20,
            "2G" => 2 << 30,
            _ => 64 << 30,
        };
        assert_eq!(stats["config"]["memory"].as_u64(), Some(bytes));
        let total: u64 =
            stats["memory"]["nodes"].as_array().unwrap().iter().map(|n| n["frames_total"].as_u64().unwrap()).sum();
        assert_eq!(total * 4096, bytes, "every frame is managed");
        if size == "64G" {
            let hwm = stats["host"]["vm_hwm_kib"].as_u64().unwrap();
            assert!(hwm < 64 * 1024, "64G boot peaked at {hwm} KiB of VMM RSS");
            // The hole splits the RAM above 3 GiB.
            let layout = r.result("kind", "layout").expect("layout line");
            assert_eq!(layout["ranges"], "0x0+0xc0000000,0x100000000+0xf40000000");
        }
        // The metadata budget: at most 1 MiB per GiB of guest memory.
        assert!(stats["memory"]["metadata_bytes_per_gib"].as_u64().unwrap() <= 1 << 20);
    }
}

#[test]
fn two_node_layout_is_reported_back_exactly() {
    let r = run(&[
        "--memory",
        "size=768M",
        "--cpus",
        "3",
        "--numa",
        "node=0,size=256M,cpus=0:2",
        "--numa",
        "node=1,size=512M,cpus=1,host-node=0,host-policy=bind",
        "--numa-distance",
        "0:1=35",
        "--guest-args",
        "scenario=boot",
    ]);
    r.assert_ok();
    let layouts: Vec<_> = r.results().into_iter().filter(|x| x["kind"] == "layout").collect();
    assert_eq!(layouts.len(), 2);
    assert_eq!(layouts[0]["node"], 0);
    assert_eq!(layouts[0]["mem"], 256u64 << 20);
    assert_eq!(layouts[0]["ranges"], "0x0+0x10000000");
    assert_eq!(layouts[0]["cpus"], "0,2");
    assert_eq!(layouts[0]["distance"], "10,35");
    assert_eq!(layouts[1]["node"], 1);
    assert_eq!(layouts[1]["mem"], 512u64 << 20);
    assert_eq!(layouts[1]["ranges"], "0x10000000+0x20000000");
    assert_eq!(layouts[1]["cpus"], 1);
    assert_eq!(layouts[1]["distance"], "35,10");
    assert!(r.stdout.contains("cpu 2 (node 0) is up"));
    assert!(r.stdout.contains("cpu 1 (node 1) is up"));
}

#[test]
fn node_straddling_the_hole_has_two_ranges() {
    let r = run(&["--numa", "node=0,size=2G,cpus=0", "--numa", "node=1,size=2G", "--guest-args", "scenario=boot"]);
    r.assert_ok();
    let node1 = r.results().into_iter().find(|x| x["kind"] == "layout" && x["node"] == 1).unwrap();
    assert_eq!(node1["ranges"], "0x80000000+0x40000000,0x100000000+0x40000000");
    assert_eq!(node1["cpus"], "");
}

#[test]
fn stats_file_is_json_with_the_documented_sections() {
    let path = scratch("explicit-stats.json");
    let r = run(&["--stats-file", path.to_str().unwrap(), "--guest-args", "scenario=boot seed=7"]);
    r.assert_ok();
    let text = std::fs::read_to_string(&path).expect("stats file exists");
    let s: serde_json::Value = serde_json::from_str(&text).expect("stats file parses");
    for key in ["version", "exit", "config", "timing_us", "host", "memory", "exits", "guest"] {
        assert!(!s[key].is_null(), "missing {key}");
    }
    assert_eq!(s["exit"]["code"], 0);
    assert_eq!(s["exit"]["guest_status"], 0);
    assert_eq!(s["config"]["seed"], 7);
    assert!(s["timing_us"]["first_exit"].as_u64().unwrap() <= s["timing_us"]["total"].as_u64().unwrap());
    // KVM's own counters (this host's kernel has its binary statistics): every exit that
    // reached the VMM went through KVM, and the guest's first use of each page it touched was
    // a shadow-paging fault (or an EPT violation) KVM took.
    let kvm = &s["kvm"]["vcpus"];
    let vmm_exits = s["exits"]["total"].as_u64().unwrap();
    assert!(kvm["exits"].as_u64().unwrap() >= vmm_exits, "{kvm} against {vmm_exits} VMM exits");
    assert!(kvm["pf_taken"].as_u64().unwrap() > 0, "{kvm}");
    assert!(s["kvm"]["vm"].as_object().is_some_and(|m| !m.is_empty()), "{}", s["kvm"]);
    let _ = std::fs::remove_file(path);
}

#[test]
fn guest_exit_status_is_the_vmm_exit_code() {
    // An unknown scenario makes the guest exit with BAD_ARGS.
    let r = run(&["--guest-args", "scenario=nonesuch"]);
    assert_eq!(r.code, i32::try_from(protocol::exit::BAD_ARGS).unwrap(), "{}", r.stdout);
    assert!(r.stdout.contains("unknown scenario"));
}

#[test]
fn sigusr1_dumps_the_stats_while_running() {
    // A run long enough to be signalled mid-way.
    let mut child = common::spawn(&["--guest-args", "scenario=ptstress rounds=1000000"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let start = stderr.find('{').expect("a JSON dump on stderr");
    let end = stderr.rfind('}').unwrap();
    let dump: serde_json::Value = serde_json::from_str(&stderr[start..=end]).expect("the dump parses");
    assert!(dump["exit"].is_null(), "still running when dumped");
    assert!(dump["memcalls"]["calls"].as_u64().unwrap() > 0, "{dump}");
}

#[test]
fn the_default_guest_runs_the_stress_job() {
    let r = run(&["--cpus", "2"]);
    r.assert_ok();
    assert!(r.result("scenario", "stress").is_some(), "{}", r.stdout);
    for step in ["pages", "churn", "larson", "xmalloc", "cache-scratch"] {
        let results: Vec<_> = r.results().into_iter().filter(|x| x["scenario"] == step).collect();
        assert_eq!(results.len(), 2, "{step}: {}", r.stdout);
        assert!(results.iter().all(|x| x["errors"] == 0), "{step}: {results:?}");
    }
}

#[test]
fn the_binary_carries_the_default_guest_wherever_it_is_copied() {
    // As after `cargo install` or a copy: another directory, another working directory, no
    // --kernel, no source tree in sight.
    let dir = common::scratch("installed");
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("vmm");
    std::fs::copy(common::vmm_bin(), &bin).unwrap();
    let stats = dir.join("stats.json");
    let out = std::process::Command::new(&bin)
        .current_dir("/")
        .args(["run", "--memory", "size=256M", "--guest-args", "scenario=boot", "--stats-file"])
        .arg(&stats)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert!(s["config"]["kernel"].as_str().unwrap().starts_with("(built-in default guest"), "{}", s["config"]);
    assert!(s["guest"]["results"].as_array().unwrap().iter().any(|r| r["scenario"] == "boot"), "{s}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_profile_names_the_guest_functions_that_ran() {
    let path = scratch("profile.txt");
    let r = run(&[
        "--profile",
        &format!("path={},hz=2000", path.display()),
        "--guest-args",
        "scenario=churn ops=1500000 seed=3",
    ]);
    r.assert_ok();
    let text = std::fs::read_to_string(&path).expect("the profile was written");
    let samples: u64 = text
        .split_once(" samples at 2000 Hz")
        .and_then(|(head, _)| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sample count: {text}"));
    assert!(samples >= 20, "{text}");
    // The functions table: every line a share, a count and a name; they add up to the total,
    // nearly all of it falls in the image's own functions, and the hottest is the guest's
    // (the churn loop, the heap), not boot code.
    let rows: Vec<(u64, &str)> = text
        .lines()
        .skip(3)
        .take_while(|l| !l.starts_with('#'))
        .map(|l| {
            let mut f = l.split_whitespace();
            let n = f.nth(1).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("bad row `{l}`"));
            (n, l.rsplit("  ").next().unwrap())
        })
        .collect();
    assert!(rows.iter().map(|r| r.0).sum::<u64>() <= samples, "{text}");
    let known: u64 = rows.iter().filter(|r| !r.1.starts_with('(')).map(|r| r.0).sum();
    assert!(known * 10 >= samples * 9, "under 90% of samples in the image's functions: {text}");
    assert!(rows[0].1.starts_with("guest::"), "{text}");
    let _ = std::fs::remove_file(path);
}
