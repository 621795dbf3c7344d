//! Address newtypes. Guest-physical byte addresses use vm-memory's `GuestAddress`; these add the
//! units that carry meaning in the memory manager.

use std::fmt;

use vm_memory::GuestAddress;

pub use protocol::{HUGE_PAGE_SIZE, PAGE_SIZE};

/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// A guest frame number: guest-physical address >> 12.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gfn(pub u64);

impl Gfn {
    /// The frame containing `gpa`.
    pub fn containing(gpa: GuestAddress) -> Gfn {
        Gfn(gpa.0 >> PAGE_SHIFT)
    }

    /// The first byte of the frame.
    pub fn gpa(self) -> GuestAddress {
        GuestAddress(self.0 << PAGE_SHIFT)
    }

    /// `self + n` frames, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<Gfn> {
        self.0.checked_add(n).map(Gfn)
    }

    /// `self + n` frames. Panics on overflow (frame numbers are < 2^52).
    pub fn plus(self, n: u64) -> Gfn {
        Gfn(self.0 + n)
    }

    /// Whether the frame is aligned to a block of `order`.
    pub fn is_aligned(self, order: Order) -> bool {
        self.0 & (order.pages() - 1) == 0
    }
}

impl fmt::Debug for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gfn {:#x}", self.0)
    }
}

impl fmt::Display for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A buddy block order: a block of order `k` is `2^k` frames, aligned to its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Order(u8);

impl Order {
    /// The largest order: 2^18 frames = 1 GiB.
    pub const MAX: Order = Order(18);
    /// One 4 KiB frame.
    pub const PAGE: Order = Order(0);
    /// A 2 MiB block.
    pub const HUGE: Order = Order(9);

    /// `Some(Order(k))` when `k <= MAX`.
    pub const fn new(k: u8) -> Option<Order> {
        if k <= Order::MAX.0 { Some(Order(k)) } else { None }
    }

    /// The order as a number.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// Frames in a block.
    pub const fn pages(self) -> u64 {
        1 << self.0
    }

    /// Bytes in a block.
    pub const fn bytes(self) -> u64 {
        PAGE_SIZE << self.0
    }

    /// The smallest order whose block holds `pages` frames, if one exists.
    pub fn for_pages(pages: u64) -> Option<Order> {
        let k = pages.max(1).next_power_of_two().trailing_zeros();
        u8::try_from(k).ok().and_then(Order::new)
    }

    /// All orders, ascending.
    pub fn all() -> impl DoubleEndedIterator<Item = Order> {
        (0..=Order::MAX.0).map(Order)
    }
}

/// A guest NUMA node id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A guest-virtual address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gva(pub u64);

impl Gva {
    /// `self + n` bytes, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<Gva> {
        self.0.checked_add(n).map(Gva)
    }

    /// Whether the address is aligned to `align` (a power of two).
    pub fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }
}

impl fmt::Debug for Gva {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gva {:#x}", self.0)
    }
}

impl fmt::Display for Gva {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Converts a host-side count to `usize` (lossless on the 64-bit hosts this VMM supports).
pub fn to_usize(x: u64) -> usize {
    usize::try_from(x).expect("64-bit host")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders() {
        assert_eq!(Order::for_pages(1), Some(Order::PAGE));
        assert_eq!(Order::for_pages(3).unwrap().get(), 2);
        assert_eq!(Order::for_pages(512), Some(Order::HUGE));
        assert_eq!(Order::for_pages(1 << 18), Some(Order::MAX));
        assert_eq!(Order::for_pages((1 << 18) + 1), None);
        assert_eq!(Order::MAX.bytes(), 1 << 30);
        assert!(Gfn(512).is_aligned(Order::HUGE));
        assert!(!Gfn(513).is_aligned(Order::HUGE));
    }
}
