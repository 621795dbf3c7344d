//! The VM: KVM objects, guest memory, vCPU threads, and how a run ends.

use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use kvm_ioctls::Kvm;

use crate::api::{ApiError, ApiServer};
use crate::boot::image::ImageError;
use crate::boot::{self, BootError};
use crate::config::VmConfig;
use crate::config::{Affinity, Backing, HugeLeaves, Kernel, Placement};
use crate::control::{self, VmControl};
use crate::exit_code;
use crate::layout;
use crate::memory::backing::BackingError;
use crate::memory::backing::fault::FaultError;
use crate::memory::backing::fault::FaultHandler;
use crate::memory::backing::ram::RamError;
use crate::memory::backing::swap::SwapError;
use crate::memory::backing::swap::file::SwapFileError;
use crate::memory::backing::uffd::UffdError;
use crate::memory::{MemoryError, MemoryManager};
use crate::metrics::Timing;
use crate::notify::Notifier;
use crate::profile::{Profiler, Symbols};
use crate::rings::Rings;
use crate::seccomp::{self, SeccompError, ThreadKind};
use crate::shared::VmShared;
use crate::signals::Request;
use crate::stats::{ExitInfo, Stats};
use crate::swapper::{Swapper, SwapperError};
use crate::sync::ThreadInit;
use crate::sync::lock;
use crate::vcpu::{self, Vcpu, VcpuEnd, VcpuError};
use protocol::shared::{SHARED_MAGIC, SharedPage};

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
    Placement(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Api(#[from] ApiError),
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
            VmError::KvmOpen(_) | VmError::Memory(MemoryError::Backing(BackingError::Uffd(UffdError::Create(_)))) => {
                exit_code::UNAVAILABLE
            }
            VmError::TooManyVcpus { .. }
            | VmError::VmmVcpuLimit(_)
            | VmError::MemoryTooLarge { .. }
            | VmError::NoHostNode { .. }
            | VmError::Placement(_)
            | VmError::Api(ApiError::InUse(_) | ApiError::NotASocket(_) | ApiError::Bind { .. })
            | VmError::Memory(MemoryError::Backing(BackingError::Ram(
                RamError::Map { .. } | RamError::NoHostNode { .. },
            )))
            | VmError::Memory(MemoryError::Backing(BackingError::Swap(
                SwapError::NoMove | SwapError::File(SwapFileError::Create { .. }),
            ))) => exit_code::USAGE,
            VmError::Image(_) | VmError::Boot(BootError::Image(_)) => exit_code::BAD_IMAGE,
            VmError::StatsFile { .. } => exit_code::IO,
            _ => exit_code::SOFTWARE,
        }
    }
}

