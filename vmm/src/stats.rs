//! The stats the VMM reports: written as JSON to `--stats-file` at exit, printed as a short table
//! with `-v`, and dumped to stderr on SIGUSR1. The schema is documented in README.md; fields are
//! only ever added.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::boot::image::LoadedImage;
use crate::config::VmConfig;
use crate::console::parse_result;
use crate::layout::RamRange;
use crate::memcall::MemCallReport;
use crate::memory::backing::fault::FaultReport;
use crate::memory::frames::NodeStats;
use crate::memory::reclaim::balloon::BalloonSnapshot;
use crate::memory::reclaim::swap::SwapSnapshot;
use crate::memory::slab::SlabSnapshot;
use crate::memory::space::SpaceCounters;
use crate::memory::{MemorySnapshot, TrimCounters};
use crate::metrics::{Timing, micros};
use crate::notify::NotifyReport;
use crate::shared::ExitCounts;
use crate::swapper::SwapperReport;

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
    /// The slab rings: objects moved by the service thread (no exit) and by SLAB_EXCHANGE.
    pub rings: crate::rings::RingReport,
    pub slab: SlabSnapshot,
    pub balloon: BalloonSnapshot,
    /// Notifications to the guest (the shared page changed).
    pub notify: NotifyReport,
    /// Host-side swap (`null` when it is off).
    pub swap: Option<SwapStats>,
    /// Timer ticks and sleeping vCPUs (guests that schedule threads).
    pub ticks: crate::ticks::TickReport,
    /// KVM's own counters for the VM and its vCPUs (`null` where the kernel has none).
    pub kvm: Option<crate::kvmstats::KvmReport>,
    pub guest: GuestInfo,
}

/// The stats JSON's `swap`: the store's and the clock's figures, and what the swapper does.
#[derive(Debug, Serialize)]
pub struct SwapStats {
    #[serde(flatten)]
    pub swap: SwapSnapshot,
    #[serde(flatten)]
    pub swapper: SwapperReport,
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
    /// `--cpus affinity=` as given (`off`, `auto`, or `{"explicit": [[vcpu, [cpus]], ...]}`).
    pub affinity: crate::config::Affinity,
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
    pub counters: MemoryCounters,
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

/// The memory manager's event counts: the address space's and the manager's own.
#[derive(Debug, Serialize)]
pub struct MemoryCounters {
    #[serde(flatten)]
    pub space: SpaceCounters,
    #[serde(flatten)]
    pub trims: TrimCounters,
}

#[derive(Debug, Serialize)]
pub struct GuestInfo {
    /// Each `@result` line kept as key/value pairs (numbers where they parse as numbers): the
    /// newest lines of each scenario (see `console`).
    pub results: Vec<BTreeMap<String, serde_json::Value>>,
    /// Result lines dropped per scenario to keep the bound.
    pub results_dropped: BTreeMap<String, u64>,
}

/// What the stats are assembled from: each part a snapshot its owner took.
#[derive(Debug)]
pub struct Sources<'a> {
    pub cfg: &'a VmConfig,
    pub ranges: &'a [RamRange],
    pub image: LoadedImage,
    /// How the run ended (`None` while it runs).
    pub exit: Option<ExitInfo>,
    pub timing: &'a Timing,
    pub exits: ExitCounts,
    pub memory: MemorySnapshot,
    /// "ok" or the first broken invariant, when they were checked.
    pub invariants: Option<String>,
    pub memcalls: MemCallReport,
    pub rings: crate::rings::RingReport,
    pub notify: NotifyReport,
    pub swapper: Option<SwapperReport>,
    pub ticks: crate::ticks::TickReport,
    pub kvm: Option<crate::kvmstats::KvmReport>,
    /// The kept result lines, and how many were dropped per scenario.
    pub results: (Vec<String>, BTreeMap<String, u64>),
}

/// The stats JSON's `config` section (also `GET /vm`'s).
pub fn config_info(cfg: &VmConfig, ranges: &[RamRange]) -> ConfigInfo {
    ConfigInfo {
        kernel: cfg.kernel.to_string(),
        memory: cfg.memory,
        cpus: cfg.cpus,
        affinity: cfg.affinity.clone(),
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
    }
}

