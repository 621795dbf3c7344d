//! The compressed swap pool: lz4-compressed guest pages kept in host memory (like Linux zswap), in
//! front of the swap file.
//!
//! A log-structured arena of [`CHUNK`]-byte chunks, each its own anonymous `mmap`, so retiring a
//! chunk (`munmap`) really returns its memory to the host. Entries are appended to the newest
//! chunk (bump allocation, 16-byte aligned): a 16-byte header (gfn: u64, compressed length: u16,
//! flags: u16 with a live bit, tag: u32), then the lz4 block, padded to 16. Offsets in a chunk are
//! never reused. An entry is read back once (a swap-in removes it), so insertion order is LRU
//! order: making room writes back whole chunks, oldest first ([`Pool::oldest_live`], then
//! [`Pool::retire_oldest`]). A chunk whose entries are all removed is unmapped at once unless it
//! is the one being filled or the oldest: the oldest chunk goes only through `retire_oldest`, so
//! the chunk a writeback read is the one it retires, whatever was removed in between.
//!
//! A [`PoolHandle`] holds the chunk's sequence number mod 2^16 (bits 14..30; bits 30 and 31 are
//! always 0, so a handle fits a 30-bit field) and offset / 16 (low 14 bits). Every operation
//! validates it: the chunk must be alive, the offset inside its used part, the header there live
//! and tagged `handle ^ key` (a random per-pool key, so not even a guest-chosen payload passes for
//! a header); else [`PoolError::BadHandle`]. Live chunks span fewer than 2^16 sequence numbers
//! (so at most 16 GiB of chunks; an insert that would break that returns `None`, asking for
//! writeback), so a live handle names one entry. A handle wrongly kept after its chunk died can, 2^16 chunks later, name a new entry:
//! compare [`Pool::gfn_of`] with the frame where it matters.
//!
//! [`Pool::compress`] takes `&mut self`: it reuses the pool's lz4 hash table and counts the pages
//! it rejects. The pool is not thread-safe by itself: the caller keeps it in a `Mutex`.

use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::ptr::{self, NonNull};
use std::{fmt, slice};

use lz4_flex::block::{CompressTable, compress_into_with_table, decompress_into};

/// Size of a guest page.
pub const PAGE: usize = 4096;
/// Chunk size.
pub const CHUNK: usize = 256 << 10;
/// Pages compressing to more than this go to the file instead.
pub const MAX_STORED: usize = 3072;
/// Names a pool entry: chunk sequence number mod 2^16 (bits 14..30), offset / 16 (low 14 bits).
pub type PoolHandle = u32;

/// Header size and entry alignment.
const HDR: usize = 16;
const OFF_BITS: u32 = 14;
/// Handles hold sequence numbers modulo this: 16 bits, so that handles fit the 30-bit value of
/// the swap layer's location word.
const SEQ_SPAN: u64 = 1 << 16;
/// The flag of a live entry; the other flag bits are zero.
const LIVE: u16 = 1;
const CHUNK_U64: u64 = CHUNK as u64;
const _: () = assert!(CHUNK / HDR == 1 << OFF_BITS && MAX_STORED <= u16::MAX as usize);

/// Errors of operations on a handle.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// The handle is stale or forged.
    #[error("pool handle {0:#x} does not name a live entry")]
    BadHandle(u32),
    /// The entry is not an lz4 block of one page (or `out` is not [`PAGE`] bytes).
    #[error("pool entry {0:#x} does not decompress to a page")]
    Corrupt(u32),
    /// `mmap` of a chunk failed ([`Pool::insert`] reports it as `None`).
    #[error("cannot map pool memory")]
    Map,
}

/// Pool counters, from [`Pool::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Capacity in bytes (whole chunks).
    pub capacity: u64,
    /// Host memory held: live chunks x CHUNK.
    pub bytes: u64,
    /// Live chunks.
    pub chunks: u64,
    /// Live entries.
    pub entries: u64,
    /// Compressed payload bytes of live entries.
    pub stored_bytes: u64,
    /// Successful inserts.
    pub inserts: u64,
    /// Successful removes (entries dropped by `retire_oldest` are not counted).
    pub removes: u64,
    /// Pages [`Pool::compress`] found above [`MAX_STORED`].
    pub rejected: u64,
    /// Chunks unmapped: emptied, or retired by [`Pool::retire_oldest`].
    pub retired_chunks: u64,
}

