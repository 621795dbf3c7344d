//! The guest's `scenario` module for the native harness (`benches/native.rs`): the guest's own
//! workload files, and a `Ctx` for one "vCPU" (the calling thread).

use std::sync::atomic::{AtomicU32, Ordering};

// Linted with the guest crate's settings, where they live.
#[allow(clippy::pedantic, clippy::all)]
#[path = "../../../guest/src/scenario/cachescratch.rs"]
pub mod cachescratch;
// Linted with the guest crate's settings, where they live.
#[allow(clippy::pedantic, clippy::all)]
#[path = "../../../guest/src/scenario/churn.rs"]
pub mod churn;
// Linted with the guest crate's settings, where they live.
#[allow(clippy::pedantic, clippy::all)]
#[path = "../../../guest/src/scenario/larson.rs"]
pub mod larson;
// Linted with the guest crate's settings, where they live.
#[allow(clippy::pedantic, clippy::all)]
#[path = "../../../guest/src/scenario/util.rs"]
pub mod util;
// Linted with the guest crate's settings, where they live.
#[allow(clippy::pedantic, clippy::all)]
#[path = "../../../guest/src/scenario/workload.rs"]
pub mod workload;
// Linted with the guest crate's settings, where they live.
#[allow(clippy::pedantic, clippy::all)]
#[path = "../../../guest/src/scenario/xmalloc.rs"]
pub mod xmalloc;

/// The guest's scenario context: one "vCPU" (a thread of the harness), its boot information
/// and args.
pub struct Ctx {
    pub cpu: u32,
    pub cpus: u32,
    pub bi: &'static protocol::BootInfo,
    pub args: crate::args::Args<'static>,
}

impl Ctx {
    /// Waits for every "vCPU" (the harness's threads).
    pub fn barrier(&self) {
        BARRIER.get().expect("the harness sets the barrier").wait();
    }

    pub fn seed(&self) -> u64 {
        self.bi.seed ^ (u64::from(self.cpu) << 56)
    }
}

pub static STATUS: AtomicU32 = AtomicU32::new(0);

/// The harness's threads' barrier.
pub static BARRIER: std::sync::OnceLock<std::sync::Barrier> = std::sync::OnceLock::new();

pub fn fail(status: u32) {
    let _ = STATUS.compare_exchange(0, status, Ordering::AcqRel, Ordering::Acquire);
}
