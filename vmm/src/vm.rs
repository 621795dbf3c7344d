//! The VM: KVM objects, guest memory, vCPU threads, and how a run ends.

use std::io::Write;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use kvm_ioctls::Kvm;
use vm_memory::GuestAddress;

use crate::boot::image::ImageError;
use crate::boot::{self, BootError, GuestBoot};
use crate::config::VmConfig;
use crate::config::{Backing, HugeLeaves};
use crate::exit_code;
use crate::layout::{self, RamRange};
use crate::memcall::MemCallCounters;
use crate::memory::fault::{FaultError, FaultHandler, FaultStats};
use crate::memory::manager::{MemoryError, MemoryManager};
use crate::memory::populate::{Populate, ZeroSource};
use crate::memory::ram::{GuestRam, RamError};
use crate::memory::uffd::{Uffd, UffdError};
use crate::metrics::Counter;
use crate::stats::{self, Stats};
use crate::vcpu::{self, Timing, Vcpu, VcpuError};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm (is KVM available, and may this user open it?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("cannot create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("--cpus {cpus}: KVM on this host allows at most {max} vCPUs")]
    TooManyVcpus { cpus: u32, max: usize },
    #[error("--cpus {0}: this VMM supports at most {max} vCPUs", max = protocol::MAX_VCPUS)]
    VmmVcpuLimit(u32),
    #[error("{} of guest RAM ends at {end:#x}, beyond this host's {bits}-bit guest-physical address space", crate::config::ByteSize(*memory))]
    MemoryTooLarge { memory: u64, end: u64, bits: u32 },
    #[error("host NUMA node {host} (for guest node {node}) does not exist on this host")]
    NoHostNode { node: u32, host: u32 },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot set up userfaultfd on guest RAM")]
    Uffd(#[source] UffdError),
    #[error("cannot map the userfaultfd zero buffer")]
    ZeroBuffer(#[source] std::io::Error),
    #[error("cannot write the stats file {path}")]
    StatsFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmError::KvmOpen(_) | VmError::Uffd(UffdError::Create(_)) => exit_code::UNAVAILABLE,
            VmError::TooManyVcpus { .. }
            | VmError::VmmVcpuLimit(_)
            | VmError::MemoryTooLarge { .. }
            | VmError::NoHostNode { .. }
            | VmError::Ram(RamError::Map { .. } | RamError::NoHostNode { .. }) => exit_code::USAGE,
            VmError::Image(_) | VmError::Boot(BootError::Image(_)) => exit_code::BAD_IMAGE,
            VmError::StatsFile { .. } => exit_code::IO,
            _ => exit_code::SOFTWARE,
        }
    }
}

/// How a vCPU or helper thread reports to the main thread.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest wrote its exit status.
    GuestExit { cpu: u32, status: u32 },
    /// The guest triple-faulted.
    GuestCrashed { cpu: u32, reason: String, regs: String },
    /// KVM failed or exited in a way the VMM does not handle.
    KvmFailed { cpu: u32, reason: String, regs: String },
    /// A vCPU thread failed.
    VcpuFailed { cpu: u32, error: Box<VmError> },
    /// SIGUSR1: dump stats while running.
    DumpStats,
    /// A fault handler thread failed.
    FaultFailed(FaultError),
}

impl From<VcpuError> for Box<VmError> {
    fn from(e: VcpuError) -> Self {
        Box::new(VmError::Vcpu(e))
    }
}

/// Exit counts by kind.
#[derive(Debug, Default)]
pub struct VmCounters {
    pub exits: Counter,
    pub console: Counter,
    pub trap_info: Counter,
    pub nop: Counter,
    pub bad_port: Counter,
}

/// What vCPU threads share.
pub struct VmShared {
    pub ram: Arc<GuestRam>,
    pub mm: Mutex<MemoryManager>,
    pub counters: VmCounters,
    pub timing: Timing,
    pub exec_ranges: Vec<(u64, u64)>,
    pub idt_gpa: GuestAddress,
    pub memcalls: MemCallCounters,
    pub fault_stats: Arc<FaultStats>,
    /// Fault-around window in frames (base and largest).
    pub fault_window: u64,
    pub fault_window_max: u64,
    nr_vcpus: u32,
    events: Mutex<Sender<VmEvent>>,
    /// `@result` lines from the guest, in order.
    results: Mutex<Vec<String>>,
}

impl VmShared {
    /// Reports an event to the main thread.
    pub fn send(&self, ev: VmEvent) {
        // The receiver lives as long as the process; a send can only fail during exit.
        let _ = lock(&self.events).send(ev);
    }

