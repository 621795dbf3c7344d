//! What the vCPU threads and the main thread share while the VM runs: guest RAM, the memory
//! manager, exit and memory-call counters, and the guest's console and result lines.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::GuestAddress;

use crate::boot::image::LoadedImage;
use crate::config::VmConfig;
use crate::console::ResultLog;
use crate::kvmstats::KvmStats;
use crate::layout::RamRange;
use crate::memcall::MemCallCounters;
use crate::memory::MemoryManager;
use crate::memory::backing::ram::GuestRam;
use crate::metrics::{Counter, Timing};
use crate::notify::Notifier;
use crate::rings::Rings;
use crate::swapper::{MemoryLock, Swapper};
use crate::sync::lock;
use crate::ticks::Ticks;

/// Exit counts by kind.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub exits: Counter,
    pub console: Counter,
    pub trap_info: Counter,
    pub nop: Counter,
    pub bad_port: Counter,
}

/// A snapshot of [`ExitCounters`] (the stats JSON's `exits`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExitCounts {
    pub total: u64,
    pub console: u64,
    pub trap_info: u64,
    pub nop: u64,
    pub bad_port: u64,
}

impl ExitCounters {
    pub fn snapshot(&self) -> ExitCounts {
        ExitCounts {
            total: self.exits.get(),
            console: self.console.get(),
            trap_info: self.trap_info.get(),
            nop: self.nop.get(),
            bad_port: self.bad_port.get(),
        }
    }
}

/// What vCPU threads share.
pub struct VmShared {
    /// The configuration the VM runs with.
    pub cfg: VmConfig,
    /// The guest-physical RAM ranges.
    pub ranges: Vec<RamRange>,
    /// Where the guest image went.
    pub image: LoadedImage,
    pub ram: Arc<GuestRam>,
    pub mm: Mutex<MemoryManager>,
    pub counters: ExitCounters,
    pub timing: Timing,
    /// Exclusive ranges of executable image pages (valid exception-handler targets).
    pub exec_ranges: Vec<(u64, u64)>,
    /// Guest-physical address of the IDT.
    pub idt_gpa: GuestAddress,
    pub memcalls: MemCallCounters,
    /// The shared page and the guest's notification handler.
    pub notifier: Notifier,
    /// Host-side swap's thread, when swap is on.
    pub swapper: Option<Arc<Swapper>>,
    /// Timer ticks and sleeping vCPUs, for guests that schedule threads.
    pub ticks: Ticks,
    /// The vCPUs' slab rings and their service thread's wake-up.
    pub rings: Rings,
    pub nr_vcpus: u32,
    /// KVM's own counters (shadow-paging faults, TLB flushes).
    pub kvm: KvmStats,
    /// Sampling of the guest's instruction pointer (`--profile`).
    pub profiler: Option<Arc<crate::profile::Profiler>>,
    /// Set when the VM is being stopped: vCPUs leave their run loop at their next exit.
    stop: AtomicBool,
    /// `@result` lines from the guest (bounded).
    results: Mutex<ResultLog>,
}

impl VmShared {
    /// Shares `mm` (and its guest RAM) with the vCPU threads.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: VmConfig,
        ranges: Vec<RamRange>,
        image: LoadedImage,
        mm: MemoryManager,
        timing: Timing,
        exec_ranges: Vec<(u64, u64)>,
        idt_gpa: GuestAddress,
        notifier: Notifier,
        swapper: Option<Arc<Swapper>>,
        rings: Rings,
        nr_vcpus: u32,
        kvm: KvmStats,
    ) -> Self {
        VmShared {
            cfg,
            ranges,
            image,
            ram: Arc::clone(mm.ram()),
            mm: Mutex::new(mm),
            counters: ExitCounters::default(),
            timing,
            exec_ranges,
            idt_gpa,
            memcalls: MemCallCounters::default(),
            notifier,
            swapper,
            ticks: Ticks::new(nr_vcpus),
            rings,
            nr_vcpus,
            kvm,
            profiler: None,
            stop: AtomicBool::new(false),
            results: Mutex::new(ResultLog::default()),
        }
    }

    /// One complete console line from `cpu`: printed (tagged when several vCPUs run), and kept
    /// when it is a machine-readable result.
    pub fn console_line(&self, cpu: u32, text: &str) {
        if text.starts_with(protocol::RESULT_PREFIX) {
            lock(&self.results).push(text);
        }
        let mut out = std::io::stdout().lock();
        let _ = if self.nr_vcpus > 1 { writeln!(out, "[cpu{cpu}] {text}") } else { writeln!(out, "{text}") };
    }

    /// Asks every vCPU to leave its run loop at its next exit.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.ticks.wake_all();
    }

    /// Whether the VM is being stopped.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// The memory manager.
    pub fn mm(&self) -> MutexGuard<'_, MemoryManager> {
        lock(&self.mm)
    }

    /// The guest's result lines kept so far, in order, and how many were dropped per scenario.
    pub fn results(&self) -> (Vec<String>, std::collections::BTreeMap<String, u64>) {
        let r = lock(&self.results);
        (r.lines(), r.dropped().clone())
    }
}

impl MemoryLock for VmShared {
    fn mm(&self) -> MutexGuard<'_, MemoryManager> {
        lock(&self.mm)
    }
}

impl std::fmt::Debug for VmShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShared").field("nr_vcpus", &self.nr_vcpus).finish_non_exhaustive()
    }
}
