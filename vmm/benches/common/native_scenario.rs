//! The guest's `scenario` module for the native harness (`benches/native.rs`): the guest's own
//! workload files, and a `Ctx` for one "vCPU" (the calling thread).

use std::sync::atomic::{AtomicU32, Ordering};

// Linted with the guest crate's settings, where they live.
#[allow(clippy::pedantic, clippy::all)]
#[path = "../../../guest/src/scenario/churn.rs"]
pub mod churn;
// Linted with the guest crate's settings, where they live.
#[allow(clippy::pedantic, clippy::all)]
#[path = "../../../guest/src/scenario/util.rs"]
pub mod util;
// Linted with the guest crate's settings, where they live.
#[allow(clippy::pedantic, clippy::all)]
#[path = "../../../guest/src/scenario/workload.rs"]
pub mod workload;

/// The guest's scenario context: one "vCPU" (this thread), its boot information and args.
pub struct Ctx {
    pub cpu: u32,
    pub cpus: u32,
    pub bi: &'static protocol::BootInfo,
    pub args: crate::args::Args<'static>,
}

impl Ctx {
    pub fn barrier(&self) {}

    pub fn seed(&self) -> u64 {
        self.bi.seed ^ (u64::from(self.cpu) << 56)
    }
}

pub static STATUS: AtomicU32 = AtomicU32::new(0);

pub fn fail(status: u32) {
    let _ = STATUS.compare_exchange(0, status, Ordering::AcqRel, Ordering::Acquire);
}