    /// One complete console line from `cpu`: printed (tagged when several vCPUs run), and kept
    /// when it is a machine-readable result.
    pub fn console_line(&self, cpu: u32, text: &str) {
        if text.starts_with(protocol::RESULT_PREFIX) {
            lock(&self.results).push(text.to_string());
        }
        let mut out = std::io::stdout().lock();
        let _ = if self.nr_vcpus > 1 { writeln!(out, "[cpu{cpu}] {text}") } else { writeln!(out, "{text}") };
    }

    /// The memory manager.
    pub fn mm(&self) -> MutexGuard<'_, MemoryManager> {
        lock(&self.mm)
    }

    /// The guest's result lines so far.
    pub fn results(&self) -> Vec<String> {
        lock(&self.results).clone()
    }
}

impl std::fmt::Debug for VmShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShared").field("nr_vcpus", &self.nr_vcpus).finish_non_exhaustive()
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the process is about
/// to report that failure anyway).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How the run ended.
#[derive(Debug)]
pub enum Ending {
    /// The guest exited with this status.
    Guest(u32),
    /// The guest crashed or KVM failed; the message has the vCPU's registers.
    Fatal { code: u8, message: String },
}

impl Ending {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Ending::Guest(s) => (s & 0xff) as u8,
            Ending::Fatal { code, .. } => *code,
        }
    }
}

/// A configured VM, ready to run.
pub struct Vm {
    cfg: VmConfig,
    _kvm: Kvm,
    shared: Arc<VmShared>,
    vcpus: Vec<Vcpu>,
    boot: GuestBoot,
    ranges: Vec<RamRange>,
    events: Receiver<VmEvent>,
    faults: Option<Arc<FaultHandler>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("cpus", &self.cfg.cpus).field("memory", &self.cfg.memory).finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates the VM: checks the host, maps guest RAM, loads the image, builds the page tables
    /// and system tables, and sets up every vCPU. Nothing runs yet.
    pub fn create(cfg: VmConfig, start: Instant) -> Result<Vm, VmError> {
        let image = boot::open_image(&cfg.kernel)?;
        let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
        let max = kvm.get_max_vcpus();
        if cfg.cpus as usize > max {
            return Err(VmError::TooManyVcpus { cpus: cfg.cpus, max });
        }
        if cfg.cpus as usize > protocol::MAX_VCPUS {
            return Err(VmError::VmmVcpuLimit(cfg.cpus));
        }
        for n in &cfg.numa.nodes {
            if let Some(h) = n.host
                && !crate::memory::ram::host_node_exists(h.node)
            {
                return Err(VmError::NoHostNode { node: n.id, host: h.node });
            }
        }
        let cpuid = vcpu::supported_cpuid(&kvm)?;
        let sizes: Vec<u64> = cfg.numa.nodes.iter().map(|n| n.size).collect();
        let bits = guest_phys_bits(&cpuid);
        let ranges = layout::ram_ranges(&sizes).unwrap_or_default();
        let end = layout::ram_end(&ranges);
        if ranges.is_empty() || end > 1u64 << bits {
            return Err(VmError::MemoryTooLarge { memory: cfg.memory, end, bits });
        }

        let vm_fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let bindings: Vec<_> = cfg.numa.nodes.iter().map(|n| n.host).collect();
        let ram = Arc::new(GuestRam::new(&ranges, &bindings)?);

        // vCPU fds first: vCPU 0 tells the guest TSC rate that goes into BootInfo.
        let mut fds = Vec::with_capacity(cfg.cpus as usize);
        for cpu in 0..cfg.cpus {
            fds.push(vm_fd.create_vcpu(u64::from(cpu)).map_err(|source| VcpuError::Create { cpu, source })?);
        }
        let tsc_khz = fds[0].get_tsc_khz().unwrap_or(0);
        // The manager owns the VM fd from here: it registers memslots as frames come into use.
        let mut mm =
            MemoryManager::new(Arc::clone(&ram), &cfg.numa.distance, Populate::Direct, Some(vm_fd), cfg.fault_around)?;
        mm.set_huge_leaves(match cfg.huge_leaves {
            HugeLeaves::On => true,
            HugeLeaves::Off => false,
            HugeLeaves::Auto => host_has_tdp(),
        });
        let boot = boot::build(&mut mm, &cfg, image, tsc_khz)?;
        // Boot wrote what it needed with plain stores; from here on, untouched memory faults to
        // the VMM.
        let fault_window = cfg.fault_around / protocol::PAGE_SIZE;
        let fault_stats = Arc::new(FaultStats::new(cfg.numa.nodes.len()));
        let faults = match cfg.backing {
            Backing::Demand => None,
            Backing::Uffd => {
                let uffd = Arc::new(Uffd::new().map_err(VmError::Uffd)?);
                for (hva, len, _) in ram.host_ranges() {
                    // SAFETY: each range is one of our guest RAM mappings, which live as long
                    // as the process (VmShared keeps the GuestRam); faults there are served by
                    // the handler threads started in `run`.
                    unsafe { uffd.register(hva, len, true) }.map_err(VmError::Uffd)?;
                }
                let zero = Arc::new(ZeroSource::new().map_err(VmError::ZeroBuffer)?);
                mm.set_populate(Populate::Uffd { uffd: Arc::clone(&uffd), zero: Arc::clone(&zero) });
                let states = Arc::clone(mm.states());
                Some(Arc::new(FaultHandler::new(
                    uffd,
                    zero,
                    Arc::clone(&ram),
                    states,
                    fault_window,
                    cfg.fault_around_max / protocol::PAGE_SIZE,
                    Arc::clone(&fault_stats),
                )))
            }
        };
        let (tx, rx) = channel();
        let shared = Arc::new(VmShared {
            ram,
            mm: Mutex::new(mm),
            counters: VmCounters::default(),
            timing: Timing::new(start),
            exec_ranges: boot.exec_ranges.clone(),
            idt_gpa: boot.idt_gpa,
            memcalls: MemCallCounters::default(),
            fault_stats,
            fault_window,
            fault_window_max: cfg.fault_around_max / protocol::PAGE_SIZE,
            nr_vcpus: cfg.cpus,
            events: Mutex::new(tx),
            results: Mutex::new(Vec::new()),
        });
        let mut vcpus = Vec::with_capacity(fds.len());
        for (fd, cb) in fds.into_iter().zip(&boot.cpus) {
            vcpu::configure(&fd, &cpuid, &boot, cb)?;
            vcpus.push(Vcpu::new(*cb, fd, Arc::clone(&shared)));
        }
        Ok(Vm { cfg, _kvm: kvm, shared, vcpus, boot, ranges, events: rx, faults })
    }