/// Bytes an entry of `len` compressed bytes takes in its chunk.
fn entry_size(len: usize) -> usize {
    HDR + len.next_multiple_of(HDR)
}

#[allow(clippy::cast_possible_truncation)] // seq is reduced mod 2^16 and off < CHUNK: both fit
fn make_handle(seq: u64, off: usize) -> PoolHandle {
    ((seq % SEQ_SPAN) as u32) << OFF_BITS | (off / HDR) as u32
}

/// An entry header, stored as one little-endian u128: gfn, len << 64, flags << 80, tag << 96.
#[derive(Clone, Copy, Debug)]
struct Header {
    gfn: u64,
    len: u16,
    flags: u16,
    /// `handle ^ key`.
    tag: u32,
}

impl Header {
    fn encode(self) -> [u8; HDR] {
        let (len, flags, tag) = (u128::from(self.len), u128::from(self.flags), u128::from(self.tag));
        (u128::from(self.gfn) | len << 64 | flags << 80 | tag << 96).to_le_bytes()
    }

    #[allow(clippy::cast_possible_truncation)] // takes the fields apart
    fn decode(b: [u8; HDR]) -> Header {
        let v = u128::from_le_bytes(b);
        Header { gfn: v as u64, len: (v >> 64) as u16, flags: (v >> 80) as u16, tag: (v >> 96) as u32 }
    }
}

/// One mapped chunk and its counts.
struct Chunk {
    base: NonNull<u8>,
    seq: u64,
    /// Bump offset: the entries lie in `[0, used)`.
    used: usize,
    live: usize,
    live_bytes: usize,
}

// SAFETY: a Chunk owns its mapping exclusively (no other copy of `base` exists) and reaches it
// only through &self / &mut self, so it may move to another thread.
unsafe impl Send for Chunk {}

impl Chunk {
    fn map(seq: u64) -> Result<Chunk, PoolError> {
        let (prot, flags) = (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS);
        // SAFETY: a new anonymous mapping at an address the kernel picks touches no existing memory.
        let p = unsafe { libc::mmap(ptr::null_mut(), CHUNK, prot, flags | libc::MAP_NORESERVE, -1, 0) };
        let base = NonNull::new(p.cast::<u8>()).filter(|_| p != libc::MAP_FAILED).ok_or(PoolError::Map)?;
        Ok(Chunk { base, seq, used: 0, live: 0, live_bytes: 0 })
    }

    fn mem(&self) -> &[u8] {
        // SAFETY: `base` is a readable mapping of CHUNK bytes that lives as long as self and is
        // written only through `mem_mut`, which needs &mut self.
        unsafe { slice::from_raw_parts(self.base.as_ptr(), CHUNK) }
    }

    fn mem_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `mem`; &mut self makes this the only reference into the mapping.
        unsafe { slice::from_raw_parts_mut(self.base.as_ptr(), CHUNK) }
    }

    /// The header at `off` if it lies in the used part (bounds-checked: `off` may be anything).
    fn header(&self, off: usize) -> Option<Header> {
        let b = self.mem().get(..self.used)?.get(off..off.checked_add(HDR)?)?;
        Some(Header::decode(b.try_into().ok()?))
    }

    /// Every entry as (offset, header), in insertion order.
    fn walk(&self) -> impl Iterator<Item = (usize, Header)> + '_ {
        let mut off = 0;
        std::iter::from_fn(move || {
            let (at, hd) = (off, self.header(off)?);
            off += entry_size(usize::from(hd.len));
            Some((at, hd))
        })
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: [base, base + CHUNK) is exactly the mapping made by `Chunk::map`, and no
        // reference into it outlives self.
        unsafe { libc::munmap(self.base.as_ptr().cast(), CHUNK) };
    }
}

