//! The memory manager end to end: a real guest allocating, touching, protecting, moving and
//! freeing memory through memory calls, on real KVM with userfaultfd; the guest checks every
//! result and reports `@result` lines that these tests read back from the stats.

mod common;

use common::{Run, run};
use serde_json::Value;

const TWO_NODES: [&str; 6] = ["--cpus", "2", "--numa", "node=0,size=256M,cpus=0", "--numa", "node=1,size=256M,cpus=1"];

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("`{key}` missing from {v}"))
}

fn with(extra: &[&str], args: &[&str]) -> Run {
    let mut a: Vec<&str> = extra.to_vec();
    a.extend_from_slice(args);
    run(&a)
}

fn check_pages(r: &Run, cpus: u64) {
    r.assert_ok();
    let per_cpu: Vec<Value> = r.results().into_iter().filter(|x| x["scenario"] == "pages").collect();
    assert_eq!(per_cpu.len() as u64, cpus, "{}", r.stdout);
    for x in &per_cpu {
        assert_eq!(n(x, "errors"), 0, "{x}");
        assert!(n(x, "allocs") >= 100 && n(x, "frees") == n(x, "allocs"), "{x}");
        assert!(n(x, "pages_verified") > 10_000, "{x}");
        assert_eq!(n(x, "placement_checks"), n(x, "allocs"), "{x}");
    }
    let s = r.result("scenario", "pages-summary").expect("summary");
    let (base, peak, end) = (n(&s, "rss_base_kib"), n(&s, "rss_peak_kib"), n(&s, "rss_end_kib"));
    // The run really used memory...
    assert!(peak > base + 32 * 1024, "peak RSS {peak} KiB is not far above the baseline {base} KiB");
    // ...and after the guest freed everything the VMM gave it back: within 10% of baseline.
    assert!(end * 10 <= base * 11, "RSS {end} KiB after freeing everything, baseline {base} KiB");
    // Guest frames resident beyond the baseline can only be the guest's own boot memory
    // (stacks used deeper, per-vCPU pages) touched later in the run, not leaked data frames
    // (the guest checks every data frame came back): at most the two stacks' 128 frames.
    assert!(n(&s, "resident_end") <= n(&s, "resident_base") + 128, "{s}");
    // Every frame came back to the buddy allocators (the guest checks the data frames).
    let stats = r.stats.as_ref().unwrap();
    assert_eq!(stats["memory"]["regions"], 0);
    assert_eq!(stats["memory"]["invariants"], "ok");
    let faults = &stats["faults"];
    assert!(n(faults, "zero_fill") > 0 && n(faults, "free_frame") == 0, "{faults}");
}

#[test]
fn pages_verify_on_one_vcpu() {
    check_pages(&run(&["-v", "--guest-args", "scenario=pages seed=11"]), 1);
}

#[test]
fn pages_verify_on_two_vcpus() {
    check_pages(&run(&["-v", "--cpus", "2", "--guest-args", "scenario=pages seed=12"]), 2);
}

#[test]
fn pages_verify_on_two_nodes() {
    let r = with(&TWO_NODES, &["-v", "--guest-args", "scenario=pages seed=13"]);
    check_pages(&r, 2);
    // Both nodes were used.
    let nodes = r.stats.as_ref().unwrap()["memory"]["nodes"].as_array().unwrap().clone();
    assert!(nodes.iter().all(|x| n(x, "frames_faulted") > 0), "{nodes:?}");
}

#[test]
fn numa_policies_place_every_page() {
    let r = with(&TWO_NODES, &["--guest-args", "scenario=numa"]);
    r.assert_ok();
    let x = r.result("scenario", "numa").expect("result");
    assert_eq!(x["ok"], 1);
    // bind(1): all 2048 pages of the 8 MiB allocation in node 1's range (checked by the guest
    // against BootInfo and by the VMM's TRANSLATE).
    assert_eq!(n(&x, "bind_pages"), 2048);
    assert_eq!(n(&x, "interleave_node0"), 128);
    assert_eq!(n(&x, "interleave_node1"), 128);
    assert_eq!(n(&x, "preferred_fallback_pages"), 256);
}

