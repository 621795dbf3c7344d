//! Per-vCPU data: one slot per vCPU, each touched only by its own vCPU (and that vCPU's
//! exception handlers), so no locking is needed.

use core::cell::UnsafeCell;

use protocol::MAX_VCPUS;

use crate::arch;

/// A slot per vCPU, cache-line aligned so vCPUs do not false-share.
#[repr(align(64))]
pub struct Slot<T>(pub UnsafeCell<T>);

pub struct PerCpu<T> {
    pub slots: [Slot<T>; MAX_VCPUS],
}

/// `percpu!(static NAME: T = CONST_EXPR);` defines a per-vCPU static.
#[macro_export]
macro_rules! percpu {
    ($(#[$m:meta])* $vis:vis static $name:ident: $t:ty = $init:expr;) => {
        $(#[$m])*
        $vis static $name: $crate::percpu::PerCpu<$t> = $crate::percpu::PerCpu {
            slots: [const { $crate::percpu::Slot(core::cell::UnsafeCell::new($init)) }; protocol::MAX_VCPUS],
        };
    };
}

// SAFETY: each slot is only accessed by the vCPU whose id indexes it (see `get_mut`).
unsafe impl<T: Send> Sync for PerCpu<T> {}

impl<T> PerCpu<T> {
    /// This vCPU's value.
    pub fn get(&self) -> &T {
        let slot = &self.slots[arch::cpu_id() as usize % MAX_VCPUS];
        // SAFETY: only the current vCPU accesses its slot.
        unsafe { &*slot.0.get() }
    }

    /// This vCPU's value, mutably. Callers must not hold two of these at once.
    #[allow(clippy::mut_from_ref)]
    pub fn get_mut(&self) -> &mut T {
        let slot = &self.slots[arch::cpu_id() as usize % MAX_VCPUS];
        // SAFETY: only the current vCPU accesses its slot, and callers keep one borrow at a time.
        unsafe { &mut *slot.0.get() }
    }
}

impl PerCpu<u64> {
    /// The sum of the first `cpus` vCPUs' counters (racy reads: for reports).
    pub fn sum(&self, cpus: u32) -> u64 {
        self.slots
            .iter()
            .take(cpus as usize)
            .map(|s| {
                // SAFETY: a volatile read of a u64 another vCPU may be updating; a torn value is
                // impossible for an aligned u64 on x86-64, a stale one is fine for a report.
                unsafe { core::ptr::read_volatile(s.0.get()) }
            })
            .sum()
    }
}
