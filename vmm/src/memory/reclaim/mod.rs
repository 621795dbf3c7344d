//! Reclaim: taking memory back from a running guest. The balloon (the guest gives frames up on
//! request, and the VMM holds them) is here; host-side swap joins it. Reclaim sits on top of
//! the other layers and calls down; none of them knows it.

pub mod balloon;
pub mod swap;