#[test]
fn fault_counts_match_touched_memory_over_fault_around() {
    for (fa, window) in [("4K", 1u64), ("64K", 16), ("2M", 512)] {
        let size = 64u64 << 20;
        // A fixed window: the maximum equals the base, so sequential touches do not grow it.
        let mem = format!("size=512M,fault-around={fa},fault-around-max={fa}");
        let r = run(&["--memory", &mem, "--guest-args", "scenario=touch size=64M"]);
        r.assert_ok();
        let x = r.result("scenario", "touch").expect("result");
        let pages = size / 4096;
        let expect = pages / window;
        let faults = n(&x, "faults");
        assert!(faults.abs_diff(expect) * 10 <= expect, "fault-around {fa}: {faults} faults, expected about {expect}");
        assert_eq!(
            n(&x, "fault_pages"),
            pages,
            "fault-around {fa}: every touched page was installed by a fault: {x}; the VMM's fault counters: {}",
            r.stats.as_ref().map_or(Value::Null, |s| s["faults"].clone())
        );
        assert_eq!(n(&x, "fault_around"), window * 4096);
    }
}

#[test]
fn scattered_first_touches_install_only_the_pages_touched() {
    // 10% of 64 MiB at random with the default windows, every fault through userfaultfd
    // (`backing=uffd`, as with swap on): once the faults are seen to be scattered, each
    // installs only its own page (the window would install 16 for about 1.6 touched); a
    // sequential pass still grows its windows.
    let r = run(&["--memory", "size=512M,backing=uffd", "--guest-args", "scenario=touch size=64M pct=10 seed=5"]);
    r.assert_ok();
    let x = r.result("scenario", "touch").expect("result");
    let (installed, touched) = (n(&x, "fault_pages"), n(&x, "touched"));
    assert!(installed * 10 <= touched * 12, "{installed} frames installed for {touched} pages touched");
    let faults = &r.stats.as_ref().unwrap()["faults"];
    assert!(n(faults, "scattered") > touched / 2, "{faults}");
    assert_eq!(n(faults, "kernel_first_touch_bytes"), 0, "{faults}");
    let r = run(&["--guest-args", "scenario=touch size=64M"]);
    r.assert_ok();
    let x = r.result("scenario", "touch").expect("result");
    assert!(n(&x, "faults") * 32 < n(&x, "touched"), "{x}");
    assert_eq!(n(&r.stats.as_ref().unwrap()["faults"], "kernel_first_touch_bytes"), 0, "a sequential pass stays ours");
}

#[test]
fn scattered_first_touches_go_over_to_kernel_demand_paging_without_swap() {
    // The default backing (`auto`), no swap: after the first scattered faults the kernel backs
    // that chunk of guest RAM on first touch, with no round trip to the VMM. The guest checks
    // every page (touched ones hold their value, the others read zero); the touches after the
    // handover take no second-level fault; and the untouched pages it reads back cost no
    // memory (the VMM's windows would have installed them all): its peak RSS stays far under
    // the 256 MiB it reads.
    let r = run(&["-v", "--memory", "size=1G", "--guest-args", "scenario=touch size=256M pct=10 seed=5"]);
    r.assert_ok();
    let x = r.result("scenario", "touch").expect("result");
    let touched = n(&x, "touched");
    assert!(n(&x, "faults") * 20 < touched, "{x}");
    let stats = r.stats.as_ref().unwrap();
    let faults = &stats["faults"];
    assert!(n(faults, "kernel_first_touch_bytes") >= 64 << 20, "{faults}");
    let hwm_mib = n(&stats["host"], "vm_hwm_kib") / 1024;
    assert!(hwm_mib < 128, "peak RSS {hwm_mib} MiB for {touched} pages touched");
    assert_eq!(stats["memory"]["invariants"], "ok");
    // With swap on, every fault stays the VMM's: it must see them to bring pages back.
    let dir = std::env::temp_dir();
    let r = run(&[
        "--memory",
        "size=1G",
        "--swap",
        &format!("limit=1G,dir={}", dir.display()),
        "--guest-args",
        "scenario=touch size=64M pct=10 seed=5",
    ]);
    r.assert_ok();
    assert_eq!(n(&r.stats.as_ref().unwrap()["faults"], "kernel_first_touch_bytes"), 0);
}