/// How a vCPU or helper thread reports to the main thread.
#[derive(Debug)]
pub enum VmEvent {
    /// A vCPU stopped.
    Vcpu { cpu: u32, end: VcpuEnd },
    /// A process signal.
    Signal(Request),
    /// The control API asks for a shutdown (named).
    Shutdown(&'static str),
    /// The guest did not finish within [`SHUTDOWN_GRACE`] of a shutdown request.
    GraceOver,
    /// A fault handler thread failed.
    FaultFailed(FaultError),
    /// The swapper failed.
    SwapFailed(SwapperError),
    /// A helper thread could not start (its kind, the error).
    ThreadFailed(&'static str, String),
}

/// How long a guest asked to finish (SIGTERM, SIGINT, the shutdown action) has before the VMM
/// stops it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long a clean stop waits for the vCPUs to leave `KVM_RUN`.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the VMM waits, once the VM has ended, for the memory manager to gather its final
/// figures before it ends without them.
const FINAL_STATS_GRACE: Duration = Duration::from_secs(10);

/// The main thread's inbox; every thread holds a sender.
#[derive(Debug, Clone)]
struct Events(Arc<Mutex<Sender<VmEvent>>>);

impl Events {
    fn send(&self, ev: VmEvent) {
        // The receiver lives as long as the VM; a send can only fail during exit.
        let _ = lock(&self.0).send(ev);
    }
}

/// How the run ended.
#[derive(Debug)]
pub enum Ending {
    /// The guest exited with this status.
    Guest(u32),
    /// The guest crashed or KVM failed; the message has the vCPU's registers.
    Fatal { code: u8, message: String },
    /// Stopped from outside (by this signal) before the guest finished.
    Stopped(&'static str),
}

impl Ending {
    /// How the run ends when vCPU `cpu` stops with `end`.
    fn of_vcpu(cpu: u32, end: VcpuEnd) -> Ending {
        match end {
            VcpuEnd::GuestExit { status } if status <= protocol::exit::GUEST_MAX => Ending::Guest(status),
            VcpuEnd::GuestExit { status } => Ending::Fatal {
                code: exit_code::GUEST_PROTOCOL,
                message: format!(
                    "the guest exited with status {status}, outside its range 0-{}",
                    protocol::exit::GUEST_MAX
                ),
            },
            VcpuEnd::Crashed { reason, regs } => {
                Ending::Fatal { code: exit_code::GUEST_CRASH, message: format!("guest {reason} on vCPU {cpu}: {regs}") }
            }
            VcpuEnd::KvmFailed { reason, regs } => {
                Ending::Fatal { code: exit_code::KVM, message: format!("{reason} on vCPU {cpu}: {regs}") }
            }
            // Only a stop the main thread asked for ends a vCPU this way.
            VcpuEnd::Stopped => Ending::Stopped("a stop request"),
            VcpuEnd::Failed(error) => {
                let error = VmError::Vcpu(error);
                Ending::Fatal {
                    code: error.exit_code(),
                    message: format!("vCPU {cpu}: {}", crate::error_chain(&error)),
                }
            }
        }
    }

    /// The stats JSON's `exit`.
    fn info(&self) -> ExitInfo {
        ExitInfo {
            code: self.exit_code(),
            guest_status: match self {
                Ending::Guest(s) => Some(*s),
                Ending::Fatal { .. } | Ending::Stopped(_) => None,
            },
            error: match self {
                Ending::Guest(_) => None,
                Ending::Fatal { message, .. } => Some(message.clone()),
                Ending::Stopped(signal) => Some(format!("stopped by {signal} before the guest finished")),
            },
        }
    }

    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Ending::Guest(s) => (s & 0xff) as u8,
            Ending::Fatal { code, .. } => *code,
            Ending::Stopped(_) => exit_code::STOPPED,
        }
    }
}

/// A configured VM, ready to run.
pub struct Vm {
    cfg: VmConfig,
    _kvm: Kvm,
    shared: Arc<VmShared>,
    vcpus: Vec<Vcpu>,
    events: Receiver<VmEvent>,
    sender: Events,
    faults: Option<Arc<FaultHandler>>,
    /// The vCPU threads, once started.
    threads: Vec<JoinHandle<()>>,
    /// The host CPUs of the vCPU threads and the rings' service (`--cpus affinity=`).
    placement: Placement,
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
                && !crate::memory::backing::ram::host_node_exists(h.node)
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

        let placement = placement(&cfg)?;

