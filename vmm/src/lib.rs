//! A KVM microVM memory manager: the VMM owns every guest-physical frame (per-node buddy
//! allocators), builds the guest's x86-64 page tables, and backs guest memory on demand.
//!
//! The guest runs at CPL3 with the VMM as its kernel; `protocol` is the contract between them.

pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod ctl;
pub mod fuzz;
pub mod host;
pub mod kvmstats;
pub mod layout;
pub mod memcall;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod profile;
pub mod rings;
pub mod seccomp;
pub mod shared;
pub mod signals;
pub mod stats;
pub mod swapper;
pub mod sync;
pub mod ticks;
pub mod vcpu;
pub mod vm;
pub mod wire;

/// Process exit codes of `vmm`. A guest's own status (0-63) is passed through unchanged; the
/// VMM's failures use these (sysexits-style) codes, so the two never collide.
pub mod exit_code {
    /// Bad command line or configuration, or a configuration this host cannot run.
    pub const USAGE: u8 = 64;
    /// The guest image is missing or invalid.
    pub const BAD_IMAGE: u8 = 65;
    /// KVM (or another host facility) is unavailable.
    pub const UNAVAILABLE: u8 = 69;
    /// An internal VMM failure.
    pub const SOFTWARE: u8 = 70;
    /// The guest crashed (triple fault).
    pub const GUEST_CRASH: u8 = 71;
    /// KVM failed or exited unexpectedly.
    pub const KVM: u8 = 72;
    /// The guest touched memory it was never given, or the fault handler failed.
    pub const GUEST_MEMORY: u8 = 73;
    /// An I/O failure: writing the stats file, or reading a swapped page back from the swap
    /// file (the guest never gets zeros in place of its data).
    pub const IO: u8 = 74;
    /// Stopped from outside (SIGTERM, SIGINT) before the guest finished.
    pub const STOPPED: u8 = 75;
    /// The guest broke the protocol: it exited with a status outside its range (0-63).
    pub const GUEST_PROTOCOL: u8 = 76;
    /// A VMM thread made a system call its seccomp filter forbids.
    pub const SECCOMP: u8 = 77;
}

/// An error and its sources on one line, joined by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        // thiserror's `transparent` repeats the inner message; skip exact repeats.
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}
