//! The stats the VMM reports: written as JSON to `--stats-file` at exit, printed as a short table
//! with `-v`, and dumped to stderr on SIGUSR1. The schema is documented in README.md; fields are
//! only ever added.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::boot::GuestBoot;
use crate::boot::image::LoadedImage;
use crate::config::VmConfig;
use crate::layout::RamRange;
use crate::memcall::MemCallReport;
use crate::memory::fault::FaultReport;
use crate::memory::manager::{MmCounters, NodeStats};
use crate::memory::slab::{SlabCounters, SlabInfo};
use crate::vcpu::micros;
use crate::vm::{Ending, VmShared};

/// Bumped when a field changes meaning (never for additions).
pub const STATS_VERSION: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Stats {
    pub version: u32,
    /// `None` while the VM is still running (SIGUSR1 dumps).
    pub exit: Option<ExitInfo>,
    pub config: ConfigInfo,
    pub timing_us: TimingInfo,
    pub host: HostInfo,
    pub memory: MemoryInfo,
    pub exits: ExitCounts,
    /// Second-level (userfaultfd) faults; `null` with `backing=demand`.
    pub faults: Option<FaultReport>,
    pub memcalls: MemCallReport,
    pub slab: SlabReport,
    pub guest: GuestInfo,
}

/// Small-object allocator figures.
#[derive(Debug, Serialize)]
pub struct SlabReport {
    /// One entry per size class, like /proc/slabinfo.
    pub classes: Vec<SlabInfo>,
    pub counters: SlabCounters,
    /// Objects handed out (in magazines or in use) at this moment.
    pub active_objects: u64,
    /// Frames in slabs.
    pub frames: u64,
}