        let vm_fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        // vCPU fds first: vCPU 0 tells the guest TSC rate that goes into BootInfo.
        let mut fds = Vec::with_capacity(cfg.cpus as usize);
        for cpu in 0..cfg.cpus {
            fds.push(vm_fd.create_vcpu(u64::from(cpu)).map_err(|source| VcpuError::Create { cpu, source })?);
        }
        let tsc_khz = fds[0].get_tsc_khz().unwrap_or(0);
        let kvm_stats = crate::kvmstats::KvmStats::open(&vm_fd, &fds);
        // The manager maps guest RAM and owns the VM fd from here: it registers memslots as
        // frames come into use.
        let bindings: Vec<_> = cfg.numa.nodes.iter().map(|n| n.host).collect();
        let mut mm = MemoryManager::new(
            &ranges,
            &bindings,
            &cfg.numa.distance,
            Some(vm_fd),
            cfg.fault_around,
            cfg.fault_around_max,
        )?;
        mm.set_huge_leaves(match cfg.huge_leaves {
            HugeLeaves::On => true,
            HugeLeaves::Off => false,
            HugeLeaves::Auto => crate::host::has_tdp(),
        });
        let boot = boot::build(&mut mm, &cfg, image, tsc_khz)?;
        // Boot wrote what it needed with plain stores; from here on, untouched memory faults to
        // the VMM.
        let faults = match cfg.backing {
            Backing::Demand => None,
            Backing::Uffd | Backing::Auto => Some(mm.enable_userfaultfd()?),
        };
        if let Some(handler) = faults.as_ref().filter(|_| cfg.backing == Backing::Auto) {
            handler.allow_kernel_first_touch();
        }
        let swapper = match (&cfg.swap, &faults) {
            (Some(sc), Some(handler)) => Some(Arc::new(Swapper::new(mm.enable_swap(handler, sc)?, sc.clone()))),
            _ => None,
        };
        let (tx, rx) = channel();
        let balloon = mm.configure_balloon(cfg.balloon)?;
        let mut page = SharedPage { magic: SHARED_MAGIC, ..SharedPage::default() };
        crate::notify::balloon_fields(&mut page, &balloon, mm.frames().total_pages());
        let notifier = Notifier::new(boot.shared_gpa, page);
        notifier.update(mm.ram(), |_| {});
        let rings = Rings::new(mm.ram().mem(), boot.cpus.iter().map(|c| (c.id, c.node, c.cpu_page_gpa.0)), cfg.rings)
            .map_err(|e| VmError::Thread(std::io::Error::other(e.to_string())))?;
        let profiler = cfg.profile.as_ref().map(|p| {
            let symbols = match &cfg.kernel {
                Kernel::Embedded(bytes) => Symbols::from_elf(bytes),
                Kernel::Path(path) => std::fs::read(path).map(|b| Symbols::from_elf(&b)).unwrap_or_default(),
            };
            Arc::new(Profiler::new(cfg.cpus, p.hz, symbols))
        });
        let mut shared = VmShared::new(
            cfg.clone(),
            ranges,
            boot.image,
            mm,
            Timing::new(start),
            boot.exec_ranges.clone(),
            boot.idt_gpa,
            notifier,
            swapper,
            rings,
            cfg.cpus,
            kvm_stats,
        );
        shared.profiler = profiler;
        let shared = Arc::new(shared);
        let mut vcpus = Vec::with_capacity(fds.len());
        for (fd, cb) in fds.into_iter().zip(&boot.cpus) {
            vcpu::configure(&fd, &cpuid, &boot, cb)?;
            vcpus.push(Vcpu::new(*cb, fd, Arc::clone(&shared)));
        }
        let sender = Events(Arc::new(Mutex::new(tx)));
        Ok(Vm { cfg, _kvm: kvm, shared, vcpus, events: rx, sender, faults, threads: Vec::new(), placement })
    }

    /// The guest profiler, when `--profile` asked for one (its report is complete once
    /// [`Vm::run`] returns).
    pub fn profiler(&self) -> Option<Arc<Profiler>> {
        self.shared.profiler.clone()
    }

