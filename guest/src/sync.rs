//! Spin-based synchronisation between vCPUs.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::arch;

/// A reusable barrier for all vCPUs (sense-reversing).
pub struct Barrier {
    arrived: AtomicU32,
    generation: AtomicU32,
}

impl Barrier {
    pub const fn new() -> Self {
        Barrier { arrived: AtomicU32::new(0), generation: AtomicU32::new(0) }
    }

    /// Waits until `n` vCPUs have arrived.
    pub fn wait(&self, n: u32) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
        } else {
            while self.generation.load(Ordering::Acquire) == generation {
                arch::pause();
            }
        }
    }
}