    /// Runs the guest to its end. Returns how it ended and the final stats.
    pub fn run(mut self) -> Result<(Ending, Stats), VmError> {
        let signals = crate::signals::forward_sigusr1(Arc::clone(&self.shared));
        if let Some(f) = self.faults.take() {
            let shared = Arc::clone(&self.shared);
            let threads = (self.cfg.cpus as usize).clamp(1, 4);
            f.spawn(threads, Arc::new(move |e| shared.send(VmEvent::FaultFailed(e)))).map_err(VmError::Thread)?;
        }
        for v in self.vcpus.drain(..) {
            let name = format!("vcpu{}", v.boot.id);
            std::thread::Builder::new().name(name).spawn(move || v.run()).map_err(VmError::Thread)?;
        }
        let ending = loop {
            let ev = self.events.recv().expect("the VM holds a sender");
            match ev {
                VmEvent::DumpStats => {
                    let s = self.stats(None);
                    eprintln!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                }
                VmEvent::GuestExit { status, .. } => break Ending::Guest(status),
                VmEvent::GuestCrashed { cpu, reason, regs } => {
                    break Ending::Fatal {
                        code: exit_code::GUEST_CRASH,
                        message: format!("guest {reason} on vCPU {cpu}: {regs}"),
                    };
                }
                VmEvent::KvmFailed { cpu, reason, regs } => {
                    break Ending::Fatal { code: exit_code::KVM, message: format!("{reason} on vCPU {cpu}: {regs}") };
                }
                VmEvent::FaultFailed(e) => {
                    let code = if e.is_guest_error() { exit_code::GUEST_MEMORY } else { exit_code::SOFTWARE };
                    break Ending::Fatal { code, message: format!("fault handler: {}", crate::error_chain(&e)) };
                }
                VmEvent::VcpuFailed { cpu, error } => {
                    break Ending::Fatal {
                        code: error.exit_code(),
                        message: format!("vCPU {cpu}: {}", crate::error_chain(&*error)),
                    };
                }
            }
        };
        drop(signals);
        let stats = self.stats(Some(&ending));
        Ok((ending, stats))
    }

    fn stats(&self, ending: Option<&Ending>) -> Stats {
        stats::collect(&self.cfg, &self.shared, &self.boot, &self.ranges, ending)
    }
}

/// Whether KVM uses two-dimensional paging (Intel EPT or AMD NPT) rather than shadow paging.
fn host_has_tdp() -> bool {
    let on = |p: &str| std::fs::read_to_string(p).is_ok_and(|v| matches!(v.trim(), "Y" | "y" | "1"));
    on("/sys/module/kvm_intel/parameters/ept") || on("/sys/module/kvm_amd/parameters/npt")
}

/// Guest-physical address width from CPUID leaf 0x8000_0008 (36 if absent).
fn guest_phys_bits(cpuid: &kvm_bindings::CpuId) -> u32 {
    cpuid.as_slice().iter().find(|e| e.function == 0x8000_0008).map(|e| e.eax & 0xff).filter(|&b| b > 0).unwrap_or(36)
}
