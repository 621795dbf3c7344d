//! What the VMM asks of the guest: the shared page (read-only, updated by the VMM) and the
//! notification handler the VMM enters, like a signal, when the page changes (see
//! `protocol::port::SET_NOTIFY`). The handler only records what changed; scenarios poll it.

use core::arch::global_asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use protocol::layout::SHARED_VA;
use protocol::shared::{SHARED_MAGIC, SharedPage};
use protocol::{exit, port, status};

use crate::arch;
use crate::console::RawConsole;

/// The last seq the handler saw, and how many times it ran.
static SEEN: AtomicU64 = AtomicU64::new(0);
static ENTRIES: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .section .text.notify, "ax"
    .global notify_entry
    // Entered by the VMM with [rsp] = interrupted RFLAGS, [rsp + 8] = interrupted RIP, and every
    // other register as it was: save what the call may clobber, align, call, restore, return.
    notify_entry:
        push rax
        push rcx
        push rdx
        push rsi
        push rdi
        push r8
        push r9
        push r10
        push r11
        push rbx
        mov rbx, rsp
        and rsp, -16
        cld
        call {handler}
        mov rsp, rbx
        pop rbx
        pop r11
        pop r10
        pop r9
        pop r8
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rax
        popfq
        ret
    "#,
    handler = sym on_notify,
);

unsafe extern "C" {
    fn notify_entry();
}

extern "C" fn on_notify() {
    let seq = page().seq;
    SEEN.store(seq, Ordering::Release);
    ENTRIES.fetch_add(1, Ordering::Relaxed);
    arch::out32(port::NOTIFY_DONE, seq as u32);
}

/// The shared page as it is now.
pub fn page() -> SharedPage {
    // SAFETY: the VMM maps the shared page read-only at SHARED_VA for every guest; reading it
    // whole with a volatile load sees each 8-byte field as the VMM stored it.
    unsafe { core::ptr::read_volatile(SHARED_VA as *const SharedPage) }
}

/// Whether the VMM asked the guest to finish.
pub fn shutdown_requested() -> bool {
    page().shutdown != 0
}

/// Times the notification handler ran.
pub fn entries() -> u64 {
    ENTRIES.load(Ordering::Acquire)
}

/// Registers the notification handler on this vCPU (vCPU 0 at boot).
pub fn install() {
    if page().magic != SHARED_MAGIC {
        let _ = writeln!(RawConsole, "guest: the shared page is missing");
        arch::exit(exit::VERIFY_FAILED);
    }
    let cpu_page = arch::cpu_page();
    // SAFETY: this vCPU's CpuPage; the VMM writes the status into args[0] during the exit.
    let st = unsafe {
        (*cpu_page).args[0] = notify_entry as *const () as u64;
        arch::out32(port::SET_NOTIFY, 0);
        core::ptr::read_volatile(&(*cpu_page).args[0])
    };
    if st != status::OK {
        let _ = writeln!(RawConsole, "guest: the VMM refused the notification handler (status {st})");
        arch::exit(exit::EXCEPTION);
    }
}