#[derive(Debug, Serialize)]
pub struct ExitInfo {
    /// The `vmm` process exit code.
    pub code: u8,
    /// The guest's own status, when it exited by itself.
    pub guest_status: Option<u32>,
    /// Why the VM stopped when it was not the guest's choice.
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct NodeLayout {
    pub id: u32,
    pub size: u64,
    pub cpus: Vec<u32>,
    /// `[start, length]` guest-physical ranges.
    pub ranges: Vec<[u64; 2]>,
    pub host: Option<crate::config::HostBinding>,
}

#[derive(Debug, Serialize)]
pub struct ConfigInfo {
    pub kernel: String,
    pub memory: u64,
    pub cpus: u32,
    pub seed: u64,
    pub guest_args: String,
    pub nodes: Vec<NodeLayout>,
    pub distance: Vec<Vec<u8>>,
}

#[derive(Debug, Serialize)]
pub struct TimingInfo {
    /// From `vmm` start to the first `KVM_RUN`.
    pub first_run: Option<u64>,
    /// From `vmm` start to vCPU 0's first exit (its first instructions have run).
    pub first_exit: Option<u64>,
    /// From `vmm` start to now.
    pub total: u64,
}

#[derive(Debug, Serialize)]
pub struct HostInfo {
    /// Peak resident set of the VMM process (`VmHWM`).
    pub vm_hwm_kib: u64,
    /// Current resident set (`VmRSS`).
    pub vm_rss_kib: u64,
}

#[derive(Debug, Serialize)]
pub struct MemoryInfo {
    pub backing: crate::config::Backing,
    /// Whether HUGE allocations got 2 MiB guest leaves.
    pub huge_leaves: bool,
    pub nodes: Vec<NodeStats>,
    /// Live guest regions.
    pub regions: usize,
    pub counters: MmCounters,
    /// KVM memslots registered so far, and the guest RAM they cover.
    pub memslots: u32,
    pub memslot_bytes: u64,
    /// With `-v` at exit: "ok" or the first broken allocator invariant.
    pub invariants: Option<String>,
    /// Host bytes reserved for allocator and page-state metadata.
    pub metadata_bytes: u64,
    /// `metadata_bytes` per GiB of guest RAM.
    pub metadata_bytes_per_gib: u64,
    pub page_table_pages: u64,
    pub image: LoadedImage,
}

#[derive(Debug, Serialize)]
pub struct ExitCounts {
    pub total: u64,
    pub console: u64,
    pub trap_info: u64,
    pub nop: u64,
    pub bad_port: u64,
}

#[derive(Debug, Serialize)]
pub struct GuestInfo {
    /// Each `@result` line as key/value pairs (numbers where they parse as numbers).
    pub results: Vec<BTreeMap<String, serde_json::Value>>,
}

/// Gathers the stats.
pub fn collect(
    cfg: &VmConfig,
    shared: &VmShared,
    boot: &GuestBoot,
    ranges: &[RamRange],
    ending: Option<&Ending>,
) -> Stats {
    let (hwm, rss) = host_memory();
    let mm = shared.mm();
    let metadata = mm.metadata_bytes();
    let c = &shared.counters;
    Stats {
        version: STATS_VERSION,
        exit: ending.map(|e| ExitInfo {
            code: e.exit_code(),
            guest_status: match e {
                Ending::Guest(s) => Some(*s),
                Ending::Fatal { .. } => None,
            },
            error: match e {
                Ending::Guest(_) => None,
                Ending::Fatal { message, .. } => Some(message.clone()),
            },
        }),
        config: ConfigInfo {
            kernel: cfg.kernel.display().to_string(),
            memory: cfg.memory,
            cpus: cfg.cpus,
            seed: cfg.seed,
            guest_args: cfg.guest_args.clone(),
            nodes: cfg
                .numa
                .nodes
                .iter()
                .map(|n| NodeLayout {
                    id: n.id,
                    size: n.size,
                    cpus: n.cpus.clone(),
                    ranges: ranges.iter().filter(|r| r.node == n.id).map(|r| [r.start, r.len]).collect(),
                    host: n.host,
                })
                .collect(),
            distance: cfg.numa.distance.clone(),
        },
        timing_us: TimingInfo {
            first_run: shared.timing.first_run_us(),
            first_exit: shared.timing.first_exit_us(),
            total: micros(shared.timing.start.elapsed()),
        },
        host: HostInfo { vm_hwm_kib: hwm, vm_rss_kib: rss },
        memory: MemoryInfo {
            backing: cfg.backing,
            huge_leaves: mm.huge_leaves(),
            nodes: mm
                .node_stats()
                .into_iter()
                .map(|mut n| {
                    n.frames_faulted = shared.fault_stats.faulted_per_node[n.node as usize].get();
                    n
                })
                .collect(),
            regions: mm.region_count(),
            counters: mm.counters().clone(),
            memslots: mm.memslots().map_or(0, |s| s.count()),
            memslot_bytes: mm.memslots().map_or(0, |s| s.registered_bytes()),
            invariants: (cfg.verbose && ending.is_some())
                .then(|| mm.check_invariants().err().unwrap_or_else(|| "ok".to_string())),
            metadata_bytes: metadata,
            metadata_bytes_per_gib: u64::try_from(u128::from(metadata) * (1 << 30) / u128::from(cfg.memory.max(1)))
                .unwrap_or(u64::MAX),
            page_table_pages: mm.page_tables().table_pages(),
            image: boot.image,
        },
        exits: ExitCounts {
            total: c.exits.get(),
            console: c.console.get(),
            trap_info: c.trap_info.get(),
            nop: c.nop.get(),
            bad_port: c.bad_port.get(),
        },
        faults: (cfg.backing == crate::config::Backing::Uffd)
            .then(|| shared.fault_stats.report(shared.fault_window, shared.fault_window_max)),
        memcalls: shared.memcalls.report(),
        slab: SlabReport {
            classes: mm.slabs().info(),
            counters: mm.slabs().counters.clone(),
            active_objects: mm.slabs().active(),
            frames: mm.slabs().frames(),
        },
        guest: GuestInfo { results: shared.results().iter().map(|l| parse_result(l)).collect() },
    }
}

/// `@result a=1 b=x` as `{"a": 1, "b": "x"}`.
pub fn parse_result(line: &str) -> BTreeMap<String, serde_json::Value> {
    let body = line.strip_prefix(protocol::RESULT_PREFIX).unwrap_or(line);
    body.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let value = if let Ok(n) = v.parse::<u64>() {
                serde_json::Value::from(n)
            } else if let Ok(n) = v.parse::<i64>() {
                serde_json::Value::from(n)
            } else if let Ok(f) = v.parse::<f64>() {
                serde_json::Value::from(f)
            } else {
                serde_json::Value::from(v)
            };
            (k.to_string(), value)
        })
        .collect()
}

