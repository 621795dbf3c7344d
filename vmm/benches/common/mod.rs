//! What the benchmarks that boot guests share: build the guest image and run one scenario.

// Each benchmark uses part of this.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

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
