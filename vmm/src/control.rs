//! The running VM as the control API and the main thread see it: its stats, its balloon, and
//! the shutdown request.

use std::sync::Arc;

use protocol::PAGE_SIZE;

use crate::api::{BalloonPatch, BalloonStatistics, BalloonView, Control, NodeBalloon, SwapPatch};
use crate::config::{BalloonConfig, MAX_STATS_INTERVAL_S};
use crate::notify::balloon_fields;
use crate::shared::VmShared;
use crate::stats::{self, ExitInfo, Stats};

/// The stats now; with `exit`, the final ones (allocator invariants checked with `-v`).
pub fn stats(shared: &VmShared, exit: Option<ExitInfo>) -> Stats {
    let check = shared.cfg.verbose && exit.is_some();
    let mm = shared.mm();
    stats::assemble(stats::Sources {
        cfg: &shared.cfg,
        ranges: &shared.ranges,
        image: shared.image,
        exit,
        timing: &shared.timing,
        exits: shared.counters.snapshot(),
        memory: mm.snapshot(),
        invariants: check.then(|| mm.check_invariants().err().unwrap_or_else(|| "ok".to_string())),
        memcalls: shared.memcalls.report(),
        notify: shared.notifier.report(),
        swapper: shared.swapper.as_ref().map(|s| s.report()),
        ticks: shared.ticks.report(),
        rings: shared.rings.report(),
        kvm: shared.kvm.report(),
        results: shared.results(),
    })
}

/// The control API's view of the running VM.
pub struct VmControl {
    shared: Arc<VmShared>,
    /// Asks the main thread to shut the VM down.
    shutdown: Box<dyn Fn() + Send + Sync>,
}

impl VmControl {
    pub fn new(shared: Arc<VmShared>, shutdown: Box<dyn Fn() + Send + Sync>) -> Self {
        VmControl { shared, shutdown }
    }
}

impl std::fmt::Debug for VmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmControl").finish_non_exhaustive()
    }
}

const MIB: u64 = 1 << 20;
/// The answer to swap requests when swap is off.
const SWAP_OFF: &str = "swap is off (start the VMM with --swap limit=SIZE)";

impl Control for VmControl {
    fn vm(&self) -> serde_json::Value {
        let state = if self.shared.notifier.shutdown_requested() { "Stopping" } else { "Running" };
        serde_json::json!({
            "state": state,
            "uptime_s": self.shared.timing.start.elapsed().as_secs_f64(),
            "config": stats::config_info(&self.shared.cfg, &self.shared.ranges),
        })
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::to_value(stats(&self.shared, None)).unwrap_or_default()
    }

    fn balloon(&self) -> BalloonView {
        let c = self.shared.mm().balloon().config;
        BalloonView {
            amount_mib: c.size / MIB,
            deflate_on_oom: c.deflate_on_oom,
            stats_polling_interval_s: c.stats_interval_s,
        }
    }

    fn set_balloon(&self, patch: BalloonPatch) -> Result<(), String> {
        let (snapshot, total) = {
            let mut mm = self.shared.mm();
            let cur = mm.balloon().config;
            let size = match patch.amount_mib {
                Some(m) => m.checked_mul(MIB).ok_or_else(|| format!("amount_mib {m} is too large"))?,
                None => cur.size,
            };
            let interval = patch.stats_polling_interval_s.unwrap_or(cur.stats_interval_s);
            if interval > MAX_STATS_INTERVAL_S {
                return Err(format!("stats_polling_interval_s {interval} is above {MAX_STATS_INTERVAL_S}"));
            }
            let config = BalloonConfig {
                size,
                deflate_on_oom: patch.deflate_on_oom.unwrap_or(cur.deflate_on_oom),
                stats_interval_s: interval,
            };
            let snapshot = mm.configure_balloon(config).map_err(|e| e.to_string())?;
            (snapshot, mm.frames().total_pages())
        };
        // Without the manager's lock: the vCPU that takes the notification needs it.
        self.shared.notifier.request(&self.shared.ram, |p| balloon_fields(p, &snapshot, total));
        Ok(())
    }

    fn balloon_statistics(&self) -> BalloonStatistics {
        let (b, frames) = {
            let mm = self.shared.mm();
            (mm.balloon(), mm.frames().snapshot())
        };
        let notify = self.shared.notifier.report();
        let (swap_in, swap_out) = self.shared.swapper.as_ref().map_or((0, 0), |s| {
            let c = &s.store().counters;
            (c.pages_in.get(), c.pages_out.get())
        });
        let free = frames.nodes.iter().map(|n| n.frames_free).sum::<u64>() * PAGE_SIZE;
        let total = frames.nodes.iter().map(|n| n.frames_total).sum::<u64>() * PAGE_SIZE;
        BalloonStatistics {
            target_pages: b.target_frames,
            actual_pages: b.actual_frames,
            target_mib: b.target_frames * PAGE_SIZE / MIB,
            actual_mib: b.actual_frames * PAGE_SIZE / MIB,
            swap_in,
            swap_out,
            major_faults: swap_in,
            minor_faults: b.guest_lazy_faults,
            free_memory: free,
            total_memory: total,
            available_memory: free + b.guest_cache_bytes,
            disk_caches: b.guest_cache_bytes,
            nodes: b
                .nodes
                .iter()
                .map(|n| NodeBalloon { node: n.node, target_pages: n.target_frames, actual_pages: n.actual_frames })
                .collect(),
            deflates_on_oom: b.counters.oom_deflates,
            oom_deflated_pages: b.counters.oom_deflated,
            reclaim_requests: notify.requests,
            reclaim_notifications: notify.deliveries,
            guest_report_age_ms: b.guest_report_age_ms,
            last_inflate_us: b.last_inflate_us,
        }
    }

    fn shutdown(&self) {
        (self.shutdown)();
    }

    fn swap(&self) -> serde_json::Value {
        let Some(swapper) = &self.shared.swapper else { return serde_json::json!({ "enabled": false }) };
        let snapshot = self.shared.mm().snapshot().swap;
        let mut v = serde_json::to_value(snapshot).unwrap_or_default();
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("enabled".into(), true.into());
            m.insert("limit_mib".into(), (swapper.store().limit() / MIB).into());
            if let Ok(serde_json::Value::Object(r)) = serde_json::to_value(swapper.report()) {
                m.extend(r);
            }
        }
        v
    }

    fn set_swap(&self, patch: SwapPatch) -> Result<(), String> {
        let swapper = self.shared.swapper.as_ref().ok_or(SWAP_OFF)?;
        let mib = patch.limit_mib.ok_or("nothing to change: give limit_mib")?;
        let limit = mib.checked_mul(MIB).ok_or_else(|| format!("limit_mib {mib} is too large"))?;
        swapper.set_limit(limit)
    }

    fn swap_action(&self, out: bool) -> Result<(), String> {
        let swapper = self.shared.swapper.as_ref().ok_or(SWAP_OFF)?;
        if out {
            swapper.request_out();
        } else {
            swapper.request_in();
        }
        Ok(())
    }
}