/// Assembles the stats.
pub fn assemble(src: Sources<'_>) -> Stats {
    let host = crate::host::process_memory();
    let cfg = src.cfg;
    let m = src.memory;
    let metadata = m.frames.metadata_bytes;
    Stats {
        version: STATS_VERSION,
        exit: src.exit,
        config: config_info(cfg, src.ranges),
        timing_us: TimingInfo {
            first_run: src.timing.first_run_us(),
            first_exit: src.timing.first_exit_us(),
            total: micros(src.timing.start.elapsed()),
        },
        host: HostInfo { vm_hwm_kib: host.hwm_kib, vm_rss_kib: host.rss_kib },
        memory: MemoryInfo {
            backing: cfg.backing,
            huge_leaves: m.space.huge_leaves,
            nodes: m
                .frames
                .nodes
                .into_iter()
                .map(|mut n| {
                    n.frames_faulted = m.backing.faulted_per_node.get(n.node as usize).copied().unwrap_or(0);
                    n
                })
                .collect(),
            regions: m.space.regions,
            counters: MemoryCounters { space: m.space.counters, trims: m.trims },
            memslots: m.backing.memslots,
            memslot_bytes: m.backing.memslot_bytes,
            invariants: src.invariants,
            metadata_bytes: metadata,
            metadata_bytes_per_gib: u64::try_from(u128::from(metadata) * (1 << 30) / u128::from(cfg.memory.max(1)))
                .unwrap_or(u64::MAX),
            page_table_pages: m.space.page_table_pages,
            image: src.image,
        },
        exits: src.exits,
        faults: m.backing.faults,
        memcalls: src.memcalls,
        rings: src.rings,
        slab: m.slab,
        balloon: m.balloon,
        notify: src.notify,
        swap: m.swap.zip(src.swapper).map(|(swap, swapper)| SwapStats { swap, swapper }),
        ticks: src.ticks,
        kvm: src.kvm,
        guest: GuestInfo {
            results: src.results.0.iter().map(|l| parse_result(l)).collect(),
            results_dropped: src.results.1,
        },
    }
}

/// The short final report printed at exit: peak RSS, exits, faults, slabs, buddy.
pub fn summary(s: &Stats) -> String {
    let free: u64 = s.memory.nodes.iter().map(|n| n.frames_free).sum();
    let total: u64 = s.memory.nodes.iter().map(|n| n.frames_total).sum();
    let slab_pages: u64 = s.slab.classes.iter().map(|c| c.pages).sum();
    let slabs: u64 = s.slab.classes.iter().map(|c| c.slabs).sum();
    let faults = s.faults.as_ref().map_or(0, |f| f.zero_fill);
    format!(
        "vmm: peak RSS {} MiB; {} exits ({} memory calls in {} doorbells; {} slab objects moved, {} without an exit); {} second-level faults\n\
         vmm: slabs: {} objects active in {} slabs ({} KiB); buddy: {} of {} MiB free; page tables: {} pages",
        s.host.vm_hwm_kib / 1024,
        s.exits.total,
        s.memcalls.calls,
        s.memcalls.doorbells,
        s.rings.objects_out + s.rings.objects_in,
        (s.rings.objects_out + s.rings.objects_in)
            .saturating_sub(s.memcalls.slab_objects_out + s.memcalls.slab_objects_in),
        faults,
        s.slab.active_objects,
        slabs,
        slab_pages * 4,
        (free * 4096) >> 20,
        (total * 4096) >> 20,
        s.memory.page_table_pages
    ) + &swap_summary(s).unwrap_or_default()
}

/// The summary's swap line, when swap is on.
fn swap_summary(s: &Stats) -> Option<String> {
    let w = s.swap.as_ref()?;
    let st = &w.swap.store;
    Some(format!(
        "\nvmm: swap: {} pages out, {} in ({} refaults); {} zero, {} clean; {} MiB written, {} MiB read; limit {} MiB{}",
        st.pages_out,
        st.pages_in,
        st.refaults,
        st.zero_pages,
        st.clean_drops,
        st.file_written_bytes >> 20,
        st.file_read_bytes >> 20,
        st.limit_bytes >> 20,
        if w.swapper.limit_not_met > 0 {
            format!(" (not met {} times)", w.swapper.limit_not_met)
        } else {
            String::new()
        }
    ))
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
            "faults: {} zero-fill ({} pages, window {}K..{}K, p50 {} us, p99 {} us), {} spurious, {} free-frame, {} write-protect, {} zero-page reads ({} written)",
            f.zero_fill,
            f.pages,
            f.fault_around_bytes / 1024,
            f.fault_around_max_bytes / 1024,
            f.latency.p50_ns / 1000,
            f.latency.p99_ns / 1000,
            f.spurious,
            f.free_frame,
            f.write_protect,
            f.zero_page,
            f.zero_written
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
        s.memory.counters.space.discard_calls,
        s.memory.counters.space.invalidations
    );
    if let Some(w) = &s.swap {
        let st = &w.swap.store;
        let _ = writeln!(
            out,
            "swap ({:?}): limit {} MiB, resident {} MiB; {} out, {} in ({} refaults, p50 {} us, p99 {} us); {} zero, {} clean; pool {} pages in {} KiB; file {} pages, {} MiB written",
            w.swapper.state,
            st.limit_bytes >> 20,
            st.resident_bytes >> 20,
            st.pages_out,
            st.pages_in,
            st.refaults,
            st.swap_in_latency.p50_ns / 1000,
            st.swap_in_latency.p99_ns / 1000,
            st.zero_pages,
            st.clean_drops,
            st.compressed_pages,
            st.pool_bytes >> 10,
            st.file_pages,
            st.file_written_bytes >> 20
        );
    }
    let _ = write!(
        out,
        "time: first guest exit {} us, total {} us",
        s.timing_us.first_exit.map_or("-".into(), |v| v.to_string()),
        s.timing_us.total
    );
    out
}