/// `(VmHWM, VmRSS)` in KiB from /proc/self/status.
pub fn host_memory() -> (u64, u64) {
    let m = host_memory_all();
    (m.0, m.1)
}

/// `(VmHWM, VmRSS, RssAnon)` in KiB from /proc/self/status.
pub fn host_memory_all() -> (u64, u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"), field("RssAnon:"))
}

/// The short final report printed at exit: peak RSS, exits, faults, slabs, buddy.
pub fn summary(s: &Stats) -> String {
    let free: u64 = s.memory.nodes.iter().map(|n| n.frames_free).sum();
    let total: u64 = s.memory.nodes.iter().map(|n| n.frames_total).sum();
    let slab_pages: u64 = s.slab.classes.iter().map(|c| c.pages).sum();
    let slabs: u64 = s.slab.classes.iter().map(|c| c.slabs).sum();
    let faults = s.faults.as_ref().map_or(0, |f| f.zero_fill);
    format!(
        "vmm: peak RSS {} MiB; {} exits ({} memory calls in {} doorbells, {} slab objects moved); {} second-level faults\n\
         vmm: slabs: {} objects active in {} slabs ({} KiB); buddy: {} of {} MiB free; page tables: {} pages",
        s.host.vm_hwm_kib / 1024,
        s.exits.total,
        s.memcalls.calls,
        s.memcalls.doorbells,
        s.memcalls.slab_objects_out + s.memcalls.slab_objects_in,
        faults,
        s.slab.active_objects,
        slabs,
        slab_pages * 4,
        (free * 4096) >> 20,
        (total * 4096) >> 20,
        s.memory.page_table_pages
    )
}

/// A short human-readable table (for `-v`).
pub fn table(s: &Stats) -> String {
    let mut out = String::new();
    let mib = |pages: u64| pages * 4096 / (1 << 20);
    let _ =
        writeln!(out, "{:<6} {:>10} {:>10} {:>10} {:>10}", "node", "total MiB", "free MiB", "alloc MiB", "resid MiB");
    for n in &s.memory.nodes {
        let _ = writeln!(
            out,
            "{:<6} {:>10} {:>10} {:>10} {:>10}",
            n.node,
            mib(n.frames_total),
            mib(n.frames_free),
            mib(n.frames_allocated),
            mib(n.frames_resident)
        );
    }
    let _ = writeln!(
        out,
        "exits {} (console {}, nop {}), page tables {} pages, metadata {} KiB/GiB, VMM peak RSS {} MiB",
        s.exits.total,
        s.exits.console,
        s.exits.nop,
        s.memory.page_table_pages,
        s.memory.metadata_bytes_per_gib / 1024,
        s.host.vm_hwm_kib / 1024
    );
    if let Some(f) = &s.faults {
        let _ = writeln!(
            out,
            "faults: {} zero-fill ({} pages, window {}K..{}K, p50 {} us, p99 {} us), {} spurious, {} free-frame, {} write-protect",
            f.zero_fill,
            f.pages,
            f.fault_around_bytes / 1024,
            f.fault_around_max_bytes / 1024,
            f.latency.p50_ns / 1000,
            f.latency.p99_ns / 1000,
            f.spurious,
            f.free_frame,
            f.write_protect
        );
    }
    let m = &s.memcalls;
    let errors: u64 = m.ops.values().map(|o| o.errors).sum();
    let _ = writeln!(
        out,
        "memory calls: {} in {} doorbells ({} per exit), {} errors; regions live {}, discards {}, invalidations {}",
        m.calls,
        m.doorbells,
        m.calls_per_doorbell,
        errors,
        s.memory.regions,
        s.memory.counters.discard_calls,
        s.memory.counters.invalidations
    );
    let _ = write!(
        out,
        "time: first guest exit {} us, total {} us",
        s.timing_us.first_exit.map_or("-".into(), |v| v.to_string()),
        s.timing_us.total
    );
    out
}
