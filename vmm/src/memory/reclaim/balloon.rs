//! The balloon: a quota on the frames the guest may hold. It holds `size` of guest RAM, taken
//! from each node in proportion to the node's size: free frames first, at no cost, then every
//! frame the guest frees until it holds its share (the frames layer does the taking; see
//! `frames::balloon`). Asking the guest to give memory back is the VM's job (the shared page
//! and its notification); this layer keeps the policy and the figures.

use std::time::{Duration, Instant};

use crate::config::BalloonConfig;
use crate::memory::addr::PAGE_SIZE;
use crate::memory::frames::Frames;
use crate::memory::frames::balloon::{BalloonCounters, BalloonNode};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonError {
    #[error("a balloon of {size} bytes is larger than the guest's {ram} bytes of RAM")]
    TooLarge { size: u64, ram: u64 },
}

/// What only the guest knows, from its last GUEST_STATS call.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestReport {
    /// Bytes in caches it could drop.
    pub cache_bytes: u64,
    /// #PF it resolved through FAULT (minor faults).
    pub lazy_faults: u64,
    pub reports: u64,
    pub at: Option<Instant>,
}

/// The balloon's policy state.
#[derive(Debug, Default)]
pub struct Balloon {
    config: BalloonConfig,
    guest: GuestReport,
    /// When the inflate under way (a larger target not yet held) began.
    inflating: Option<Instant>,
    /// How long the last inflate took, from its target to the balloon holding all of it.
    last_inflate: Option<Duration>,
}

/// The balloon's figures (the stats JSON's `balloon`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct BalloonSnapshot {
    pub config: BalloonConfig,
    pub target_frames: u64,
    pub actual_frames: u64,
    pub nodes: Vec<BalloonNode>,
    pub counters: BalloonCounters,
    /// Bytes in the guest's caches, as it last reported.
    pub guest_cache_bytes: u64,
    pub guest_lazy_faults: u64,
    pub guest_reports: u64,
    /// Milliseconds since the guest last reported (`None`: never).
    pub guest_report_age_ms: Option<u64>,
    /// Microseconds the last completed inflate took, from the new target to the balloon
    /// holding all of it (`None`: none completed yet).
    pub last_inflate_us: Option<u64>,
    /// Whether an inflate is under way (the guest holds frames the balloon wants).
    pub inflating: bool,
}

impl Balloon {
    /// Applies `config` to `frames`: per-node targets in proportion to node sizes. A balloon
    /// larger than guest RAM is refused and changes nothing.
    pub fn configure(&mut self, frames: &mut Frames, config: BalloonConfig) -> Result<(), BalloonError> {
        let total = frames.total_pages();
        let ram = total * PAGE_SIZE;
        if config.size > ram {
            return Err(BalloonError::TooLarge { size: config.size, ram });
        }
        let want = config.size / PAGE_SIZE;
        let before: u64 = frames.balloon_nodes().iter().map(|n| n.target_frames).sum();
        let sizes: Vec<u64> = frames.nodes().iter().map(|n| n.buddy.managed_pages()).collect();
        let lacking = frames.set_balloon(&shares(want, &sizes), config.deflate_on_oom);
        self.config = config;
        if want > before {
            self.inflating.get_or_insert_with(Instant::now);
        } else if want < before {
            self.inflating = None;
        }
        self.filled(lacking);
        Ok(())
    }

    /// After the frames layer took what it could: `lacking` frames are still short of the
    /// target. Ends the inflate under way when nothing is.
    pub fn filled(&mut self, lacking: u64) {
        if lacking == 0
            && let Some(t) = self.inflating.take()
        {
            self.last_inflate = Some(t.elapsed());
        }
    }

    /// The configuration in force (its size drops when deflate-on-OOM gives frames back).
    pub fn config(&self, frames: &Frames) -> BalloonConfig {
        let target: u64 = frames.balloon_nodes().iter().map(|n| n.target_frames).sum();
        BalloonConfig { size: target * PAGE_SIZE, ..self.config }
    }

    /// Records the guest's GUEST_STATS report.
    pub fn guest_report(&mut self, cache_bytes: u64, lazy_faults: u64) {
        self.guest =
            GuestReport { cache_bytes, lazy_faults, reports: self.guest.reports + 1, at: Some(Instant::now()) };
    }

    /// The figures.
    pub fn snapshot(&self, frames: &Frames) -> BalloonSnapshot {
        let nodes = frames.balloon_nodes();
        BalloonSnapshot {
            config: self.config(frames),
            target_frames: nodes.iter().map(|n| n.target_frames).sum(),
            actual_frames: nodes.iter().map(|n| n.actual_frames).sum(),
            counters: frames.balloon_counters().clone(),
            nodes,
            guest_cache_bytes: self.guest.cache_bytes,
            guest_lazy_faults: self.guest.lazy_faults,
            guest_reports: self.guest.reports,
            guest_report_age_ms: self.guest.at.map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
            last_inflate_us: self.last_inflate.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            inflating: self.inflating.is_some(),
        }
    }
}

/// Splits `total` in proportion to `sizes` (largest remainders), never above a size.
fn shares(total: u64, sizes: &[u64]) -> Vec<u64> {
    let sum: u64 = sizes.iter().sum();
    if sum == 0 {
        return vec![0; sizes.len()];
    }
    let exact: Vec<u128> = sizes.iter().map(|&s| u128::from(total) * u128::from(s)).collect();
    let mut out: Vec<u64> = exact.iter().map(|&e| u64::try_from(e / u128::from(sum)).unwrap_or(u64::MAX)).collect();
    let mut left = total - out.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(exact[i] % u128::from(sum)));
    for i in order {
        if left == 0 {
            break;
        }
        if out[i] < sizes[i] {
            out[i] += 1;
            left -= 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_node_sizes_and_add_up() {
        assert_eq!(shares(100, &[300, 100]), vec![75, 25]);
        assert_eq!(shares(3, &[1, 1, 1]), vec![1, 1, 1]);
        assert_eq!(shares(5, &[2, 2, 2]).iter().sum::<u64>(), 5);
        assert_eq!(shares(0, &[5, 5]), vec![0, 0]);
    }
}
