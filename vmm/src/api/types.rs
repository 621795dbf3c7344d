//! Request and response bodies. Requests refuse unknown fields.

use serde::{Deserialize, Serialize};

/// `GET /balloon`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonView {
    pub amount_mib: u64,
    pub deflate_on_oom: bool,
    pub stats_polling_interval_s: u64,
}

/// `PATCH /balloon`: any of the fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonPatch {
    pub amount_mib: Option<u64>,
    pub deflate_on_oom: Option<bool>,
    pub stats_polling_interval_s: Option<u64>,
}

/// `PATCH /swap`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapPatch {
    pub limit_mib: Option<u64>,
}

/// `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action_type: String,
}

/// One node's balloon in `GET /balloon/statistics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBalloon {
    pub node: u32,
    pub target_pages: u64,
    pub actual_pages: u64,
}

/// `GET /balloon/statistics`: Firecracker's fields (memory figures in bytes, as Firecracker),
/// then this VMM's own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalloonStatistics {
    pub target_pages: u64,
    pub actual_pages: u64,
    pub target_mib: u64,
    pub actual_mib: u64,
    /// Pages brought back from, and sent to, host-side swap.
    pub swap_in: u64,
    pub swap_out: u64,
    /// Faults the guest took that needed host I/O (swap-ins), and that did not (the #PF it
    /// resolved through FAULT, as it last reported).
    pub major_faults: u64,
    pub minor_faults: u64,
    /// Guest RAM the buddy allocators hold free.
    pub free_memory: u64,
    pub total_memory: u64,
    /// Free memory plus what the guest said it could drop from its caches.
    pub available_memory: u64,
    /// What the guest said it holds in caches.
    pub disk_caches: u64,
    /// Per NUMA node.
    pub nodes: Vec<NodeBalloon>,
    /// Allocations that deflated the balloon instead of failing, and the pages they took.
    pub deflates_on_oom: u64,
    pub oom_deflated_pages: u64,
    /// Times the guest was asked (a notification), and how often it took the request.
    pub reclaim_requests: u64,
    pub reclaim_notifications: u64,
    /// Milliseconds since the guest last reported its statistics (`null`: never).
    pub guest_report_age_ms: Option<u64>,
    /// Microseconds the last completed inflate took, from the new target to the balloon
    /// holding all of it (`null`: none yet).
    pub last_inflate_us: Option<u64>,
}
