//! Guest-physical memory: the frames, who owns them, and how the guest sees them.

pub mod addr;
pub mod bitmap;
pub mod buddy;
pub mod fault;
pub mod manager;
pub mod memslots;
pub mod page_state;
pub mod pagetable;
pub mod policy;
pub mod populate;
pub mod ram;
pub mod regions;
pub mod slab;
pub mod uffd;
pub mod vaspace;
pub mod zeroed;
