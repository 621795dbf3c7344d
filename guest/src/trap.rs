//! Exception handling at CPL3. The VMM builds the IDT from the handler table installed here
//! (`port::SET_IDT`); exceptions arrive without a privilege change, on the current stack (double
//! faults on the IST stack). An unexpected exception prints the vector, error code, RIP and CR2
//! and stops the VM with `exit::EXCEPTION`.
//!
//! Expected page faults go through probes: `probe_read`/`probe_write` touch memory with one
//! instruction each; a #PF at exactly that instruction resumes at a fixup that reports the fault,
//! like the Linux kernel's exception table.

use core::arch::global_asm;
use core::fmt::Write;

use protocol::{exit, port, status};

use crate::arch;
use crate::console::RawConsole;

/// Registers saved by the stubs, then what the CPU pushed.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

global_asm!(
    r#"
    .section .text.traps, "ax"
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    trap_stub_\n:
    .if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
        push 0
    .endif
        push \n
        jmp trap_common
    .endr

    trap_common:
        push r15
        push r14
        push r13
        push r12
        push r11
        push r10
        push r9
        push r8
        push rbp
        push rdi
        push rsi
        push rdx
        push rcx
        push rbx
        push rax
        mov rdi, rsp
        cld
        call {handler}
        pop rax
        pop rbx
        pop rcx
        pop rdx
        pop rsi
        pop rdi
        pop rbp
        pop r8
        pop r9
        pop r10
        pop r11
        pop r12
        pop r13
        pop r14
        pop r15
        add rsp, 16
        iretq

    .global probe_read
    probe_read:
        xor edx, edx
    probe_read_insn:
        mov rax, qword ptr [rdi]
        ret
    probe_read_fixup:
        mov edx, 1
        xor eax, eax
        ret

    .global probe_write
    probe_write:
        xor eax, eax
    probe_write_insn:
        mov qword ptr [rdi], rsi
        ret
    probe_write_fixup:
        mov eax, 1
        ret

    .section .rodata.traps, "a"
    .balign 8
    trap_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad trap_stub_\n
    .endr
    fixup_table:
        .quad probe_read_insn, probe_read_fixup
        .quad probe_write_insn, probe_write_fixup
    "#,
    handler = sym trap_handler,
);

/// `rax` = value, `rdx` = 1 if the read faulted.
#[repr(C)]
pub struct ProbeRead {
    pub value: u64,
    pub faulted: u64,
}

unsafe extern "C" {
    static trap_stub_table: [u64; 32];
    static fixup_table: [[u64; 2]; 2];
    fn probe_read(addr: u64) -> ProbeRead;
    fn probe_write(addr: u64, value: u64) -> u64;
}

/// A page fault taken by a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub addr: u64,
    pub error: u64,
}

/// Page-fault error-code bits.
pub mod pf {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
}

crate::percpu! {
    /// The last probe fault per vCPU.
    static LAST_FAULT: Fault = Fault { addr: 0, error: 0 };
}

/// Page faults resolved by backing a lazy region (all vCPUs).
pub static LAZY_FAULTS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Reads the 8 bytes at `addr`, or reports the page fault.
pub fn read(addr: u64) -> Result<u64, Fault> {
    // SAFETY: probe_read performs one 8-byte load; a #PF there is caught by the fixup table and
    // turned into `faulted = 1`. Any other fault is fatal, as for a plain load.
    let r = unsafe { probe_read(addr) };
    if r.faulted == 0 { Ok(r.value) } else { Err(*LAST_FAULT.get()) }
}

/// Writes 8 bytes at `addr`, or reports the page fault.
pub fn write(addr: u64, value: u64) -> Result<(), Fault> {
    // SAFETY: as in `read`, for one 8-byte store to memory the caller chose to test.
    let faulted = unsafe { probe_write(addr, value) };
    if faulted == 0 { Ok(()) } else { Err(*LAST_FAULT.get()) }
}

/// Asks the VMM to install the exception stubs in the IDT.
pub fn install() {
    let page = arch::cpu_page();
    // SAFETY: page is this vCPU's CpuPage; trap_stub_table is a static table of 32 addresses.
    unsafe {
        for (v, &h) in trap_stub_table.iter().enumerate() {
            (*page).args[v] = h;
        }
    }
    arch::out32(port::SET_IDT, 32);
    // SAFETY: the VMM wrote the status into args[0] during the exit.
    let st = unsafe { core::ptr::read_volatile(&(*page).args[0]) };
    if st != status::OK {
        let _ = writeln!(RawConsole, "guest: the VMM refused the exception handlers (status {st})");
        arch::exit(exit::EXCEPTION);
    }
}

/// Reports a #PF to the VMM (one exit): it backs the page if the address is in a lazy region.
/// Returns whether the access can be retried, and CR2 (unreadable at CPL3).
fn page_fault(error: u64) -> (bool, u64) {
    arch::out32(port::LAZY_FAULT, error as u32);
    let page = arch::cpu_page();
    // SAFETY: the VMM wrote both fields of this vCPU's CpuPage during the exit.
    unsafe {
        (core::ptr::read_volatile(&(*page).fault_status) == status::OK, core::ptr::read_volatile(&(*page).trap_cr2))
    }
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV",
    "#VC",
    "#SX security",
    "reserved",
];

extern "C" fn trap_handler(f: &mut TrapFrame) {
    let mut cr2 = 0;
    if f.vector == 14 {
        let (retry, addr) = page_fault(f.error);
        if retry {
            // A lazy region's page now has a frame: run the access again.
            LAZY_FAULTS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
            return;
        }
        cr2 = addr;
        // SAFETY: reading a static table of four addresses.
        let fixups = unsafe { &fixup_table };
        if let Some(&[_, fixup]) = fixups.iter().find(|e| e[0] == f.rip) {
            *LAST_FAULT.get_mut() = Fault { addr: cr2, error: f.error };
            f.rip = fixup;
            return;
        }
    }
    let name = NAMES.get(f.vector as usize).copied().unwrap_or("?");
    let _ = writeln!(
        RawConsole,
        "guest: exception {} ({name}) on cpu {}: error={:#x} rip={:#x} cr2={:#x} rsp={:#x}",
        f.vector,
        arch::cpu_id(),
        f.error,
        f.rip,
        cr2,
        f.rsp
    );
    arch::exit(exit::EXCEPTION);
}
