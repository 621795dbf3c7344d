//! The guest-physical memory map: the only description of where RAM and holes are.
//!
//! ```text
//! 0x0000_0000 .. 0xc000_0000   RAM (low), nodes in id order
//! 0xc000_0000 .. 0x1_0000_0000 MMIO hole (reserved for virtio-mmio devices), never RAM
//! 0x1_0000_0000 ..             RAM (high), continuing the nodes in id order
//! ```
//!
//! Node `n`'s RAM follows node `n-1`'s; a node that reaches the hole continues above 4 GiB, so
//! it has up to two ranges. Guest-virtual addresses are described in `protocol::layout`.

use vm_memory::GuestAddress;

/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// A contiguous guest-physical RAM range belonging to one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RamRange {
    pub node: u32,
    pub start: u64,
    pub len: u64,
}

impl RamRange {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The first byte as a `GuestAddress`.
    pub fn base(&self) -> GuestAddress {
        GuestAddress(self.start)
    }
}

/// Lays the nodes' RAM out in guest-physical space, in node order, around the MMIO hole.
/// Returns `None` if the end address overflows.
pub fn ram_ranges(node_sizes: &[u64]) -> Option<Vec<RamRange>> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for (node, &size) in node_sizes.iter().enumerate() {
        let node = u32::try_from(node).ok()?;
        let mut left = size;
        while left > 0 {
            if at == MMIO_HOLE_START {
                at = MMIO_HOLE_END;
            }
            let room = if at < MMIO_HOLE_START { MMIO_HOLE_START - at } else { u64::MAX - at };
            let len = left.min(room);
            if len == 0 {
                return None;
            }
            out.push(RamRange { node, start: at, len });
            at = at.checked_add(len)?;
            left -= len;
        }
    }
    Some(out)
}

/// One past the highest guest-physical RAM address.
pub fn ram_end(ranges: &[RamRange]) -> u64 {
    ranges.iter().map(RamRange::end).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_two_nodes() {
        let r = ram_ranges(&[256 << 20, 256 << 20]).unwrap();
        assert_eq!(
            r,
            vec![
                RamRange { node: 0, start: 0, len: 256 << 20 },
                RamRange { node: 1, start: 256 << 20, len: 256 << 20 }
            ]
        );
    }

    #[test]
    fn straddles_hole() {
        let r = ram_ranges(&[2 << 30, 2 << 30]).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1], RamRange { node: 1, start: 2 << 30, len: 1 << 30 });
        assert_eq!(r[2], RamRange { node: 1, start: 4 << 30, len: 1 << 30 });
        assert_eq!(ram_end(&r), 5 << 30);
        let big = ram_ranges(&[64 << 30]).unwrap();
        assert_eq!(big.len(), 2);
        assert_eq!(ram_end(&big), (64 << 30) + (1 << 30));
    }
}