#[test]
fn demand_backing_takes_no_uffd_faults() {
    let r = run(&["--memory", "size=512M,backing=demand", "--guest-args", "scenario=touch size=16M"]);
    r.assert_ok();
    assert_eq!(n(&r.result("scenario", "touch").unwrap(), "faults"), 0);
    assert!(r.stats.as_ref().unwrap()["faults"].is_null());
}

#[test]
fn oom_returns_enomem_and_the_guest_keeps_running() {
    for layout in [&[][..], &TWO_NODES[..]] {
        let r = with(layout, &["--guest-args", "scenario=oom"]);
        r.assert_ok();
        let x = r.result("scenario", "oom").expect("result");
        assert_eq!(x["ok"], 1, "{}", r.stdout);
        assert!(n(&x, "exhausted_bytes") > 400 << 20);
        assert_eq!(n(&x, "free_frames_when_full"), 0);
    }
}

#[test]
fn lazy_regions_get_frames_only_where_touched() {
    let r = run(&["--guest-args", "scenario=lazy size=256M touches=300"]);
    r.assert_ok();
    let x = r.result("scenario", "lazy").expect("result");
    assert_eq!(x["ok"], 1, "{}", r.stdout);
    assert!(n(&x, "lazy_faults") > 100);
    assert!(n(&x, "frames") < 65536 / 8, "{x}");
}

#[test]
fn unmapped_access_is_caught_by_the_guests_pf_handler() {
    let r = run(&["--guest-args", "scenario=segv kind=read"]);
    assert_eq!(r.code, i32::try_from(protocol::exit::EXCEPTION).unwrap(), "{}", r.stdout);
    assert!(r.stdout.contains("exception 14 (#PF page fault) on cpu 0: error=0x4"), "{}", r.stdout);
    assert!(r.stdout.contains("cr2=0xdead0000"), "{}", r.stdout);

    let r = run(&["--guest-args", "scenario=segv kind=write-ro"]);
    assert!(r.stdout.contains("exception 14 (#PF page fault) on cpu 0: error=0x7"), "{}", r.stdout);

    // A stack overflow hits the guard page and arrives as a double fault on the IST stack.
    let r = run(&["--guest-args", "scenario=segv kind=stack"]);
    assert_eq!(r.code, i32::try_from(protocol::exit::EXCEPTION).unwrap(), "{}", r.stdout);
    assert!(r.stdout.contains("exception 8 (#DF double fault)"), "{}", r.stdout);

    for (kind, vector) in [("ud", "exception 6 (#UD"), ("gp", "exception 13 (#GP")] {
        let r = run(&["--guest-args", &format!("scenario=segv kind={kind}")]);
        assert_eq!(r.code, i32::try_from(protocol::exit::EXCEPTION).unwrap());
        assert!(r.stdout.contains(vector), "{}", r.stdout);
    }
}

/// Runs `scenario=ptstress` with `args` on `cpus` vCPUs, with the default backing (whose
/// scattered first touches go over to the kernel: the run must have handed some RAM over, so
/// that invalidations are checked there too) and with every fault through userfaultfd (as with
/// swap on).
fn check_ptstress(cpus: usize, args: &str) {
    for backing in ["auto", "uffd"] {
        let memory = format!("size=512M,backing={backing}");
        let cpus_arg = cpus.to_string();
        let r = run(&["--cpus", &cpus_arg, "--memory", &memory, "--guest-args", args]);
        r.assert_ok();
        let xs: Vec<Value> = r.results().into_iter().filter(|x| x["scenario"] == "ptstress").collect();
        assert_eq!(xs.len(), cpus);
        for x in xs {
            assert_eq!(n(&x, "stale"), 0, "{backing}: {x}");
            assert_eq!(n(&x, "errors"), 0, "{backing}: {x}");
            assert!(n(&x, "checks") > 20_000 && n(&x, "expected_faults") > 5_000, "{backing}: {x}");
        }
        let stats = r.stats.as_ref().unwrap();
        let mm = &stats["memory"]["counters"];
        assert!(n(mm, "invalidations") > 500, "{mm}");
        let handed_over = n(&stats["faults"], "kernel_first_touch_bytes");
        assert_eq!(handed_over > 0, backing == "auto", "{backing}: {handed_over} bytes handed over");
    }
}