    /// Runs the guest to its end. Returns how it ended and the final stats.
    pub fn run(mut self) -> Result<(Ending, Option<Stats>), VmError> {
        if self.cfg.seccomp {
            seccomp::enable()?;
        }
        let filter = |kind: ThreadKind| -> ThreadInit { Arc::new(move || Ok(seccomp::apply(kind)?)) };
        // Threads vCPUs wait on run ahead of the vCPUs (see `sync::URGENT_NICE`).
        let urgent = |kind: ThreadKind| -> ThreadInit {
            Arc::new(move || {
                crate::sync::set_thread_nice(crate::sync::URGENT_NICE);
                Ok(seccomp::apply(kind)?)
            })
        };
        let events = self.sender.clone();
        let signals = crate::signals::forward(filter(ThreadKind::Signals), move |r| events.send(VmEvent::Signal(r)));
        crate::signals::install_vcpu_kick().map_err(VmError::Thread)?;
        if let Some(f) = self.faults.take() {
            let events = self.sender.clone();
            let threads = (self.cfg.cpus as usize).clamp(1, 4);
            f.spawn(threads, urgent(ThreadKind::Fault), Arc::new(move |e| events.send(VmEvent::FaultFailed(e))))
                .map_err(VmError::Thread)?;
        }
        if let Some(s) = &self.shared.swapper {
            let events = self.sender.clone();
            Arc::clone(s)
                .spawn(
                    Arc::clone(&self.shared) as Arc<dyn crate::swapper::MemoryLock>,
                    urgent(ThreadKind::Swapper),
                    move |e| {
                        events.send(VmEvent::SwapFailed(e));
                    },
                )
                .map_err(VmError::Thread)?;
        }
        for v in self.vcpus.drain(..) {
            let cpu = v.boot.id;
            let events = self.sender.clone();
            let pin = self.placement.vcpus.get(cpu as usize).cloned().flatten();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{cpu}"))
                .spawn(move || {
                    pin_to(pin.as_deref(), "vCPU");
                    let end = match seccomp::apply(ThreadKind::Vcpu) {
                        // A panic is a VMM bug: report it as this vCPU's failure, do not hang.
                        Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| v.run()))
                            .unwrap_or(VcpuEnd::Failed(VcpuError::Panicked)),
                        Err(e) => VcpuEnd::Failed(e.into()),
                    };
                    events.send(VmEvent::Vcpu { cpu, end });
                })
                .map_err(VmError::Thread)?;
            self.threads.push(t);
        }
        if self.shared.rings.has_service() {
            // The slab rings' service: refills and drains them while the vCPUs run.
            let shared = Arc::clone(&self.shared);
            let pin = self.placement.service.clone();
            let init: ThreadInit = Arc::new(move || {
                crate::sync::set_timer_slack(1000);
                pin_to(pin.as_deref(), "rings service");
                Ok(seccomp::apply(ThreadKind::Rings)?)
            });
            let events = self.sender.clone();
            std::thread::Builder::new()
                .name("rings".into())
                .spawn(move || {
                    let res = init().map_err(|e| e.to_string()).and_then(|()| {
                        shared
                            .rings
                            .run_service(&shared.mm, || shared.stopping(), || shared.ticks.sleeping())
                            .map_err(|e| crate::error_chain(&e))
                    });
                    if let Err(e) = res {
                        events.send(VmEvent::ThreadFailed("slab rings", e));
                    }
                })
                .map_err(VmError::Thread)?;
        }
        let pthreads: Vec<libc::pthread_t> = self.threads.iter().map(|t| t.as_pthread_t() as libc::pthread_t).collect();
        self.shared.notifier.set_threads(pthreads.clone());
        self.shared.ticks.set_threads(pthreads.clone());
        {
            // The ticker: kicks vCPUs whose guest asked for timer ticks (idle otherwise).
            let shared = Arc::clone(&self.shared);
            let init = filter(ThreadKind::Ticker);
            let events = self.sender.clone();
            std::thread::Builder::new()
                .name("ticker".into())
                .spawn(move || match init() {
                    Ok(()) => shared.ticks.run_ticker(|| shared.stopping()),
                    Err(e) => events.send(VmEvent::ThreadFailed("ticker", e.to_string())),
                })
                .map_err(VmError::Thread)?;
        }
        if let Some(p) = self.shared.profiler.clone() {
            // The sampler: kicks the vCPUs that run guest code, `hz` times a second.
            let shared = Arc::clone(&self.shared);
            let threads = pthreads;
            let init = filter(ThreadKind::Ticker);
            let events = self.sender.clone();
            std::thread::Builder::new()
                .name("profiler".into())
                .spawn(move || match init() {
                    Ok(()) => p.run(&threads, |i| !shared.ticks.is_idle(i), || shared.stopping()),
                    Err(e) => events.send(VmEvent::ThreadFailed("profiler", e.to_string())),
                })
                .map_err(VmError::Thread)?;
        }
        let _api = match &self.cfg.api_socket {
            Some(path) => {
                let events = self.sender.clone();
                let control = VmControl::new(
                    Arc::clone(&self.shared),
                    Box::new(move || events.send(VmEvent::Shutdown("the shutdown action"))),
                );
                Some(ApiServer::start(path, Arc::new(control), filter(ThreadKind::Api))?)
            }
            None => None,
        };
        seccomp::apply(ThreadKind::Main)?;
        let mut grace: Option<(Instant, &'static str)> = None;
        let ending = loop {
            let ev = match grace {
                Some((deadline, _)) => {
                    match self.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(ev) => ev,
                        Err(_) => VmEvent::GraceOver,
                    }
                }
                None => self.events.recv().expect("the VM holds a sender"),
            };
            match ev {
                VmEvent::Signal(Request::DumpStats) => self.dump_stats(),
                VmEvent::Signal(Request::Stop(reason)) | VmEvent::Shutdown(reason) => {
                    if grace.is_none() {
                        // Ask the guest to finish; stop it if it has not by the deadline.
                        self.shared.notifier.request(&self.shared.ram, |p| p.shutdown = 1);
                        grace = Some((Instant::now() + SHUTDOWN_GRACE, reason));
                    }
                }
                VmEvent::GraceOver => {
                    self.stop_vcpus();
                    break Ending::Stopped(grace.map_or("a stop request", |g| g.1));
                }
                VmEvent::Vcpu { cpu, end } => break Ending::of_vcpu(cpu, end),
                VmEvent::FaultFailed(e) => {
                    let code = if e.is_guest_error() {
                        exit_code::GUEST_MEMORY
                    } else if e.is_swap_read_error() {
                        exit_code::IO
                    } else {
                        exit_code::SOFTWARE
                    };
                    break Ending::Fatal { code, message: format!("fault handler: {}", crate::error_chain(&e)) };
                }
                VmEvent::ThreadFailed(kind, e) => {
                    break Ending::Fatal { code: exit_code::SOFTWARE, message: format!("the {kind} thread: {e}") };
                }
                VmEvent::SwapFailed(e) => {
                    let code = if e.is_read_error() { exit_code::IO } else { exit_code::SOFTWARE };
                    break Ending::Fatal { code, message: format!("swap: {}", crate::error_chain(&e)) };
                }
            }
        };
        if let Some(s) = &self.shared.swapper {
            s.stop();
        }
        drop(signals);
        // A thread stuck with the memory manager's lock (on a guest-memory fault no handler
        // serves any more, after a handler failed) must not keep the VMM from ending: without
        // the lock within the grace period, it ends without its final figures.
        let deadline = Instant::now() + FINAL_STATS_GRACE;
        while let Err(std::sync::TryLockError::WouldBlock) = self.shared.mm.try_lock() {
            if Instant::now() >= deadline {
                return Ok((ending, None));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let stats = self.stats(Some(&ending));
        Ok((ending, Some(stats)))
    }

    fn dump_stats(&self) {
        let s = self.stats(None);
        eprintln!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    }

    /// Makes every vCPU leave `KVM_RUN` and its run loop: sets the stop flag, then kicks the
    /// threads (again, until each has reported, since a kick that lands outside `KVM_RUN` is
    /// lost) for at most [`STOP_TIMEOUT`].
    fn stop_vcpus(&mut self) {
        self.shared.stop();
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut running = self.threads.len();
        while running > 0 && Instant::now() < deadline {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(crate::signals::vcpu_kick());
            }
            match self.events.recv_timeout(Duration::from_millis(10)) {
                Ok(VmEvent::Vcpu { .. }) => running -= 1,
                Ok(VmEvent::Signal(Request::DumpStats)) => self.dump_stats(),
                Ok(_) | Err(_) => {}
            }
        }
        if running > 0 {
            log::warn!("{running} vCPUs did not stop within {STOP_TIMEOUT:?}");
        }
    }

    /// The stats now; with `ending`, the final ones (allocator invariants checked with `-v`).
    fn stats(&self, ending: Option<&Ending>) -> Stats {
        control::stats(&self.shared, ending.map(Ending::info))
    }
}

