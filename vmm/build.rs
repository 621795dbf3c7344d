//! Builds the default guest (`../guest`, for `x86_64-unknown-none`) so that the `vmm` binary
//! carries it: `vmm run` boots it without `--kernel`, wherever the binary is installed.
//!
//! The guest is its own workspace with its own target; it is built here with a cargo that sees
//! none of this build's settings (flags, wrappers, target), into `guest/target` as
//! `images/build.sh` does, so the two share one build.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("vmm/ is inside the repository").to_path_buf();
    let guest = root.join("guest");
    for p in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "linker.ld", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    for p in ["src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join("protocol").join(p).display());
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("guest.elf");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = guest.join("target");

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest).args(["build", "--release", "--quiet", "--target", "x86_64-unknown-none"]);
    // What cargo passes a build script that would change the guest's build: the host's flags,
    // clippy's wrapper, its own configuration from the environment. The jobserver stays.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_MAKEFLAGS")
            || matches!(
                key,
                "RUSTFLAGS" | "RUSTDOCFLAGS" | "RUSTC_WORKSPACE_WRAPPER" | "RUSTC_WRAPPER" | "TARGET" | "HOST"
            )
        {
            cmd.env_remove(key);
        }
    }
    cmd.env("CARGO_TARGET_DIR", &target_dir);
    let status = cmd.status().unwrap_or_else(|e| fail(&format!("cannot run cargo to build the guest: {e}")));
    if !status.success() {
        fail(
            "cannot build the default guest (../guest) for x86_64-unknown-none; if the target is missing, \
             run `rustup target add x86_64-unknown-none` (`make setup` does)",
        );
    }
    copy(&target_dir.join("x86_64-unknown-none/release/guest"), &out);
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = std::fs::copy(from, to) {
        fail(&format!("cannot copy the guest image {} to {}: {e}", from.display(), to.display()));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