/// The compressed pool; see the module docs.
pub struct Pool {
    /// Live chunks, oldest first, sequence numbers increasing; the last one is being filled.
    chunks: VecDeque<Chunk>,
    next_seq: u64,
    cap_chunks: usize,
    /// Most chunks `check_invariants` accepts: the capacity, or more after it was lowered.
    allowed_chunks: usize,
    key: u32,
    /// The counters (capacity, bytes and chunks are filled in by `stats`).
    counts: PoolStats,
    table: CompressTable,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("stats", &self.stats()).field("next_seq", &self.next_seq).finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool of at most `capacity` bytes of chunks (rounded down to whole chunks; 0 disables it:
    /// every insert fails). Maps nothing until the first insert.
    #[must_use]
    pub fn new(capacity: u64) -> Pool {
        #[allow(clippy::cast_possible_truncation)] // any 32 random bits will do
        let key = RandomState::new().hash_one(0x5eed_u64) as u32;
        let (chunks, counts, table) = (VecDeque::new(), PoolStats::default(), CompressTable::default());
        let mut pool = Pool { chunks, next_seq: 0, cap_chunks: 0, allowed_chunks: 0, key, counts, table };
        pool.set_capacity(capacity);
        pool
    }

    /// Compresses a [`PAGE`]-byte page into `out` (at least
    /// `lz4_flex::block::get_maximum_output_size(PAGE)` bytes); returns the compressed length if
    /// it is at most [`MAX_STORED`], else `None`, counting the page as rejected. Also `None`
    /// (not counted) when `page` is not PAGE bytes or `out` is too short.
    pub fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        let n = (page.len() == PAGE).then(|| compress_into_with_table(page, out, &mut self.table).ok())??;
        self.counts.rejected += u64::from(n > MAX_STORED);
        (n <= MAX_STORED).then_some(n)
    }

    /// Stores compressed bytes (at most [`MAX_STORED`]) for frame `gfn`; `None` when there is no
    /// room (the caller then writes back the oldest chunk and retries; `None` with no chunk
    /// mapped means capacity 0 or a failed `mmap`) or `compressed` is too long or empty.
    pub fn insert(&mut self, gfn: u64, compressed: &[u8]) -> Option<PoolHandle> {
        let len = compressed.len();
        if !self.has_room(len) {
            return None;
        }
        if !self.back_fits(len) {
            // The chunk being filled is full; if it is also empty, nothing will use it again.
            if self.chunks.len() > 1 && self.chunks.back().is_some_and(|c| c.live == 0) {
                self.chunks.pop_back();
                self.counts.retired_chunks += 1;
            }
            self.chunks.push_back(Chunk::map(self.next_seq).ok()?);
            self.next_seq += 1;
        }
        let key = self.key;
        let c = self.chunks.back_mut()?;
        let (off, h) = (c.used, make_handle(c.seq, c.used));
        let hd = Header { gfn, len: u16::try_from(len).ok()?, flags: LIVE, tag: h ^ key };
        // The padding after the payload is still zero: offsets are never reused.
        let dst = c.mem_mut().get_mut(off..off + HDR + len)?;
        dst[..HDR].copy_from_slice(&hd.encode());
        dst[HDR..].copy_from_slice(compressed);
        (c.used, c.live, c.live_bytes) = (off + entry_size(len), c.live + 1, c.live_bytes + len);
        let s = &mut self.counts;
        (s.entries, s.stored_bytes, s.inserts) = (s.entries + 1, s.stored_bytes + len as u64, s.inserts + 1);
        Some(h)
    }

    /// Decompresses live entry `h` into `out` (exactly [`PAGE`] bytes) without removing it.
    ///
    /// # Errors
    /// `BadHandle` if `h` names no live entry; `Corrupt` if the entry does not decompress to
    /// exactly one page, or `out` is not PAGE bytes long.
    pub fn load(&self, h: PoolHandle, out: &mut [u8]) -> Result<(), PoolError> {
        let (idx, off, hd) = self.resolve(h)?;
        match self.chunks[idx].mem().get(off + HDR..off + HDR + usize::from(hd.len)).map(|b| decompress_into(b, out)) {
            Some(Ok(PAGE)) if out.len() == PAGE => Ok(()),
            _ => Err(PoolError::Corrupt(h)),
        }
    }

