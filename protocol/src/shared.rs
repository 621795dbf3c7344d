//! The shared page: what the VMM asks of a running guest, at [`super::layout::SHARED_VA`].
//!
//! The VMM writes it (aligned 8-byte stores, so every field reads whole) and bumps `seq` when
//! it asks something new; the page is read-only to the guest. A guest can poll it, or register
//! a notification handler ([`super::port::SET_NOTIFY`]) to be interrupted when `seq` changes.

/// `SharedPage::magic`.
pub const SHARED_MAGIC: u64 = u64::from_le_bytes(*b"MMVMSHRD");

/// The shared page.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedPage {
    /// [`SHARED_MAGIC`].
    pub magic: u64,
    /// Bumped each time the VMM asks something new.
    pub seq: u64,
    /// Frames the balloon wants to hold (`--balloon size`, `PATCH /balloon`).
    pub balloon_target_frames: u64,
    /// Frames the balloon holds now.
    pub balloon_actual_frames: u64,
    /// Frames the guest may hold: its RAM less the balloon's target. While it holds more, the
    /// balloon takes every frame it frees, and its allocations get ENOMEM.
    pub guest_limit_frames: u64,
    /// Nonzero: the VMM asks the guest to finish (the shutdown action, SIGTERM, SIGINT); it
    /// stops the guest after a grace period otherwise.
    pub shutdown: u64,
    /// How often the VMM wants [`super::memcall::op::GUEST_STATS`], in milliseconds (0: never).
    pub stats_interval_ms: u64,
    /// Nonzero: an allocation that finds no free frame deflates the balloon instead of failing.
    pub deflate_on_oom: u64,
}

const _: () = assert!(core::mem::size_of::<SharedPage>() == 8 * 8);
