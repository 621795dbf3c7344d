//! vCPUs: the initial register state (64-bit mode, CPL3, no BIOS) and the run loop, which
//! dispatches port I/O to the VMM's devices and reports how the vCPU ended.

use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_dtable, kvm_fpu, kvm_regs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use protocol::{
    CONSOLE_BUF, CPU_PAGE_ARGS, CPU_PAGE_CONSOLE, CPU_PAGE_TICK_MASK, CPU_PAGE_TICK_PENDING, CPU_PAGE_TRAP_CR2,
    layout::BOOT_INFO_VA, port, status,
};

use crate::boot::{CpuBoot, GuestBoot, idt_from_handlers, tables};
use crate::console::LineBuffer;
use crate::memcall::{MemCallCtx, MemCallError};
use crate::shared::VmShared;

/// CR0 bits.
mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const WP: u64 = 1 << 16;
    pub const PG: u64 = 1 << 31;
}
/// CR4 bits.
mod cr4 {
    pub const PAE: u64 = 1 << 5;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
}
/// EFER bits.
mod efer {
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
}
/// RFLAGS bit 1 is reserved and always set. Interrupts stay off (there are none); IOPL stays 0:
/// the TSS I/O bitmap grants the protocol's ports (see `boot::tables`).
const RFLAGS_RESERVED: u64 = 1 << 1;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {cpu}")]
    Create {
        cpu: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot read the host's supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("cannot set up vCPU {cpu}: {what}")]
    Setup {
        cpu: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM_RUN failed on vCPU {cpu}")]
    Run {
        cpu: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    MemCall(#[from] MemCallError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("the vCPU thread panicked")]
    Panicked,
}

/// How a vCPU stopped running.
#[derive(Debug)]
pub enum VcpuEnd {
    /// The guest wrote its exit status.
    GuestExit { status: u32 },
    /// The guest triple-faulted.
    Crashed { reason: String, regs: String },
    /// KVM failed or exited in a way the VMM does not handle.
    KvmFailed { reason: String, regs: String },
    /// The VMM failed serving this vCPU.
    Failed(VcpuError),
    /// The VM is being stopped from outside; this vCPU left `KVM_RUN`.
    Stopped,
}

/// The host's supported CPUID, to be patched per vCPU.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VcpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(VcpuError::SupportedCpuid)
}

/// Puts `fd` in 64-bit mode at CPL3 at the image entry, with its stack, `rdi` = vCPU id,
/// `rsi` = `BootInfo` address, GS base = its [`protocol::CpuPage`].
pub fn configure(fd: &VcpuFd, cpuid: &CpuId, boot: &GuestBoot, cpu: &CpuBoot) -> Result<(), VcpuError> {
    let setup = |what, source| VcpuError::Setup { cpu: cpu.id, what, source };
    let mut cpuid = cpuid.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            // Initial APIC id in EBX[31:24].
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (cpu.id << 24),
            // x2APIC id.
            0xb | 0x1f => e.edx = cpu.id,
            _ => {}
        }
    }
    fd.set_cpuid2(&cpuid).map_err(|e| setup("CPUID", e))?;

    let mut s = fd.get_sregs().map_err(|e| setup("reading sregs", e))?;
    s.cr0 = cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::PG;
    s.cr3 = boot.cr3;
    s.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT;
    s.efer = efer::LME | efer::LMA | efer::NXE;
    s.cs = tables::user_segment(true);
    let data = tables::user_segment(false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.ss = data;
    s.gs = data;
    s.gs.base = cpu.cpu_page_va;
    s.tr = tables::tss_segment(cpu.id, cpu.tss_va);
    s.gdt = kvm_dtable { base: boot.gdt_va, limit: boot.gdt_limit, padding: [0; 3] };
    let idt_limit = u16::try_from(tables::NR_EXCEPTION_VECTORS * 16 - 1).expect("small");
    s.idt = kvm_dtable { base: boot.idt_va, limit: idt_limit, padding: [0; 3] };
    fd.set_sregs(&s).map_err(|e| setup("sregs", e))?;

    let regs = kvm_regs {
        rip: boot.image.entry,
        // As if `_start` had been called: rsp + 8 is 16-byte aligned.
        rsp: cpu.stack_top - 8,
        rdi: u64::from(cpu.id),
        rsi: BOOT_INFO_VA,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(|e| setup("registers", e))?;

    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    fd.set_fpu(&fpu).map_err(|e| setup("FPU", e))?;
    Ok(())
}

/// One vCPU's exit, copied out of the shared `kvm_run` page.
enum Exit {
    Out(u16, u32),
    In(u16),
    Mmio(u64),
    Shutdown,
    InternalError,
    FailEntry(u64),
    Intr,
    Other(String),
}

/// A running vCPU and its per-vCPU device state.
pub struct Vcpu {
    pub boot: CpuBoot,
    fd: VcpuFd,
    shared: Arc<VmShared>,
    /// Console line being assembled.
    line: LineBuffer,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("boot", &self.boot).finish_non_exhaustive()
    }
}

impl Vcpu {
    pub fn new(boot: CpuBoot, fd: VcpuFd, shared: Arc<VmShared>) -> Self {
        Vcpu { boot, fd, shared, line: LineBuffer::default() }
    }

    /// Runs until the guest exits or something fails.
    pub fn run(mut self) -> VcpuEnd {
        let end = self.run_loop();
        self.flush_console();
        end
    }

    fn memcalls(&self) -> MemCallCtx<'_> {
        MemCallCtx {
            mm: &self.shared.mm,
            ram: &self.shared.ram,
            counters: &self.shared.memcalls,
            rings: &self.shared.rings,
        }
    }

    fn run_loop(&mut self) -> VcpuEnd {
        let cpu = self.boot.id;
        if cpu == 0 {
            self.shared.timing.mark_first_run();
        }
        loop {
            if self.shared.stopping() {
                return VcpuEnd::Stopped;
            }
            if let Some((seq, va)) = self.shared.notifier.pending_for(cpu) {
                self.enter_notify_handler(seq, va);
            }
            if let Some(va) = self.shared.ticks.due(cpu) {
                self.tick(va);
            }
            let exit = match self.fd.run() {
                Ok(e) => Self::copy_exit(e),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Intr,
                Err(source) => return VcpuEnd::Failed(VcpuError::Run { cpu, source }),
            };
            if cpu == 0 {
                self.shared.timing.mark_first_exit();
            }
            self.shared.counters.exits.inc();
            match exit {
                Exit::Out(p, v) => {
                    if let Some(ev) = self.port_out(p, v) {
                        return ev;
                    }
                }
                Exit::In(p) => {
                    self.shared.counters.bad_port.inc_logged(|| log::warn!("vCPU {cpu}: read from port {p:#x}"))
                }
                Exit::Mmio(a) => {
                    self.shared.counters.bad_port.inc_logged(|| log::warn!("vCPU {cpu}: MMIO access at {a:#x}"))
                }
                Exit::Intr => {
                    if let Some(p) = &self.shared.profiler
                        && p.wanted(cpu)
                        && let Ok(regs) = self.fd.get_regs()
                    {
                        p.record(cpu, regs.rip);
                    }
                }
                Exit::Shutdown => {
                    return VcpuEnd::Crashed { reason: "triple fault".into(), regs: self.dump_regs() };
                }
                Exit::InternalError => {
                    return VcpuEnd::KvmFailed { reason: "KVM internal error".into(), regs: self.dump_regs() };
                }
                Exit::FailEntry(r) => {
                    return VcpuEnd::KvmFailed {
                        reason: format!("VM entry failed (hardware reason {r:#x})"),
                        regs: self.dump_regs(),
                    };
                }
                Exit::Other(what) => {
                    return VcpuEnd::KvmFailed { reason: format!("unexpected exit: {what}"), regs: self.dump_regs() };
                }
            }
        }
    }

    fn copy_exit(e: VcpuExit<'_>) -> Exit {
        match e {
            VcpuExit::IoOut(p, d) => {
                let mut b = [0u8; 4];
                let n = d.len().min(4);
                b[..n].copy_from_slice(&d[..n]);
                Exit::Out(p, u32::from_le_bytes(b))
            }
            VcpuExit::IoIn(p, d) => {
                // Unknown ports read as all ones, like an empty ISA bus.
                d.fill(0xff);
                Exit::In(p)
            }
            VcpuExit::MmioRead(a, d) => {
                d.fill(0xff);
                Exit::Mmio(a)
            }
            VcpuExit::MmioWrite(a, _) => Exit::Mmio(a),
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::InternalError => Exit::InternalError,
            VcpuExit::FailEntry(r, _) => Exit::FailEntry(r),
            VcpuExit::Intr => Exit::Intr,
            other => Exit::Other(format!("{other:?}")),
        }
    }

    /// Handles `out port, value`; `Some` ends the vCPU.
    fn port_out(&mut self, p: u16, v: u32) -> Option<VcpuEnd> {
        let c = &self.shared.counters;
        match p {
            port::CONSOLE_PUTC => {
                c.console.inc();
                self.console_bytes(&[v.to_le_bytes()[0]]);
            }
            port::CONSOLE_WRITE => {
                c.console.inc();
                let len = (v as usize).min(CONSOLE_BUF);
                let mut buf = vec![0u8; len];
                let gpa = GuestAddress(self.boot.cpu_page_gpa.0 + CPU_PAGE_CONSOLE);
                if self.shared.ram.mem().read_slice(&mut buf, gpa).is_ok() {
                    self.console_bytes(&buf);
                }
            }
            port::EXIT => return Some(VcpuEnd::GuestExit { status: v }),
            port::TRAP_INFO => {
                c.trap_info.inc();
                let cr2 = self.fd.get_sregs().map(|s| s.cr2).unwrap_or(0);
                let gpa = GuestAddress(self.boot.cpu_page_gpa.0 + CPU_PAGE_TRAP_CR2);
                let _ = self.shared.ram.mem().write_obj(cr2, gpa);
            }
            port::SET_IDT => self.set_idt(v),
            port::MEMCALL => {
                if let Err(e) = crate::memcall::doorbell(self.memcalls(), &self.boot, v) {
                    return Some(VcpuEnd::Failed(e.into()));
                }
            }
            port::LAZY_FAULT => {
                let cr2 = self.fd.get_sregs().map(|s| s.cr2).unwrap_or(u64::MAX);
                if let Err(e) = crate::memcall::lazy_fault(self.memcalls(), &self.boot, cr2, v) {
                    return Some(VcpuEnd::Failed(e.into()));
                }
            }
            port::NOP => c.nop.inc(),
            port::SET_NOTIFY => self.set_notify(),
            port::NOTIFY_DONE => self.shared.notifier.done(v),
            port::SET_TICK => self.set_tick(v),
            port::IDLE => self.idle(),
            port::WAKE => {
                if !self.shared.ticks.wake(v) {
                    self.shared.ticks.counters.refused.inc();
                }
            }
            _ => c.bad_port.inc_logged(|| log::warn!("vCPU {}: write to port {p:#x}", self.boot.id)),
        }
        None
    }

    /// SET_NOTIFY: registers the guest's notification handler on this vCPU, if it lies in
    /// executable image pages.
    fn set_notify(&mut self) {
        let args = GuestAddress(self.boot.cpu_page_gpa.0 + CPU_PAGE_ARGS);
        let mem = self.shared.ram.mem();
        let va: u64 = mem.read_obj(args).unwrap_or(0);
        let st = if self.shared.exec_ranges.iter().any(|&(s, e)| s <= va && va < e) {
            self.shared.notifier.register(self.boot.id, va);
            status::OK
        } else {
            self.shared.notifier.counters.refused.inc();
            status::EINVAL
        };
        let _ = mem.write_obj(st, args);
    }

    /// Enters the guest's notification handler for `seq` (see [`Self::enter_handler`]).
    fn enter_notify_handler(&mut self, seq: u64, va: u64) {
        let ok = self.enter_handler(va);
        self.shared.notifier.delivered(seq, ok);
    }

    /// Enters a guest handler at `va` like a signal: pushes the interrupted RFLAGS and RIP onto
    /// its stack (through its own page tables, which must let it write there) and resumes at
    /// `va`. Returns whether it could (a stack that cannot take the frame gets nothing).
    fn enter_handler(&mut self, va: u64) -> bool {
        match self.fd.get_regs() {
            Ok(mut regs) => {
                let sp = regs.rsp.wrapping_sub(16);
                let mut frame = [0u8; 16];
                frame[..8].copy_from_slice(&regs.rflags.to_le_bytes());
                frame[8..].copy_from_slice(&regs.rip.to_le_bytes());
                let written = self.shared.mm().write_user(sp, &frame).unwrap_or(false);
                regs.rsp = sp;
                regs.rip = va;
                written && self.fd.set_regs(&regs).is_ok()
            }
            Err(_) => false,
        }
    }

    /// A due tick: entered unless the guest masks ticks, then only marked pending. The mask is
    /// set on entry; the guest clears it.
    fn tick(&mut self, va: u64) {
        let shared = Arc::clone(&self.shared);
        let mem = shared.ram.mem();
        let mask = GuestAddress(self.boot.cpu_page_gpa.0 + CPU_PAGE_TICK_MASK);
        let pending = GuestAddress(self.boot.cpu_page_gpa.0 + CPU_PAGE_TICK_PENDING);
        if mem.read_obj::<u64>(mask).unwrap_or(1) != 0 {
            let _ = mem.write_obj(1u64, pending);
            self.shared.ticks.counters.masked.inc();
            return;
        }
        let _ = mem.write_obj(1u64, mask);
        if self.enter_handler(va) {
            self.shared.ticks.counters.delivered.inc();
        } else {
            let _ = mem.write_obj(0u64, mask);
        }
    }

    /// SET_TICK: ticks every `period_us` into the handler at `args[0]`, if it lies in
    /// executable image pages.
    fn set_tick(&mut self, period_us: u32) {
        let args = GuestAddress(self.boot.cpu_page_gpa.0 + CPU_PAGE_ARGS);
        let mem = self.shared.ram.mem();
        let va: u64 = mem.read_obj(args).unwrap_or(0);
        let st = if period_us == 0 || self.shared.exec_ranges.iter().any(|&(s, e)| s <= va && va < e) {
            self.shared.ticks.set(self.boot.id, va, u64::from(period_us));
            status::OK
        } else {
            self.shared.ticks.counters.refused.inc();
            status::EINVAL
        };
        let _ = mem.write_obj(st, args);
    }

    /// IDLE: sleeps for at most `args[0]` ns, until woken, or until the VM has something for
    /// this vCPU.
    fn idle(&mut self) {
        let args = GuestAddress(self.boot.cpu_page_gpa.0 + CPU_PAGE_ARGS);
        let ns: u64 = self.shared.ram.mem().read_obj(args).unwrap_or(0);
        let timeout = if ns == 0 { crate::ticks::MAX_IDLE } else { Duration::from_nanos(ns) };
        let cpu = self.boot.id;
        let shared = &self.shared;
        // A vCPU going to sleep leaves a host CPU the slab service may use.
        shared.ticks.idle(
            cpu,
            timeout,
            || shared.stopping() || shared.notifier.pending_for(cpu).is_some(),
            || shared.rings.unpark(),
        );
    }

    /// Installs the guest's exception handlers into the IDT after checking each one.
    fn set_idt(&mut self, n: u32) {
        let n = (n as usize).min(tables::NR_EXCEPTION_VECTORS);
        let args = GuestAddress(self.boot.cpu_page_gpa.0 + CPU_PAGE_ARGS);
        let mut raw = vec![0u8; n * 8];
        let mem = self.shared.ram.mem();
        let result = mem.read_slice(&mut raw, args).ok().and_then(|()| {
            let handlers: Vec<u64> =
                raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
            idt_from_handlers(&handlers, &self.shared.exec_ranges).ok()
        });
        let st = match result {
            Some(idt) => {
                // The IDT page is resident (built at boot) and supervisor-only.
                if mem.write_slice(&idt, self.shared.idt_gpa).is_ok() { status::OK } else { status::EFAULT }
            }
            None => status::EINVAL,
        };
        let _ = mem.write_obj(st, args);
    }

    fn console_bytes(&mut self, bytes: &[u8]) {
        let (shared, cpu) = (&self.shared, self.boot.id);
        self.line.push(bytes, |l| shared.console_line(cpu, l));
    }

    fn flush_console(&mut self) {
        let (shared, cpu) = (&self.shared, self.boot.id);
        self.line.flush(|l| shared.console_line(cpu, l));
    }

    /// The vCPU's registers, for fatal-error reports.
    fn dump_regs(&self) -> String {
        let r = match self.fd.get_regs() {
            Ok(r) => r,
            Err(e) => return format!("(registers unavailable: {e})"),
        };
        let s = self.fd.get_sregs().ok();
        let mut out = format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        );
        if let Some(s) = s {
            out.push_str(&format!(
                " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
            ));
        }
        out
    }
}
