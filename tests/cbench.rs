//! C programs nobody here wrote, in the guest (`scenario=cbench`): every program linked into the
//! image (the third-party allocator benchmarks of ../shared/cbench and CBENCH_EXTRA, and the
//! project's own C tests) runs to completion on real KVM, with its `@result` line; more threads
//! than vCPUs work; a double free gets the allocator's error.

#[path = "common/cbench_args.rs"]
mod cbench_args;
mod common;

use std::collections::BTreeMap;

/// The programs in the image and their manifest arguments, as the guest lists them.
fn programs() -> BTreeMap<String, String> {
    let run = common::run(&["--guest-args", "scenario=cbench list=1"]);
    run.assert_ok();
    let list: BTreeMap<String, String> = run
        .stdout
        .lines()
        // With more than one vCPU, lines start with `[cpuN] `.
        .map(|l| if l.starts_with("[cpu") { l.split_once("] ").map_or(l, |(_, rest)| rest) } else { l })
        .filter(|l| !l.is_empty() && !l.starts_with('@'))
        .map(|l| match l.split_once(' ') {
            Some((name, args)) => (name.to_string(), args.to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect();
    assert!(list.contains_key("threads") && list.contains_key("doublefree"), "{}", run.stdout);
    list
}

fn num(r: &serde_json::Value, key: &str) -> u64 {
    r[key].as_str().and_then(|s| s.parse().ok()).or_else(|| r[key].as_u64()).unwrap_or_else(|| panic!("{key} in {r}"))
}

/// Runs program `name` with `args` on `cpus` vCPUs; returns the run and its @result.
fn run_program(name: &str, args: &str, cpus: u32) -> (common::Run, serde_json::Value) {
    let guest_args = format!("scenario=cbench name={name} args=\"{args}\"");
    let cpus = cpus.to_string();
    let run =
        common::run_with(&[], &["--cpus", &cpus, "--guest-args", &guest_args], std::time::Duration::from_secs(300));
    let result =
        run.result("name", name).unwrap_or_else(|| panic!("no @result for {name}:\n{}\n{}", run.stdout, run.stderr));
    assert_eq!(result["scenario"].as_str(), Some("cbench"));
    (run, result)
}

#[test]
fn every_c_program_in_the_image_runs_to_completion() {
    let programs = programs();
    // Without ../shared/cbench the image holds only the project's own programs; with it, all
    // of mimalloc-bench's set.
    if std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/cbench/MANIFEST.toml")).exists() {
        for name in ["larson", "xmalloc-test", "cache-scratch1", "glibc-simple", "mstress", "rptest"] {
            assert!(programs.contains_key(name), "{name} is missing from the image: {programs:?}");
        }
    }
    for (name, manifest_args) in &programs {
        if name == "doublefree" {
            continue;
        }
        let args = cbench_args::short_args(name).unwrap_or(manifest_args);
        let (run, r) = run_program(name, args, 2);
        assert_eq!(run.code, 0, "{name}: exit {}\n{}\n{}", run.code, run.stdout, run.stderr);
        assert_eq!(num(&r, "status"), 0, "{name}: {r}");
        assert!(num(&r, "wall_ns") > 0, "{name}: {r}");
        assert_eq!(num(&r, "bad_frees"), 0, "{name}: {r}");
        let _ = num(&r, "threads");
        let _ = num(&r, "exits");
    }
}

#[test]
fn more_threads_than_vcpus_block_and_preempt_without_burning_a_vcpu() {
    for cpus in [1, 2] {
        let (run, r) = run_program("threads", "{N}", cpus);
        run.assert_ok();
        assert!(run.stdout.contains(": ok"), "{}", run.stdout);
        assert!(num(&r, "threads") > 4 * u64::from(cpus), "{r}");
        let ticks = &run.stats.as_ref().expect("stats")["ticks"];
        // Waiting threads sleep in the VMM rather than spin, and busy ones get preempted.
        assert!(ticks["idles"].as_u64().unwrap_or(0) > 0, "{ticks}");
        assert!(ticks["delivered"].as_u64().unwrap_or(0) > 0, "{ticks}");
    }
}

#[test]
fn a_double_free_gets_the_allocators_error_not_a_second_owner() {
    let (run, r) = run_program("doublefree", "", 2);
    assert_eq!(run.code, 6, "exit code\n{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("all distinct"), "{}", run.stdout);
    assert!(run.stdout.contains("free(): invalid pointer"), "{}", run.stdout);
    assert_eq!(num(&r, "status"), 134);
    assert_eq!(num(&r, "bad_frees"), 1);
}

#[test]
fn an_unknown_program_is_a_bad_argument() {
    let run = common::run(&["--guest-args", "scenario=cbench name=no-such-program"]);
    assert_eq!(run.code, 4, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("no C program `no-such-program`") && run.stdout.contains("threads"), "{}", run.stdout);
}

#[test]
fn cbench_extra_adds_programs_with_no_change_to_the_project() {
    // A folder of our own with a manifest in the same format, as a user would add one.
    let dir = common::scratch("extra-cbench");
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(
        dir.join("MANIFEST.toml"),
        r#"[[bench]]
name = "extra-sum"
lang = "c"
sources = ["src/sum.c"]
flags = ["-DSCALE=3"]
args = "{N} 1000"
measures = "nothing: a test of CBENCH_EXTRA"
"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("src/sum.c"),
        r#"#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    int threads = atoi(argv[1]);
    long n = atol(argv[2]), sum = 0;
    long *v = malloc(n * sizeof *v);
    for (long i = 0; i < n; i++) v[i] = i * SCALE;
    for (long i = 0; i < n; i++) sum += v[i];
    free(v);
    printf("extra-sum: %d threads, sum %ld\n", threads, sum);
    return sum == SCALE * n * (n - 1) / 2 ? 0 : 1;
}
"#,
    )
    .unwrap();
    let image = common::scratch("extra-guest.elf");
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-extra");
    let status = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../images/build.sh"))
        .env("CBENCH_EXTRA", &dir)
        .env("GUEST_TARGET_DIR", &target)
        .env("GUEST_OUT", &image)
        .status()
        .expect("images/build.sh runs");
    assert!(status.success());
    let image = image.display().to_string();
    let run = common::run(&["--kernel", &image, "--cpus", "2", "--guest-args", "scenario=cbench name=extra-sum"]);
    run.assert_ok();
    assert!(run.stdout.contains("extra-sum: 2 threads, sum 1498500"), "{}", run.stdout);
    let r = run.result("name", "extra-sum").expect("a result");
    assert_eq!(num(&r, "status"), 0);
}
