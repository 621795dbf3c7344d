//! The few instructions the guest needs: port I/O to reach the VMM, the TSC, and this vCPU's
//! page (GS base points at its `protocol::CpuPage`).

use core::arch::asm;

use protocol::CpuPage;

/// Writes a byte to an I/O port (one exit to the VMM).
pub fn out8(port: u16, value: u8) {
    // SAFETY: port I/O to a VMM port; the TSS I/O bitmap allows exactly those. No memory
    // operands; the implicit memory clobber orders earlier stores the VMM will read.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) };
}

/// Writes a 32-bit value to an I/O port (one exit to the VMM).
pub fn out32(port: u16, value: u32) {
    // SAFETY: as in `out8`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) };
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the TSC into edx:eax.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Asks for the cache line at `va` in a state to be written (a hint: it never faults, and an
/// unmapped address is ignored).
pub fn prefetch_write(va: u64) {
    // SAFETY: a prefetch never faults and changes no architectural state.
    unsafe { asm!("prefetchw [{}]", in(reg) va, options(nostack, preserves_flags, readonly)) };
}

/// A spin-wait hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// Spins (no exit) for `ms` milliseconds of TSC time.
pub fn spin_ms(ms: u64) {
    let khz = crate::bootinfo::get().map_or(1_000_000, |bi| bi.tsc_khz);
    let t0 = rdtsc();
    while rdtsc() - t0 < ms * khz {
        pause();
    }
}

/// This vCPU's page.
pub fn cpu_page() -> *mut CpuPage {
    let va: u64;
    // SAFETY: the VMM set GS base to this vCPU's CpuPage, whose first field is its own address.
    unsafe { asm!("mov {}, gs:[0]", out(reg) va, options(nostack, preserves_flags, readonly)) };
    va as *mut CpuPage
}

/// This vCPU's id.
pub fn cpu_id() -> u32 {
    let id: u32;
    // SAFETY: reads CpuPage::cpu_id (offset 8) through GS, see `cpu_page`.
    unsafe { asm!("mov {:e}, gs:[8]", out(reg) id, options(nostack, preserves_flags, readonly)) };
    id
}

/// Stops the VM with `status`.
pub fn exit(status: u32) -> ! {
    out32(protocol::port::EXIT, status);
    loop {
        pause();
    }
}