/// Guest-physical address width from CPUID leaf 0x8000_0008 (36 if absent).
fn guest_phys_bits(cpuid: &kvm_bindings::CpuId) -> u32 {
    cpuid.as_slice().iter().find(|e| e.function == 0x8000_0008).map(|e| e.eax & 0xff).filter(|&b| b > 0).unwrap_or(36)
}

/// Where `--cpus affinity=` puts the vCPU threads and the rings' service on this host.
fn placement(cfg: &VmConfig) -> Result<Placement, VmError> {
    let allowed = match cfg.affinity {
        Affinity::Off => Vec::new(),
        _ => crate::host::allowed_cpus().unwrap_or_else(|e| {
            log::warn!("cannot read this process's CPU affinity ({e}); assuming every online CPU");
            (0..std::thread::available_parallelism().map_or(1, |n| n.get()))
                .filter_map(|c| u32::try_from(c).ok())
                .collect()
        }),
    };
    Ok(crate::config::place(&cfg.affinity, cfg.cpus, &allowed)?)
}

/// Pins the calling thread to `cpus`, if given (a failure is logged: the thread then runs
/// anywhere, which costs speed, not correctness).
fn pin_to(cpus: Option<&[u32]>, what: &str) {
    if let Some(c) = cpus
        && let Err(e) = crate::host::pin_current_thread(c)
    {
        log::warn!("cannot pin the {what} thread to host CPUs {c:?}: {e}");
    }
}
