//! The guest payload: runs at CPL3, with the VMM as its kernel.
//!
//! Every vCPU enters `_start` on its own stack with `rdi` = vCPU id and `rsi` = the `BootInfo`
//! address. vCPU 0 zeroes BSS and installs the exception handlers while the others wait; then all
//! run the scenario chosen by `--guest-args scenario=NAME`.

#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod args;
mod bootinfo;
mod console;
mod heap;
mod libc;
mod mem;
mod notify;
mod percpu;
mod rng;
mod scenario;
mod sched;
mod sync;
mod trap;

use core::fmt::Write;
use core::sync::atomic::{AtomicU32, Ordering};

use protocol::exit;

/// Set by vCPU 0 once BSS is zero and the handlers are installed. In `.data`, not `.bss`, so
/// that zeroing BSS cannot clear it under a waiting vCPU.
#[unsafe(link_section = ".data")]
static READY: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" {
    static mut __bss_start: u8;
    static mut __bss_end: u8;
}

fn zero_bss() {
    let start = &raw mut __bss_start;
    let end = &raw mut __bss_end;
    let len = end as usize - start as usize;
    // One memset (`rep stos`), not a store per byte.
    // SAFETY: [__bss_start, __bss_end) is this image's BSS, mapped writable; no Rust code has
    // used it yet (only vCPU 0 runs, before anything reads a BSS static).
    unsafe { core::ptr::write_bytes(start, 0, len) };
}

#[unsafe(no_mangle)]
pub extern "C" fn _start(cpu: u64, _boot_info: u64) -> ! {
    if cpu == 0 {
        zero_bss();
        trap::install();
        notify::install();
        READY.store(1, Ordering::Release);
    } else {
        while READY.load(Ordering::Acquire) == 0 {
            arch::pause();
        }
    }
    let bi = match bootinfo::get() {
        Ok(bi) => bi,
        Err(e) => {
            println!("guest: {e}");
            arch::exit(exit::VERIFY_FAILED);
        }
    };
    scenario::run(cpu as u32, bi)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let _ = writeln!(console::RawConsole, "guest: panic on cpu {}: {info}", arch::cpu_id());
    arch::exit(exit::PANIC)
}
