//! Preemption control: the per-vCPU tick mask (`CpuPage::tick_mask`) used as a nesting count.
//! The VMM enters the tick handler only while it is zero, and sets it to 1; code that uses
//! per-vCPU state raises it; a tick that came meanwhile is taken when it drops back to zero.

use core::arch::asm;

use protocol::{CPU_PAGE_TICK_MASK, CPU_PAGE_TICK_PENDING};

/// Raises this vCPU's preemption count (one instruction, so a tick sees it before or after).
#[inline(always)]
pub fn preempt_disable() {
    // SAFETY: increments this vCPU's tick mask word in its CpuPage (GS base); no other effect.
    unsafe { asm!("inc qword ptr gs:[{m}]", m = const CPU_PAGE_TICK_MASK, options(nostack)) };
}

/// Lowers it; at zero, takes a tick that came meanwhile.
#[inline(always)]
pub fn preempt_enable() {
    if preempt_enable_no_resched() == 0 && tick_pending() {
        super::deferred_tick();
    }
}

/// Lowers the count without looking for a deferred tick; returns the new count.
#[inline(always)]
pub(super) fn preempt_enable_no_resched() -> u64 {
    let left: u64;
    // SAFETY: decrements and reads this vCPU's tick mask word (GS base); see `preempt_disable`.
    unsafe {
        asm!(
            "dec qword ptr gs:[{m}]",
            "mov {l}, qword ptr gs:[{m}]",
            m = const CPU_PAGE_TICK_MASK,
            l = out(reg) left,
            options(nostack)
        )
    };
    left
}

pub(super) fn tick_pending() -> bool {
    let p: u64;
    // SAFETY: reads this vCPU's tick_pending word (GS base).
    unsafe {
        asm!("mov {}, qword ptr gs:[{p}]", out(reg) p, p = const CPU_PAGE_TICK_PENDING, options(nostack, readonly))
    };
    p != 0
}

pub(super) fn clear_tick_pending() {
    // SAFETY: writes this vCPU's tick_pending word (GS base), which only this vCPU and the VMM
    // (during its exits) write.
    unsafe { asm!("mov qword ptr gs:[{p}], 0", p = const CPU_PAGE_TICK_PENDING, options(nostack)) };
}

/// Preemption off while it lives.
pub struct NoPreempt(());

impl NoPreempt {
    #[inline(always)]
    pub fn new() -> Self {
        preempt_disable();
        NoPreempt(())
    }
}

impl Drop for NoPreempt {
    #[inline(always)]
    fn drop(&mut self) {
        preempt_enable();
    }
}
