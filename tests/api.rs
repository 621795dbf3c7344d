//! The control API and the balloon end to end: real KVM, a real Unix socket, guests that react
//! (or do not) to the balloon, and clients that misbehave.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::vm::{Exit, Vm, n, results, rss_kib, wait_for};
use serde_json::Value;
use vmm::api::client;

const MIB: u64 = 1 << 20;

#[test]
fn the_balloon_takes_memory_back_from_a_running_cache_and_gives_it_back() {
    let vm = Vm::start(&[
        "--memory",
        "size=1G",
        "--cpus",
        "2",
        "--balloon",
        "size=0,stats-interval=1",
        "--guest-args",
        "scenario=cache seconds=60",
    ]);
    let pid = vm.pid();
    wait_for("the cache filling past 700 MiB of RSS", Duration::from_secs(30), || rss_kib(pid) > 700 * 1024);
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_kib(pid);
    let resident_before = resident_frames(&vm);

    // Inflate to 768 MiB: the guest hears of it, shrinks, and the balloon takes what it frees.
    let start = Instant::now();
    let (code, _) = vm.api("PATCH", "/balloon", Some(r#"{"amount_mib": 768}"#));
    assert_eq!(code, 204);
    wait_for("the balloon reaching 768 MiB", Duration::from_secs(5), || {
        let s = vm.balloon_stats();
        n(&s, "actual_pages") == n(&s, "target_pages")
    });
    let inflate = start.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_kib(pid);
    let given_up = resident_before.saturating_sub(resident_frames(&vm)) * 4;
    assert!(given_up > 400 * 1024, "the guest gave up only {given_up} KiB");
    assert!(before - after >= given_up * 9 / 10, "RSS {before} -> {after} KiB; the guest gave up {given_up} KiB");
    let s = vm.balloon_stats();
    assert_eq!(n(&s, "target_mib"), 768);
    assert_eq!(n(&s, "actual_mib"), 768);
    assert!(n(&s, "reclaim_notifications") >= 1 && n(&s, "disk_caches") > 0, "{s}");
    std::thread::sleep(Duration::from_secs(2));

    // Deflate: the guest may grow again, and its cache does.
    let (code, _) = vm.api("PATCH", "/balloon", Some(r#"{"amount_mib": 0}"#));
    assert_eq!(code, 204);
    wait_for("the cache growing back", Duration::from_secs(15), || rss_kib(pid) > 600 * 1024);
    std::thread::sleep(Duration::from_secs(2));
    let (code, _) = vm.api("PUT", "/actions", Some(r#"{"action_type": "Shutdown"}"#));
    assert_eq!(code, 204);
    let socket = vm.socket.clone();
    let Exit { code, stderr, stats, stdout: out } = vm.wait(Duration::from_secs(20));
    assert_eq!(code, 0, "{stderr}");
    assert!(!socket.exists(), "the socket is removed at exit");
    let finals = results(&out, "cache");
    assert_eq!(finals.len(), 2, "one result per vCPU: {out}");
    assert!(finals.iter().all(|r| n(r, "errors") == 0), "{finals:?}");
    // Hit rates: while the balloon held 768 MiB (limit 256 MiB) they fell, and the cache was
    // small; after the deflate it grew back.
    let ticks = results(&out, "cache-tick");
    let limited: Vec<&Value> = ticks.iter().filter(|t| n(t, "limit_kib") == 256 * 1024).collect();
    let full: Vec<&Value> = ticks.iter().filter(|t| n(t, "limit_kib") == 1024 * 1024).collect();
    assert!(!limited.is_empty() && !full.is_empty(), "{out}");
    let avg = |v: &[&Value], k: &str| v.iter().map(|t| n(t, k)).sum::<u64>() / v.len() as u64;
    assert!(avg(&limited, "hit_rate_pct") < avg(&full, "hit_rate_pct"), "{ticks:?}");
    assert!(avg(&limited, "cache_kib") * 2 < full.iter().map(|t| n(t, "cache_kib")).max().unwrap(), "{ticks:?}");
    assert!(stats["notify"]["deliveries"].as_u64().unwrap() >= 2, "{}", stats["notify"]);
    eprintln!("inflate of the cache to 768 MiB took {inflate:?}; RSS {before} -> {after} KiB");
}

fn resident_frames(vm: &Vm) -> u64 {
    let (_, s) = vm.api("GET", "/stats", None);
    s["memory"]["nodes"].as_array().unwrap().iter().map(|n| n["frames_resident"].as_u64().unwrap()).sum()
}

#[test]
fn deflate_on_oom_lets_an_allocation_through_or_not() {
    for (doo, expect_enomem) in [("on", false), ("off", true)] {
        let r = common::run(&[
            "--memory",
            "size=512M",
            "--balloon",
            &format!("size=384M,deflate-on-oom={doo}"),
            "--guest-args",
            "scenario=grow size=256M",
        ]);
        r.assert_ok();
        let x = r.result("scenario", "grow").expect("grow result");
        assert_eq!(n(&x, "limit_mib"), 128, "{x}");
        let b = &r.stats.as_ref().unwrap()["balloon"];
        if expect_enomem {
            assert_eq!(n(&x, "enomem"), 1, "{x}");
            assert!(n(&x, "mib") < 128, "{x}");
            assert_eq!(n(&b["counters"], "oom_deflates"), 0);
        } else {
            assert_eq!((n(&x, "enomem"), n(&x, "mib")), (0, 256), "{x}");
            assert!(n(&b["counters"], "oom_deflates") > 0, "{b}");
            // The balloon gave way by what the guest needed, and its target with it.
            assert!(n(b, "target_frames") * 4096 <= 256 * MIB, "{b}");
        }
    }
}

#[test]
fn a_balloon_larger_than_guest_ram_is_refused() {
    let vm = Vm::start(&["--memory", "size=256M", "--guest-args", "scenario=spin seconds=3"]);
    let (code, v) = vm.api("PATCH", "/balloon", Some(r#"{"amount_mib": 512}"#));
    assert_eq!(code, 400);
    assert!(v["fault_message"].as_str().unwrap().contains("larger than the guest's"), "{v}");
    let (code, v) = vm.api("GET", "/balloon", None);
    assert_eq!((code, n(&v, "amount_mib")), (200, 0), "nothing changed: {v}");
    assert_eq!(vm.wait(Duration::from_secs(20)).code, 0);
    common::run(&["--memory", "size=256M", "--balloon", "size=1G"])
        .assert_error(i32::from(vmm::exit_code::USAGE), "--balloon size 1073741824 is larger than the guest's");
    common::run(&["--balloon", "size=1M,deflate-on-oom=maybe"])
        .assert_error(i32::from(vmm::exit_code::USAGE), "deflate-on-oom `maybe` is not `on` or `off`");
}

#[test]
fn a_guest_without_a_shrinker_leaves_the_balloon_short_and_keeps_running() {
    let vm = Vm::start(&["--memory", "size=512M", "--guest-args", "scenario=hold size=400M seconds=5"]);
    wait_for("the guest holding its memory", Duration::from_secs(20), || vm.output().contains("phase=holding"));
    let (code, _) = vm.api("PATCH", "/balloon", Some(r#"{"amount_mib": 300}"#));
    assert_eq!(code, 204);
    std::thread::sleep(Duration::from_secs(1));
    let s = vm.balloon_stats();
    // Free frames went to the balloon; the 400 MiB the guest keeps did not.
    assert_eq!(n(&s, "target_mib"), 300);
    assert!(n(&s, "actual_mib") < 300 && n(&s, "actual_mib") > 50, "{s}");
    assert!(n(&s, "reclaim_requests") >= 1, "{s}");
    let Exit { code, stderr, stats, .. } = vm.wait(Duration::from_secs(30));
    assert_eq!(code, 0, "{stderr}");
    let done = stats["guest"]["results"].as_array().unwrap().iter().find(|r| r["phase"] == "done").cloned().unwrap();
    assert_eq!(n(&done, "intact"), 1, "{done}");
}

#[test]
fn the_api_survives_bad_slow_and_many_clients_and_the_guest_does_not_notice() {
    let vm = Vm::start(&["--memory", "size=512M", "--cpus", "2", "--guest-args", "scenario=cache seconds=60"]);
    let fault = |m: &str, p: &str, b: Option<&str>, code: u16| {
        let (c, v) = vm.api(m, p, b);
        assert_eq!(c, code, "{m} {p} {b:?}: {v}");
        assert!(v["fault_message"].is_string(), "{m} {p}: {v}");
    };
    fault("PATCH", "/balloon", Some("{"), 400);
    fault("PATCH", "/balloon", Some(r#"{"amount_mib": 1, "colour": "red"}"#), 400);
    fault("PATCH", "/balloon", Some(r#"{"amount_mib": -1}"#), 400);
    fault("PATCH", "/balloon", Some("{}"), 400);
    fault("PATCH", "/balloon", None, 400);
    fault("PATCH", "/balloon", Some(r#"{"stats_polling_interval_s": 99999999}"#), 400);
    fault("PUT", "/actions", Some(r#"{"action_type": "Reboot"}"#), 400);
    fault("DELETE", "/balloon", None, 405);
    fault("POST", "/stats", None, 405);
    fault("GET", "/nowhere", None, 404);
    let big = format!(r#"{{"amount_mib": 1, "pad": "{}"}}"#, "x".repeat(64 << 10));
    fault("PATCH", "/balloon", Some(&big), 413);
    let (c, _) = vm.api("GET", "/vm", None);
    assert_eq!(c, 200);

    // A client that connects and never sends, and one that sends half a request, do not hold
    // up anyone else.
    let mut silent = UnixStream::connect(&vm.socket).unwrap();
    let mut half = UnixStream::connect(&vm.socket).unwrap();
    half.write_all(b"PATCH /balloon HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"am").unwrap();
    let t = Instant::now();
    let (c, _) = vm.api("GET", "/balloon", None);
    assert!(c == 200 && t.elapsed() < Duration::from_secs(1), "{c} after {:?}", t.elapsed());

    // A hundred clients at once, good and bad requests: each gets its own right answer.
    let socket = vm.socket.clone();
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let (code, body) = if i % 2 == 0 {
                    client::request(&socket, "GET", "/balloon/statistics", None).unwrap()
                } else {
                    client::request(&socket, "PATCH", "/balloon", Some(r#"{"nope": 1}"#)).unwrap()
                };
                let v: Value = serde_json::from_slice(&body).unwrap();
                (i, code, v)
            })
        })
        .collect();
    for t in threads {
        let (i, code, v) = t.join().unwrap();
        if i % 2 == 0 {
            assert!(code == 200 && v["total_memory"] == 512 * MIB, "{code} {v}");
        } else {
            assert!(code == 400 && v["fault_message"].as_str().unwrap().contains("unknown field"), "{code} {v}");
        }
    }
    // The slow clients are cut off after the header timeout; the server still answers.
    std::thread::sleep(vmm::api::HEADER_TIMEOUT + Duration::from_secs(1));
    let mut buf = [0u8; 1];
    let _ = silent.set_read_timeout(Some(Duration::from_secs(2)));
    assert!(matches!(std::io::Read::read(&mut silent, &mut buf), Ok(0) | Err(_)), "the silent client is closed");
    assert_eq!(vm.api("GET", "/vm", None).0, 200);

    let (code, _) = vm.api("PUT", "/actions", Some(r#"{"action_type": "Shutdown"}"#));
    assert_eq!(code, 204);
    let Exit { code, stderr, stdout: out, .. } = vm.wait(Duration::from_secs(20));
    assert_eq!(code, 0, "the guest finished cleanly: {stderr}");
    let r = results(&out, "cache");
    assert_eq!(r.len(), 2, "{out}");
    assert!(r.iter().all(|r| n(r, "errors") == 0 && n(r, "ops") > 10_000), "{r:?}");
}

#[test]
fn sigterm_and_the_shutdown_action_stop_cleanly_and_remove_the_socket() {
    // A guest that listens finishes when asked: its own status, at once.
    let vm = Vm::start(&["--memory", "size=512M", "--guest-args", "scenario=cache seconds=60"]);
    std::thread::sleep(Duration::from_millis(500));
    let mode = std::fs::metadata(&vm.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is private");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(libc::pid_t::try_from(vm.pid()).unwrap(), libc::SIGTERM) }, 0);
    let t = Instant::now();
    let socket = vm.socket.clone();
    let Exit { code, stderr, stats, .. } = vm.wait(Duration::from_secs(10));
    assert_eq!(code, 0, "{stderr}");
    assert!(t.elapsed() < vmm::vm::SHUTDOWN_GRACE, "the guest finished before the grace period");
    assert_eq!(stats["exit"]["code"], 0);
    assert!(!socket.exists());

    // A guest that does not listen is stopped after the grace period.
    let vm = Vm::start(&["--guest-args", "scenario=spin"]);
    let (code, _) = vm.api("PUT", "/actions", Some(r#"{"action_type": "Shutdown"}"#));
    assert_eq!(code, 204);
    let (code, _) = vm.api("GET", "/vm", None);
    assert_eq!(code, 200);
    let socket = vm.socket.clone();
    let Exit { code, stderr, stats, .. } = vm.wait(Duration::from_secs(10));
    assert_eq!(code, i32::from(vmm::exit_code::STOPPED), "{stderr}");
    assert!(stderr.contains("stopped by the shutdown action before the guest finished"), "{stderr}");
    assert_eq!(stats["exit"]["code"], u64::from(vmm::exit_code::STOPPED));
    assert!(!socket.exists());
}

#[test]
fn the_socket_path_is_checked() {
    // A live socket is refused; the first VMM is not disturbed.
    let first = Vm::start(&["--guest-args", "scenario=spin seconds=4"]);
    let taken = first.socket.to_str().unwrap().to_string();
    common::run(&["--api-socket", &taken])
        .assert_error(i32::from(vmm::exit_code::USAGE), "a VMM is already listening there");
    assert_eq!(first.api("GET", "/vm", None).0, 200);
    let Exit { code, stderr, .. } = first.wait(Duration::from_secs(20));
    assert_eq!(code, 0, "{stderr}");

    // A stale socket (nobody listening) is replaced.
    let stale = common::scratch("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let r = common::run(&["--api-socket", stale.to_str().unwrap(), "--guest-args", "scenario=boot"]);
    r.assert_ok();
    assert!(!stale.exists());

    // Anything else is left alone.
    let file = common::scratch("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    common::run(&["--api-socket", file.to_str().unwrap()])
        .assert_error(i32::from(vmm::exit_code::USAGE), "exists and is not a socket");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let _ = std::fs::remove_file(&file);
    common::run(&["--api-socket", "/nonexistent/dir/api.sock"])
        .assert_error(i32::from(vmm::exit_code::USAGE), "cannot listen there");
}

#[test]
fn vmm_ctl_speaks_to_the_api() {
    let vm = Vm::start(&["--memory", "size=512M", "--guest-args", "scenario=spin seconds=6"]);
    let ctl = |args: &[&str]| {
        let out =
            Command::new(common::vmm_bin()).args(["ctl", "--api-socket"]).arg(&vm.socket).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = ctl(&["balloon", "set", "128M", "--wait", "5s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "balloon: 128 of 128 MiB held");
    let (_, out, _) = ctl(&["balloon"]);
    assert_eq!(out.trim(), "balloon: 128 MiB (deflate-on-oom off, guest statistics off)");
    let (_, out, _) = ctl(&["balloon", "stats"]);
    assert!(out.starts_with("balloon: 128 of 128 MiB held (32768 of 32768 pages)"), "{out}");
    let (_, out, _) = ctl(&["--json", "balloon"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["amount_mib"], 128);
    let (_, out, _) = ctl(&["vm"]);
    assert!(out.starts_with("Running, up "), "{out}");
    let (_, out, _) = ctl(&["stats"]);
    assert!(out.contains("balloon 128 of 128 MiB"), "{out}");
    let (code, _, err) = ctl(&["balloon", "set", "2G"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("vmm: error: HTTP 400: a balloon of"), "{err}");
    let (code, out, _) = ctl(&["shutdown"]);
    assert_eq!((code, out.trim()), (0, "shutdown requested"));
    // `spin` does not listen: the VMM stops it after the grace period.
    assert_eq!(vm.wait(Duration::from_secs(20)).code, i32::from(vmm::exit_code::STOPPED));
    let missing = Path::new("/nonexistent.sock");
    let out = Command::new(common::vmm_bin()).args(["ctl", "--api-socket"]).arg(missing).arg("vm").output().unwrap();
    assert_eq!(out.status.code(), Some(i32::from(vmm::exit_code::UNAVAILABLE)));
}
