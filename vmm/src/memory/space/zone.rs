//! Guest-virtual address space for guest allocations: two zones (4 KiB-page heap, 2 MiB-page
//! heap; see `protocol::layout`), best fit with coalescing, an unmapped guard after every region,
//! and a quarantine that keeps freed ranges out of circulation for a while.
//!
//! The quarantine does two jobs: a freed address is not handed out again at once, so a stale
//! pointer faults instead of hitting someone else's memory, and a second free of it is reported
//! as a double free. Best fit (rather than an ever-growing bump pointer) matters because page
//! tables are never repurposed (see `pagetable`): reusing addresses keeps the table count bounded
//! by the peak footprint.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Ranges held back before reuse, at most this many...
const QUARANTINE_ENTRIES: usize = 512;
/// ...and at most this many bytes.
const QUARANTINE_BYTES: u64 = 1 << 30;

#[derive(Debug)]
pub struct VaZone {
    align: u64,
    /// Unmapped bytes after each range (0 or `align`).
    guard: u64,
    /// Free ranges by start: start -> length.
    by_addr: BTreeMap<u64, u64>,
    /// Free ranges by (length, start), for best fit.
    by_size: BTreeSet<(u64, u64)>,
    /// Freed (start, length incl. guard), oldest first.
    quarantine: VecDeque<(u64, u64)>,
    quarantined: BTreeSet<u64>,
    quarantined_bytes: u64,
    /// Bytes handed out (including guards).
    used: u64,
}

impl VaZone {
    /// A zone covering `[start, end)`, handing out multiples of `align` aligned to `align`, each
    /// followed by an unmapped guard of `align` bytes.
    pub fn new(start: u64, end: u64, align: u64) -> Self {
        Self::with_guard(start, end, align, true)
    }

    /// [`new`](Self::new), with or without the guards.
    pub fn with_guard(start: u64, end: u64, align: u64, guard: bool) -> Self {
        assert!(start.is_multiple_of(align) && end.is_multiple_of(align) && start < end);
        let mut z = VaZone {
            align,
            guard: if guard { align } else { 0 },
            by_addr: BTreeMap::new(),
            by_size: BTreeSet::new(),
            quarantine: VecDeque::new(),
            quarantined: BTreeSet::new(),
            quarantined_bytes: 0,
            used: 0,
        };
        z.insert_free(start, end - start);
        z
    }

    /// Reserves `len` bytes (rounded up to the alignment) plus a guard; returns the start.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let want = len.checked_next_multiple_of(self.align)?.checked_add(self.guard)?;
        let &(flen, start) = self.by_size.range((want, 0)..).next()?;
        self.remove_free(start, flen);
        if flen > want {
            self.insert_free(start + want, flen - want);
        }
        self.used += want;
        Some(start)
    }

    /// Releases a range from [`alloc`](Self::alloc) (same `len`) into the quarantine.
    pub fn free(&mut self, start: u64, len: u64) {
        let total = len.next_multiple_of(self.align) + self.guard;
        self.used -= total;
        self.quarantine.push_back((start, total));
        self.quarantined.insert(start);
        self.quarantined_bytes += total;
        while self.quarantine.len() > QUARANTINE_ENTRIES || self.quarantined_bytes > QUARANTINE_BYTES {
            let (s, l) = self.quarantine.pop_front().expect("non-empty");
            self.quarantined.remove(&s);
            self.quarantined_bytes -= l;
            self.release(s, l);
        }
    }

    /// Whether `start` was freed recently (a second free of it is a double free).
    pub fn recently_freed(&self, start: u64) -> bool {
        self.quarantined.contains(&start)
    }

    /// Bytes handed out, guards included.
    pub fn used(&self) -> u64 {
        self.used
    }

    fn release(&mut self, mut start: u64, mut len: u64) {
        // Coalesce with the free neighbours.
        if let Some((&ps, &pl)) = self.by_addr.range(..start).next_back()
            && ps + pl == start
        {
            self.remove_free(ps, pl);
            start = ps;
            len += pl;
        }
        if let Some(&nl) = self.by_addr.get(&(start + len)) {
            self.remove_free(start + len, nl);
            len += nl;
        }
        self.insert_free(start, len);
    }

    fn insert_free(&mut self, start: u64, len: u64) {
        self.by_addr.insert(start, len);
        self.by_size.insert((len, start));
    }

    fn remove_free(&mut self, start: u64, len: u64) {
        self.by_addr.remove(&start);
        self.by_size.remove(&(len, start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_guard_quarantine_coalesce() {
        let mut z = VaZone::new(0x10000, 0x10000 + 4096 * 4096, 4096);
        let a = z.alloc(4096).unwrap();
        let b = z.alloc(3 * 4096).unwrap();
        assert_eq!(b, a + 2 * 4096, "one guard page between regions");
        assert_eq!(z.used(), 6 * 4096);
        z.free(a, 4096);
        assert!(z.recently_freed(a));
        // Quarantined: not reused right away.
        assert_ne!(z.alloc(4096), Some(a));
        // Push it through the quarantine.
        let mut held = Vec::new();
        for _ in 0..QUARANTINE_ENTRIES {
            held.push(z.alloc(1).unwrap_or(0));
        }
        for &h in &held {
            if h != 0 {
                z.free(h, 1);
            }
        }
        assert!(!z.recently_freed(a));
        assert!(z.alloc(4096 * 4096).is_none());
    }

    #[test]
    fn everything_coalesces_back() {
        let mut z = VaZone::new(0, 1 << 30, 1 << 21);
        let xs: Vec<u64> = (0..100).map(|i| z.alloc((i % 7 + 1) << 21).unwrap()).collect();
        for (i, x) in xs.iter().enumerate() {
            z.free(*x, ((i as u64) % 7 + 1) << 21);
        }
        // Flush the quarantine.
        while let Some((s, l)) = z.quarantine.pop_front() {
            z.quarantined.remove(&s);
            z.quarantined_bytes -= l;
            z.release(s, l);
        }
        assert_eq!(z.by_addr.len(), 1);
        assert_eq!(z.used(), 0);
        assert_eq!(z.alloc((1 << 30) - (1 << 21)), Some(0));
    }
}
