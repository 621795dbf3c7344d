//! Guest RAM: one private, anonymous, `MAP_NORESERVE` mapping per RAM range (so untouched guest
//! memory costs no host memory), optionally bound to a host NUMA node. `memslots` registers it
//! with KVM as it comes into use.

use std::io;
use std::path::Path;

use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::config::{HostBinding, HostPolicy};
use crate::layout::RamRange;

use crate::memory::addr::{PAGE_SIZE, to_usize};

/// The guest's physical memory, as vm-memory sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("cannot map {} of guest memory for node {node} (the host cannot map that much)", crate::config::ByteSize(*len))]
    Map {
        node: u32,
        len: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory ranges are invalid")]
    Regions(#[source] vm_memory::mmap::FromRangesError),
    #[error("host NUMA node {host} (for guest node {node}) does not exist on this host")]
    NoHostNode { node: u32, host: u32 },
    #[error("cannot bind guest node {node}'s memory to host node {host}")]
    Mbind {
        node: u32,
        host: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot register memslot {slot} ({len} bytes at {gpa:#x}) with KVM")]
    Memslot {
        slot: u32,
        gpa: u64,
        len: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Guest RAM and its ranges.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    ranges: Vec<RamRange>,
}

impl GuestRam {
    /// Maps every range and binds each node's ranges to its host node, if it has one.
    /// `bindings[n]` is node `n`'s host binding.
    pub fn new(ranges: &[RamRange], bindings: &[Option<HostBinding>]) -> Result<Self, RamError> {
        let mut regions = Vec::with_capacity(ranges.len());
        for r in ranges {
            let len = usize::try_from(r.len).map_err(|_| RamError::Map {
                node: r.node,
                len: r.len,
                source: vm_memory::mmap::MmapRegionError::Mmap(io::Error::from_raw_os_error(libc::ENOMEM)),
            })?;
            let map =
                MmapRegion::<()>::new(len).map_err(|source| RamError::Map { node: r.node, len: r.len, source })?;
            if let Some(b) = bindings.get(r.node as usize).copied().flatten() {
                bind_to_host_node(map.as_ptr(), len, r.node, b)?;
            }
            let region = GuestRegionMmap::new(map, r.base())
                .ok_or(RamError::Regions(vm_memory::mmap::FromRangesError::InvalidGuestRegion))?;
            regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| RamError::Regions(vm_memory::mmap::FromRangesError::Collection(e)))?;
        Ok(GuestRam { mem, ranges: ranges.to_vec() })
    }

    /// The vm-memory view, for reads and writes of guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The RAM ranges.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Host address of guest-physical `gpa`, if it is RAM.
    pub fn host_addr(&self, gpa: GuestAddress) -> Option<*mut u8> {
        self.mem.get_host_address(gpa).ok()
    }

    /// The guest-physical address that host address `hva` maps, if it is guest RAM.
    pub fn gpa_of(&self, hva: u64) -> Option<GuestAddress> {
        self.mem.iter().find_map(|r| {
            let base = r.as_ptr() as u64;
            (hva >= base && hva - base < r.len()).then(|| GuestAddress(r.start_addr().0 + (hva - base)))
        })
    }

    /// Host address ranges of the mappings: `(host address, length, guest-physical start)`.
    pub fn host_ranges(&self) -> Vec<(u64, u64, u64)> {
        self.mem.iter().map(|r| (r.as_ptr() as u64, r.len(), r.start_addr().0)).collect()
    }

    /// Drops the host backing of `[gpa, gpa + len)` (`MADV_DONTNEED`): the next access reads
    /// zeroes or, under userfaultfd, faults. It also drops every KVM translation of those pages.
    pub fn discard(&self, gpa: GuestAddress, len: u64) -> io::Result<()> {
        let Some(hva) = self.host_addr(gpa).filter(|_| self.is_ram(gpa, len)) else {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        };
        // SAFETY: [hva, hva+len) lies inside one of our guest RAM mappings (checked above);
        // MADV_DONTNEED on private anonymous memory only replaces its contents with zero pages.
        let rc = unsafe { libc::madvise(hva.cast(), to_usize(len), libc::MADV_DONTNEED) };
        if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Whether `[gpa, gpa + len)` lies inside a single RAM range.
    pub fn is_ram(&self, gpa: GuestAddress, len: u64) -> bool {
        self.ranges.iter().any(|r| gpa.0 >= r.start && gpa.0.checked_add(len).is_some_and(|e| e <= r.end()))
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

/// Whether host NUMA node `node` exists.
pub fn host_node_exists(node: u32) -> bool {
    let sys = Path::new("/sys/devices/system/node");
    if sys.exists() { sys.join(format!("node{node}")).exists() } else { node == 0 }
}

fn bind_to_host_node(addr: *mut u8, len: usize, node: u32, b: HostBinding) -> Result<(), RamError> {
    if !host_node_exists(b.node) {
        return Err(RamError::NoHostNode { node, host: b.node });
    }
    const MPOL_PREFERRED: libc::c_long = 1;
    const MPOL_BIND: libc::c_long = 2;
    const MASK_WORDS: usize = 16;
    let host = b.node as usize;
    if host >= MASK_WORDS * 64 {
        return Err(RamError::NoHostNode { node, host: b.node });
    }
    let mut mask = [0u64; MASK_WORDS];
    mask[host / 64] |= 1 << (host % 64);
    let mode = match b.policy {
        HostPolicy::Preferred => MPOL_PREFERRED,
        HostPolicy::Bind => MPOL_BIND,
    };
    debug_assert_eq!(addr as u64 % PAGE_SIZE, 0);
    // SAFETY: mbind only changes the NUMA policy of our own mapping [addr, addr+len); the mask
    // buffer outlives the call and maxnode (bits) matches its size.
    let rc = unsafe {
        libc::syscall(libc::SYS_mbind, addr, len, mode, mask.as_ptr(), (MASK_WORDS * 64) as libc::c_ulong, 0u32)
    };
    if rc != 0 {
        return Err(RamError::Mbind { node, host: b.node, source: io::Error::last_os_error() });
    }
    Ok(())
}