    /// Removes live entry `h`; returns its gfn. Retires its chunk at once if that chunk is now
    /// empty and is neither the chunk being filled nor the oldest (see [`Pool::retire_oldest`]).
    ///
    /// # Errors
    /// `BadHandle` if `h` names no live entry.
    pub fn remove(&mut self, h: PoolHandle) -> Result<u64, PoolError> {
        let (idx, off, hd) = self.resolve(h)?;
        let (keep, len) = (idx == 0 || idx + 1 == self.chunks.len(), usize::from(hd.len));
        let c = &mut self.chunks[idx];
        let flags = c.mem_mut().get_mut(off + 10..off + 12).ok_or(PoolError::BadHandle(h))?;
        flags.copy_from_slice(&(hd.flags & !LIVE).to_le_bytes());
        (c.live, c.live_bytes) = (c.live - 1, c.live_bytes - len);
        if c.live == 0 && !keep {
            self.chunks.remove(idx);
            self.counts.retired_chunks += 1;
        }
        let s = &mut self.counts;
        (s.entries, s.stored_bytes, s.removes) = (s.entries - 1, s.stored_bytes - len as u64, s.removes + 1);
        Ok(hd.gfn)
    }

    /// The gfn the live entry `h` belongs to.
    ///
    /// # Errors
    /// `BadHandle` if `h` names no live entry.
    pub fn gfn_of(&self, h: PoolHandle) -> Result<u64, PoolError> {
        self.resolve(h).map(|(_, _, hd)| hd.gfn)
    }

    /// Whether inserting `len` compressed bytes would fit without writeback (false for a `len`
    /// that `insert` refuses: 0 or above [`MAX_STORED`]).
    #[must_use]
    pub fn has_room(&self, len: usize) -> bool {
        if len == 0 || len > MAX_STORED || self.back_fits(len) {
            return (1..=MAX_STORED).contains(&len);
        }
        // A new chunk is needed; an empty chunk being filled is retired first (see `insert`).
        let n = self.chunks.len();
        let kept = n - usize::from(n > 1 && self.chunks.back().is_some_and(|c| c.live == 0));
        // Handles must not alias: live sequence numbers, the new one included, span < 2^16.
        let oldest = if kept == 0 { self.next_seq } else { self.chunks[0].seq };
        kept < self.cap_chunks && self.next_seq - oldest < SEQ_SPAN
    }

    /// The oldest chunk's live entries as (gfn, handle), oldest first: what to write back to
    /// make room. Empty when the pool holds no chunk.
    #[must_use]
    pub fn oldest_live(&self) -> Vec<(u64, PoolHandle)> {
        let Some(c) = self.chunks.front() else { return Vec::new() };
        c.walk().filter(|(_, hd)| hd.flags & LIVE != 0).map(|(off, hd)| (hd.gfn, make_handle(c.seq, off))).collect()
    }

    /// Retires the oldest chunk: unmaps it; every handle into it becomes invalid. (The caller
    /// has written back, or decided to drop, its live entries.) If the oldest chunk is the one
    /// being filled, the pool starts a fresh chunk next time. Does nothing without a chunk. Only
    /// this retires the oldest chunk, even once `remove` has emptied it: after
    /// [`Pool::oldest_live`], it retires the chunk that call described.
    pub fn retire_oldest(&mut self) {
        if let Some(c) = self.chunks.pop_front() {
            self.counts.entries -= c.live as u64;
            self.counts.stored_bytes -= c.live_bytes as u64;
            self.counts.retired_chunks += 1;
        }
    }

