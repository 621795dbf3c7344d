//! KVM's own counters for the VM and its vCPUs, read through the binary statistics interface
//! (`KVM_GET_STATS_FD`, Linux 5.14): shadow-paging faults, TLB flushes, exits by kind, halts.
//! They show what the VMM's own counters cannot: what a guest's memory accesses cost inside
//! KVM. On a shadow-paging host (no EPT) every first use of a guest translation, and every
//! translation the host dropped, is a page fault KVM handles (`pf_taken`, `pf_fixed`), and
//! `remote_tlb_flush` counts the flushes of every vCPU that zapping a mapping costs.
//!
//! The descriptors are read once, when the VM is built (before the threads' seccomp filters,
//! which allow no new ioctl); the values with `pread` (the files ignore `lseek`) whenever
//! stats are taken.
//! A kernel without the interface, or a file that does not parse, gives no `kvm` section.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_GET_STATS_FD, 0xAE, 0xce);

/// `kvm_stats_header`: flags, name_size, num_desc, id_offset, desc_offset, data_offset.
const HEADER_LEN: usize = 24;
/// `kvm_stats_desc` without its name: flags (u32), exponent (i16), size (u16), offset (u32),
/// bucket_size (u32).
const DESC_LEN: usize = 16;
/// Stat types (`flags & 0xf`) reported: cumulative counters and peaks (single values).
const TYPE_CUMULATIVE: u32 = 0;
const TYPE_PEAK: u32 = 2;

/// One file's single-value statistics: names and where their values lie.
#[derive(Debug)]
struct Source {
    file: File,
    data_offset: u64,
    /// (name, offset of the u64 value from `data_offset`, whether it is a peak).
    stats: Vec<(String, u64, bool)>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

impl Source {
    /// The statistics fd of a VM or vCPU fd, parsed; `None` if KVM has none.
    fn open(fd: &impl AsRawFd) -> Option<Source> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd (or -1); `fd` is a
        // valid KVM VM or vCPU fd for the duration of the call.
        let raw = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if raw < 0 {
            return None;
        }
        // SAFETY: `raw` is a fresh fd KVM just returned, owned by nothing else.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0).ok()?;
        let name_size = u32_at(&header, 4)? as usize;
        let num_desc = u32_at(&header, 8)? as usize;
        let desc_offset = u64::from(u32_at(&header, 16)?);
        let data_offset = u64::from(u32_at(&header, 20)?);
        let len = (DESC_LEN + name_size).checked_mul(num_desc)?;
        if len > 1 << 20 {
            return None;
        }
        let mut descs = vec![0u8; len];
        file.read_exact_at(&mut descs, desc_offset).ok()?;
        let stats = descs
            .chunks_exact(DESC_LEN + name_size)
            .filter_map(|d| {
                let kind = u32_at(d, 0)? & 0xf;
                let size = u16_at(d, 6)?;
                let offset = u64::from(u32_at(d, 8)?);
                let name = &d[DESC_LEN..];
                let name = String::from_utf8_lossy(&name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())]);
                ((kind == TYPE_CUMULATIVE || kind == TYPE_PEAK) && size == 1)
                    .then(|| (name.into_owned(), offset, kind == TYPE_PEAK))
            })
            .collect();
        Some(Source { file, data_offset, stats })
    }

    /// Adds this file's values into `into` (peaks: the largest).
    fn read_into(&self, into: &mut BTreeMap<String, u64>) -> Option<()> {
        let end = self.stats.iter().map(|s| s.1 + 8).max()?;
        let mut data = vec![0u8; usize::try_from(end).ok()?];
        self.file.read_exact_at(&mut data, self.data_offset).ok()?;
        for (name, offset, peak) in &self.stats {
            let at = usize::try_from(*offset).ok()?;
            let v = u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?);
            let e = into.entry(name.clone()).or_insert(0);
            *e = if *peak { (*e).max(v) } else { e.saturating_add(v) };
        }
        Some(())
    }
}

/// The VM's and its vCPUs' statistics files.
#[derive(Debug, Default)]
pub struct KvmStats {
    vm: Option<Source>,
    vcpus: Vec<Source>,
}

/// The stats JSON's `kvm`: the VM's counters, and the vCPUs' summed (peaks: the largest).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KvmReport {
    pub vm: BTreeMap<String, u64>,
    pub vcpus: BTreeMap<String, u64>,
}

impl KvmStats {
    /// Opens the statistics of the VM `vm` and of the vCPUs `vcpus` (those KVM gives).
    pub fn open<V: AsRawFd, C: AsRawFd>(vm: &V, vcpus: &[C]) -> KvmStats {
        KvmStats { vm: Source::open(vm), vcpus: vcpus.iter().filter_map(Source::open).collect() }
    }

    /// The counters now; `None` without the interface (or if a read failed).
    pub fn report(&self) -> Option<KvmReport> {
        let mut vm = BTreeMap::new();
        self.vm.as_ref()?.read_into(&mut vm)?;
        let mut vcpus = BTreeMap::new();
        for s in &self.vcpus {
            s.read_into(&mut vcpus)?;
        }
        Some(KvmReport { vm, vcpus })
    }
}
