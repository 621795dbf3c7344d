//! A running `vmm` with an API socket, for tests that talk to it while it runs.

use std::io::BufRead;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm::api::client;

/// A running `vmm` with an API socket; its stdout is collected as it comes.
pub struct Vm {
    pub child: Child,
    pub socket: PathBuf,
    pub stats: PathBuf,
    stdout: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

/// How a `vmm` ended.
pub struct Exit {
    pub code: i32,
    pub stderr: String,
    pub stats: Value,
    /// Everything it printed.
    pub stdout: String,
}

impl Vm {
    pub fn start(args: &[&str]) -> Vm {
        let socket = super::scratch("api.sock");
        let stats = super::scratch("api-stats.json");
        let mut child = Command::new(super::vmm_bin())
            .args(["run", "--kernel"])
            .arg(super::guest_image())
            .arg("--api-socket")
            .arg(&socket)
            .arg("--stats-file")
            .arg(&stats)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot spawn vmm");
        let stdout = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let sink = Arc::clone(&stdout);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let vm = Vm { child, socket, stats, stdout, reader };
        wait_for("the API socket", Duration::from_secs(20), || vm.socket.exists());
        vm
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `(status, body as JSON or null)`.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (code, body) = client::request(&self.socket, method, path, body).expect("the API answers");
        (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    pub fn balloon_stats(&self) -> Value {
        let (code, v) = self.api("GET", "/balloon/statistics", None);
        assert_eq!(code, 200, "{v}");
        v
    }

    /// Waits for the exit and for the last of its output.
    pub fn wait(mut self, timeout: Duration) -> Exit {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() >= timeout {
                self.give_up(timeout);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        let stats = std::fs::read_to_string(&self.stats).map(|t| serde_json::from_str(&t).unwrap()).unwrap_or_default();
        let _ = std::fs::remove_file(&self.stats);
        self.reader.join().unwrap();
        let stdout = self.stdout.lock().unwrap().clone();
        Exit { code: status.code().unwrap_or(-1), stderr: err, stats, stdout }
    }

    /// A VMM that overran its time: its stats (SIGUSR1), its threads' states and kernel stacks,
    /// then SIGKILL and a panic showing what it printed last.
    fn give_up(&mut self, timeout: Duration) -> ! {
        let pid = self.child.id();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid.cast_signed(), libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(500));
        let mut threads = String::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in dir.flatten() {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                let stack = std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
                let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
                threads += &format!("{}\n  wchan {wchan}\n{}\n", stat.trim(), stack.trim());
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err);
        let out = self.stdout.lock().unwrap().clone();
        let tail: String =
            out.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        panic!(
            "vmm did not finish in {timeout:?}\n--- threads\n{threads}--- stderr\n{err}\n--- last stdout lines\n{tail}"
        );
    }

    pub fn output(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// Each test uses part of these.
#[allow(unused_imports)]
pub use super::guest_output::{results, rss_kib};

pub fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("`{k}` missing from {v}"))
}