    /// Host memory held by chunks: live chunks x [`CHUNK`].
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK_U64
    }

    /// The capacity in bytes, rounded down to whole chunks.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.cap_chunks as u64 * CHUNK_U64
    }

    /// Changes the capacity (the limit changed; rounded down to whole chunks). Shrinking does
    /// not retire anything by itself: [`Pool::over_capacity`] says how many bytes the caller
    /// must write back.
    pub fn set_capacity(&mut self, capacity: u64) {
        self.cap_chunks = usize::try_from(capacity / CHUNK_U64).unwrap_or(usize::MAX);
        self.allowed_chunks = self.cap_chunks.max(self.chunks.len());
    }

    /// Bytes held beyond the capacity (whole chunks); 0 within it.
    #[must_use]
    pub fn over_capacity(&self) -> u64 {
        self.bytes().saturating_sub(self.capacity())
    }

    /// The pool's counters, in O(1).
    #[must_use]
    pub fn stats(&self) -> PoolStats {
        let chunks = self.chunks.len() as u64;
        PoolStats { capacity: self.capacity(), bytes: self.bytes(), chunks, ..self.counts }
    }

    /// Host memory of the pool's own bookkeeping (not chunk memory): the struct, the chunk list
    /// and the lz4 hash table (4096 u16s).
    #[must_use]
    pub fn metadata_bytes(&self) -> u64 {
        (size_of::<Pool>() + self.chunks.capacity() * size_of::<Chunk>() + size_of::<[u16; 4096]>()) as u64
    }

    /// Counts match a walk of every chunk's headers; every header is well-formed; handles of
    /// live entries resolve; chunk sequence numbers increase (consecutive but for chunks retired
    /// early), the newest is the last one taken, and they span at most 2^16; only the oldest
    /// chunk and the one being filled may be empty; bytes <= capacity (unless capacity was
    /// lowered).
    ///
    /// # Errors
    /// A description of the first broken invariant.
    pub fn check_invariants(&self) -> Result<(), String> {
        macro_rules! ensure {
            ($ok:expr, $($msg:tt)+) => {
                if !$ok {
                    return Err(format!($($msg)+));
                }
            };
        }
        let (mut entries, mut stored) = (0, 0);
        for (i, c) in self.chunks.iter().enumerate() {
            ensure!(i == 0 || self.chunks[i - 1].seq < c.seq, "chunk {i}: sequence {} out of order", c.seq);
            let (mut live, mut bytes, mut end) = (0, 0, 0);
            for (off, hd) in c.walk() {
                let (len, h) = (usize::from(hd.len), make_handle(c.seq, off));
                let ok = (1..=MAX_STORED).contains(&len) && hd.flags & !LIVE == 0 && hd.tag == h ^ self.key;
                ensure!(ok, "chunk {}: bad header {hd:?} at {off:#x}", c.seq);
                if hd.flags == LIVE {
                    (live, bytes) = (live + 1, bytes + len);
                    ensure!(self.gfn_of(h) == Ok(hd.gfn), "live entry {h:#x} does not resolve");
                }
                end = off + entry_size(len);
            }
            ensure!(end == c.used && end <= CHUNK, "chunk {}: entries end at {end:#x}, used {:#x}", c.seq, c.used);
            ensure!((live, bytes) == (c.live, c.live_bytes), "chunk {}: walk finds {live}/{bytes}", c.seq);
            ensure!(live > 0 || i == 0 || i + 1 == self.chunks.len(), "chunk {}: empty, not retired", c.seq);
            (entries, stored) = (entries + live as u64, stored + bytes as u64);
        }
        if let (Some(old), Some(new)) = (self.chunks.front(), self.chunks.back()) {
            let ok = new.seq + 1 == self.next_seq && self.next_seq - old.seq <= SEQ_SPAN;
            ensure!(ok, "chunks {}..={}, next sequence {}", old.seq, new.seq, self.next_seq);
        }
        ensure!((entries, stored) == (self.counts.entries, self.counts.stored_bytes), "walk: {entries}/{stored}");
        ensure!(self.chunks.len() <= self.allowed_chunks, "{} chunks over capacity", self.chunks.len());
        Ok(())
    }

    /// Whether an entry of `len` bytes fits in the chunk being filled.
    fn back_fits(&self, len: usize) -> bool {
        self.chunks.back().is_some_and(|c| c.used + entry_size(len) <= CHUNK)
    }

    /// Validates `h`: (chunk index, offset, header) of the live entry it names.
    fn resolve(&self, h: PoolHandle) -> Result<(usize, usize, Header), PoolError> {
        let bad = || PoolError::BadHandle(h);
        let front = self.chunks.front().ok_or_else(bad)?;
        // The one sequence number >= the oldest live one that is congruent to h's mod 2^16.
        let seq = front.seq + u64::from(h >> OFF_BITS).wrapping_sub(front.seq) % SEQ_SPAN;
        let idx = self.chunks.binary_search_by_key(&seq, |c| c.seq).map_err(|_| bad())?;
        let (c, off) = (&self.chunks[idx], (h as usize % (1 << OFF_BITS)) * HDR);
        let hd = c.header(off).ok_or_else(bad)?;
        let len = usize::from(hd.len);
        let ok = hd.flags == LIVE && hd.tag == h ^ self.key && (1..=MAX_STORED).contains(&len);
        if ok && off + HDR + len <= c.used { Ok((idx, off, hd)) } else { Err(bad()) }
    }
}

impl Drop for Pool {
    /// Unmaps every chunk (each `Chunk` unmaps itself when dropped).
    fn drop(&mut self) {
        self.chunks.clear();
    }
}

#[cfg(test)]
mod tests;
