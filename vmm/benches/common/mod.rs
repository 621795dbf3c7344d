//! What the benchmarks that boot guests share: build the guest image and run one scenario.

// Each benchmark uses part of this.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm::api::client;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Builds the default guest (images/build.sh).
pub fn build_guest() {
    let ok = Command::new("bash").arg(repo().join("images/build.sh")).status().expect("images/build.sh");
    assert!(ok.success(), "cannot build the guest");
}

/// The default guest image.
pub fn guest_image() -> PathBuf {
    repo().join("images/out/guest.elf")
}

/// Boots the default guest with `--memory memory` and `--guest-args guest_args`, and returns
/// the result line of `scenario` from the stats.
pub fn run_scenario(memory: &str, guest_args: &str, scenario: &str) -> serde_json::Value {
    let stats = std::env::temp_dir().join(format!("bench-{}-{scenario}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--kernel"])
        .arg(guest_image())
        .args(["--memory", memory, "--guest-args", guest_args])
        .arg("--stats-file")
        .arg(&stats)
        .output()
        .expect("cannot run vmm");
    assert!(out.status.success(), "{guest_args}: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&stats).expect("stats file");
    let _ = std::fs::remove_file(&stats);
    let s: serde_json::Value = serde_json::from_str(&text).expect("stats JSON");
    s["guest"]["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|r| r["scenario"] == scenario)
        .unwrap_or_else(|| panic!("no {scenario} result"))
        .clone()
}

/// A `vmm` with an API socket, its stdout collected as it comes.
pub struct Vm {
    pub child: Child,
    pub socket: PathBuf,
    stats: PathBuf,
    stdout: Arc<Mutex<String>>,
}

impl Vm {
    /// Starts `vmm run` with the default guest, `args`, an API socket and a stats file.
    pub fn start(args: &[&str]) -> Vm {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket = std::env::temp_dir().join(format!("bench-{}-{n}.sock", std::process::id()));
        let stats = std::env::temp_dir().join(format!("bench-{}-{n}.json", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["run", "--kernel"])
            .arg(guest_image())
            .args(args)
            .arg("--api-socket")
            .arg(&socket)
            .arg("--stats-file")
            .arg(&stats)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run vmm");
        let stdout = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("stdout");
        let sink = Arc::clone(&stdout);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = sink.lock().expect("stdout");
                s.push_str(&line);
                s.push('\n');
            }
        });
        let vm = Vm { child, socket, stats, stdout };
        vm.wait_until(Duration::from_secs(30), || vm.socket.exists());
        vm
    }

    /// What the guest printed so far.
    pub fn output(&self) -> String {
        self.stdout.lock().expect("stdout").clone()
    }

    /// Polls `cond` every 2 ms for at most `timeout`.
    pub fn wait_until(&self, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < timeout, "the guest did not get there in {timeout:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A request whose answer must be 2xx; its body as JSON (or null).
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let (code, body) = client::request(&self.socket, method, path, body).expect("the API answers");
        assert!((200..300).contains(&code), "{method} {path}: {code} {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    }

    /// The VMM's RSS.
    pub fn rss_mib(&self) -> u64 {
        rss_kib(self.child.id()) / 1024
    }

    /// Waits for the guest to finish by itself; returns its stdout and the stats.
    pub fn wait(self) -> (String, Value) {
        self.end(false)
    }

    /// Asks the guest to finish and waits for a clean exit (or the VMM's stop after grace).
    pub fn finish(self) -> (String, Value) {
        self.end(true)
    }

    fn end(mut self, ask: bool) -> (String, Value) {
        if ask {
            let _ = client::request(&self.socket, "PUT", "/actions", Some(r#"{"action_type": "Shutdown"}"#));
        }
        let mut stderr = String::new();
        let _ = std::io::Read::read_to_string(self.child.stderr.as_mut().expect("stderr"), &mut stderr);
        let code = self.child.wait().expect("vmm").code().unwrap_or(-1);
        assert!(code == 0 || code == i32::from(vmm::exit_code::STOPPED), "vmm exited {code}: {stderr}");
        let stats = std::fs::read_to_string(&self.stats).ok().and_then(|t| serde_json::from_str(&t).ok());
        let _ = std::fs::remove_file(&self.stats);
        // The reader thread finishes with the pipe.
        std::thread::sleep(Duration::from_millis(50));
        (self.output(), stats.unwrap_or(Value::Null))
    }
}

#[path = "../../../tests/common/guest_output.rs"]
mod guest_output;
// Each benchmark uses part of these.
#[allow(unused_imports)]
pub use guest_output::{results, rss_kib};

/// First touches (`scenario=touch`) of `size_mib` MiB allocated with `flags`, `pct` percent
/// of its pages at random (100: every page in order), under `--memory memory`, in `rounds`
/// passes in one VM (each allocates, touches and frees its memory): (ns per page touched in
/// the fastest pass, second-level faults and frames made resident per page touched in the
/// last).
pub fn first_touch(memory: &str, size_mib: u64, flags: u32, pct: u64, rounds: u64) -> (u64, u64, f64) {
    let guest = format!("scenario=touch size={size_mib}M flags={flags} pct={pct} seed=9 rounds={rounds}");
    let r = run_scenario(memory, &guest, "touch");
    let touched = r["touched"].as_u64().expect("touched").max(1);
    #[allow(clippy::cast_precision_loss)]
    let inflation = r["installed"].as_u64().expect("installed") as f64 / touched as f64;
    (r["ns_per_page"].as_u64().expect("ns"), r["faults"].as_u64().expect("faults"), inflation)
}

/// A `@result` field as a number (the parser keeps big numbers as text), 0 if it is missing.
pub fn number(r: &Value, k: &str) -> f64 {
    r[k].as_f64().or_else(|| r[k].as_str().and_then(|s| s.parse().ok())).unwrap_or(0.0)
}

/// The median of `v` (the upper one of an even count), if there is any value.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// A fresh private anonymous read-write mapping of `len` bytes (the caller unmaps it).
pub fn anon_mapping(len: usize) -> *mut libc::c_void {
    // SAFETY: a new private anonymous mapping chosen by the kernel; it overlaps nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    p
}
