//! KVM memslots, registered lazily in 1 GiB chunks.
//!
//! Under shadow paging KVM allocates and clears about 16 bytes of metadata per 4 KiB page when a
//! memslot is added (rmap and page-tracking arrays): 256 MiB and ~250 ms for a 64 GiB slot, paid
//! at boot whether or not the guest ever uses the memory. The guest can only reach frames the VMM
//! allocated and mapped, so a chunk is registered the first time the buddy hands out a frame in
//! it: boot time and KVM's kernel memory follow what the guest uses, not its size.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::GuestAddress;

use super::ram::{GuestRam, RamError};

/// Memslot granularity.
pub const SLOT_CHUNK: u64 = 1 << 30;

#[derive(Debug, Clone, Copy)]
struct Chunk {
    gpa: u64,
    len: u64,
    slot: Option<u32>,
}

/// The VM's memslots. Holds the guest RAM it registers, so the mappings outlive the slots.
#[derive(Debug)]
pub struct Memslots {
    // Field order: the VM fd closes before the RAM reference is released.
    vm: VmFd,
    chunks: Vec<Chunk>,
    next_slot: u32,
    registered_bytes: u64,
    ram: Arc<GuestRam>,
}

impl Memslots {
    /// Splits every RAM range into chunks aligned to [`SLOT_CHUNK`]; registers none yet.
    pub fn new(vm: VmFd, ram: Arc<GuestRam>) -> Self {
        let mut chunks = Vec::new();
        for r in ram.ranges() {
            let mut at = r.start;
            while at < r.end() {
                let next = ((at / SLOT_CHUNK) + 1) * SLOT_CHUNK;
                let end = next.min(r.end());
                chunks.push(Chunk { gpa: at, len: end - at, slot: None });
                at = end;
            }
        }
        Memslots { vm, chunks, next_slot: 0, registered_bytes: 0, ram }
    }

    /// The VM file descriptor.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Registers every chunk overlapping `[gpa, gpa + len)` that is not registered yet.
    pub fn ensure(&mut self, gpa: GuestAddress, len: u64) -> Result<(), RamError> {
        let end = gpa.0.saturating_add(len);
        let first = self.chunks.partition_point(|c| c.gpa + c.len <= gpa.0);
        for i in first..self.chunks.len() {
            let c = self.chunks[i];
            if c.gpa >= end {
                break;
            }
            if c.slot.is_some() {
                continue;
            }
            let hva = self
                .ram
                .host_addr(GuestAddress(c.gpa))
                .ok_or(RamError::Regions(vm_memory::mmap::FromRangesError::InvalidGuestRegion))?;
            let slot = self.next_slot;
            let region = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: c.gpa,
                memory_size: c.len,
                userspace_addr: hva as u64,
                flags: 0,
            };
            // SAFETY: [hva, hva + len) lies inside one guest RAM mapping (a chunk never crosses
            // a range), and self holds an Arc to that RAM, declared after the VM fd so the VM
            // is closed first: the mapping outlives the slot.
            unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| RamError::Memslot {
                slot,
                gpa: c.gpa,
                len: c.len,
                source,
            })?;
            self.chunks[i].slot = Some(slot);
            self.next_slot += 1;
            self.registered_bytes += c.len;
        }
        Ok(())
    }

    /// Whether a memslot covers guest-physical `gpa`.
    pub fn covers(&self, gpa: u64) -> bool {
        let i = self.chunks.partition_point(|c| c.gpa + c.len <= gpa);
        self.chunks.get(i).is_some_and(|c| c.gpa <= gpa && c.slot.is_some())
    }

    /// Bytes of guest RAM registered with KVM.
    pub fn registered_bytes(&self) -> u64 {
        self.registered_bytes
    }

    /// Memslots in use.
    pub fn count(&self) -> u32 {
        self.next_slot
    }
}