#[test]
fn randomized_map_move_protect_unmap_has_no_stale_translation_one_vcpu() {
    check_ptstress(1, "scenario=ptstress seed=21 rounds=600 huge=20");
}

#[test]
fn randomized_map_move_protect_unmap_has_no_stale_translation_two_vcpus() {
    // Every vCPU reads every region each round, so the other vCPU's changes must invalidate
    // translations it holds.
    check_ptstress(2, "scenario=ptstress seed=22 rounds=600 huge=20");
}

#[test]
fn bad_memory_calls_get_error_codes_and_change_nothing() {
    let r = run(&["-v", "--guest-args", "scenario=badcalls"]);
    r.assert_ok();
    let x = r.result("scenario", "badcalls").expect("result");
    assert_eq!(n(&x, "failures"), 0, "{}", r.stdout);
    let stats = r.stats.as_ref().unwrap();
    assert_eq!(stats["memory"]["invariants"], "ok");
    assert!(n(&stats["memcalls"], "bad_batches") == 2 && n(&stats["memcalls"], "unknown_ops") == 1);
    // Garbage ring indices: three refused exchanges (the service thread leaves such rings alone,
    // though it may meet one it had found due just before the guest spoiled it); five wild
    // pointers in a free ring, drained by the service thread without an exit.
    let rings = &stats["rings"];
    assert!(n(rings, "ring_errors") >= 3 && n(rings, "bad_frees") == 5 && n(rings, "serviced") >= 1, "{rings}");
    // Meanwhile the guest rang every doorbell bit, classes that do not exist included: the
    // service served the real classes (the spoiled ring refused again), nothing else.
    assert!(n(rings, "rung") >= protocol::slab::NR_CLASSES as u64, "{rings}");
    // The same without the service thread: SLAB_EXCHANGE alone finds them.
    let r = run(&["--memory", "size=512M,rings=off", "--guest-args", "scenario=badcalls service=0"]);
    r.assert_ok();
    assert_eq!(n(&r.result("scenario", "badcalls").expect("result"), "failures"), 0, "{}", r.stdout);
    let rings = &r.stats.as_ref().unwrap()["rings"];
    assert!(n(rings, "ring_errors") == 3 && n(rings, "bad_frees") == 5 && n(rings, "passes") == 0, "{rings}");
}

#[test]
fn workingset_verifies_every_page_on_two_vcpus() {
    let r = run(&["--cpus", "2", "--guest-args", "scenario=workingset size=64M seconds=2 zero=10 seed=31"]);
    r.assert_ok();
    let results = r.results();
    // 64 MiB split between two vCPUs: 8192 pages each.
    let share = (64u64 << 20) / 4096 / 2;
    for cpu in 0..2u64 {
        let of = |scenario: &str| -> Vec<&Value> {
            results.iter().filter(|x| x["scenario"] == scenario && x["cpu"] == cpu).collect()
        };
        let fin: Vec<&Value> = of("workingset").into_iter().filter(|x| x.get("verified_pages").is_some()).collect();
        assert_eq!(fin.len(), 1, "cpu {cpu}: {}", r.stdout);
        let x = fin[0];
        assert_eq!(n(x, "errors"), 0, "{x}");
        assert_eq!(n(x, "pages"), share, "{x}");
        assert_eq!(n(x, "verified_pages"), share, "{x}");
        assert!(n(x, "ops") > 1000 && n(x, "reads") > 0 && n(x, "writes") > 0, "{x}");
        // About 10% zero pages, and they verified as zero.
        assert!((share / 20..share / 5).contains(&n(x, "zero_pages")), "{x}");
        assert!(!of("workingset-tick").is_empty(), "cpu {cpu}: no tick\n{}", r.stdout);
    }
    assert!(!results.iter().any(|x| x.get("error").is_some()), "{}", r.stdout);
}
