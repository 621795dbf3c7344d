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

/// Set by vCPU 0 once the handlers are installed.
static READY: AtomicU32 = AtomicU32::new(0);

#[unsafe(no_mangle)]
pub extern "C" fn _start(cpu: u64, _boot_info: u64) -> ! {
    // BSS is zero at entry: the VMM's loader clears the tail of the last file page of each
    // segment, and the pages after it are fresh.
    if cpu == 0 {
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
