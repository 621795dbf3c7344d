//! Helpers for tests that launch guests: build the guest image once, spawn `vmm` with a hard
//! timeout, and collect its exit code, output and stats JSON.

#![allow(dead_code)]

pub mod guest_output;
pub mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The `vmm` binary under test.
pub fn vmm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmm"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("vmm/ has a parent").to_path_buf()
}

/// The default guest image, (re)built once per test process by images/build.sh.
pub fn guest_image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let status =
                Command::new("bash").arg(repo().join("images/build.sh")).status().expect("cannot run images/build.sh");
            assert!(status.success(), "images/build.sh failed");
            repo().join("images/out/guest.elf")
        })
        .clone()
}

/// A scratch path unique to this test run.
pub fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{n}-{name}", std::process::id()))
}

/// What a `vmm` run produced.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub stats: Option<serde_json::Value>,
    pub elapsed: Duration,
}

impl Run {
    /// The guest's `@result` lines from the stats, as JSON objects.
    pub fn results(&self) -> Vec<serde_json::Value> {
        self.stats.as_ref().and_then(|s| s["guest"]["results"].as_array().cloned()).unwrap_or_default()
    }

    /// The first result whose `key` is `value`.
    pub fn result(&self, key: &str, value: &str) -> Option<serde_json::Value> {
        self.results().into_iter().find(|r| r[key].as_str() == Some(value))
    }

    /// Asserts a clean exit with status 0, showing the output otherwise.
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.code, 0, "vmm failed\n--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr);
        self
    }

    /// Asserts that the run failed with `code` and printed exactly one error line containing
    /// `needle`, with no panic or backtrace.
    pub fn assert_error(&self, code: i32, needle: &str) {
        assert_eq!(self.code, code, "exit code\n--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr);
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected one error line, got:\n{}", self.stderr);
        assert!(lines[0].starts_with("vmm: error: "), "not an error line: {}", lines[0]);
        assert!(lines[0].contains(needle), "error line lacks `{needle}`: {}", lines[0]);
        assert!(!self.stderr.contains("panicked") && !self.stderr.contains("backtrace"), "{}", self.stderr);
    }
}

/// Default hard timeout for one guest run.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `vmm run` with `args`, adding `--kernel` (the default guest) and `--stats-file` unless
/// given. `wrapper` runs vmm under another command (e.g. `setpriv`).
pub fn run_with(wrapper: &[&str], args: &[&str], timeout: Duration) -> Run {
    let mut full: Vec<String> = vec!["run".into()];
    if !args.contains(&"--kernel") {
        full.push("--kernel".into());
        full.push(guest_image().display().to_string());
    }
    let stats = scratch("stats.json");
    if !args.contains(&"--stats-file") {
        full.push("--stats-file".into());
        full.push(stats.display().to_string());
    }
    full.extend(args.iter().map(|s| s.to_string()));
    let mut cmd = if wrapper.is_empty() {
        Command::new(vmm_bin())
    } else {
        let mut c = Command::new(wrapper[0]);
        c.args(&wrapper[1..]).arg(vmm_bin());
        c
    };
    cmd.args(&full).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("cannot spawn vmm");
    // Read both pipes on threads so a chatty guest cannot block on a full pipe.
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmm {full:?} timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let stdout = t_out.join().expect("reader");
    let stderr = t_err.join().expect("reader");
    let stats_text = std::fs::read_to_string(&stats).ok();
    let _ = std::fs::remove_file(&stats);
    let stats = stats_text.map(|t| serde_json::from_str(&t).expect("stats file is JSON"));
    Run { code: status.code().unwrap_or(-1), stdout, stderr, stats, elapsed }
}

/// Starts `vmm run` with `args` and the default guest, with piped output, and returns the child.
pub fn spawn(args: &[&str]) -> std::process::Child {
    Command::new(vmm_bin())
        .arg("run")
        .arg("--kernel")
        .arg(guest_image())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot spawn vmm")
}

/// Runs `vmm run` with `args` (see [`run_with`]).
pub fn run(args: &[&str]) -> Run {
    run_with(&[], args, TIMEOUT)
}
