//! The swap file: a private file of 4 KiB slots that holds swapped-out guest pages.
//!
//! A [`SwapFile`] is an array of `PAGE`-sized slots on a host file system. The swap layer
//! allocates slots ([`SwapFile::alloc`]), writes pages into them ([`SwapFile::write`]), reads them
//! back on fault ([`SwapFile::read`]) and frees them ([`SwapFile::free`]).
//!
//! * **Private, with no name.** The file is opened with `O_TMPFILE`, so it never has a name: no
//!   other process can open it by path, and nothing is left behind however the VMM ends (crash,
//!   `SIGKILL`). File systems without `O_TMPFILE` get a named file (`O_EXCL`, mode 0600) that is
//!   unlinked at once; either way the fd is the only reference.
//! * **`O_DIRECT`.** Swapping out exists to give host memory back. Buffered writes would leave a
//!   second copy of every page in the host page cache (charged to our cgroup, evicted late), so
//!   I/O bypasses the cache. Where `O_DIRECT` is refused (`EINVAL`: ramfs, tmpfs before Linux 6.6), I/O is
//!   buffered and each write is followed by `sync_file_range` + `POSIX_FADV_DONTNEED`, each read by
//!   `POSIX_FADV_DONTNEED`, so the cache does not keep the pages either.
//! * **Slot allocator.** One bit per slot behind a `Mutex`, a count, and a next-fit cursor: an
//!   allocation continues where the last ended, so batches get runs of consecutive slots and
//!   [`SwapFile::write`] turns them into one `pwritev` of up to [`MAX_WRITE`] bytes. Freeing is
//!   metadata only; the file grows to its high-water mark and its space is reused, not returned.
//!
//! I/O is lock-free: `pread`/`pwrite`/`pwritev` at explicit offsets on the shared fd.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Size of a slot and of a guest page, in bytes.
pub const PAGE: usize = 4096;
/// Largest single write (2 MiB).
pub const MAX_WRITE: usize = 2 << 20;
/// Largest single write, in pages (iovecs).
const MAX_RUN: usize = MAX_WRITE / PAGE;

/// Errors of the swap file.
#[derive(Debug, thiserror::Error)]
pub enum SwapFileError {
    /// The file could not be created in `dir`.
    #[error("cannot create a swap file in {dir}")]
    Create {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A write failed with `ENOSPC` or `EDQUOT`.
    #[error("no space left on the swap file's file system")]
    NoSpace,
    /// A write failed otherwise (or its arguments were invalid: `InvalidInput`).
    #[error("cannot write swap slots {first}..{end}")]
    Write {
        first: u32,
        end: u32,
        #[source]
        source: io::Error,
    },
    /// A read failed (`UnexpectedEof` for a slot past the end of the file).
    #[error("cannot read swap slot {slot}")]
    Read {
        slot: u32,
        #[source]
        source: io::Error,
    },
    /// A slot number is not below the file's slot count.
    #[error("swap slot {slot} is out of range")]
    BadSlot { slot: u32 },
}

/// Counters of a [`SwapFile`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwapFileStats {
    /// Slots allocated now.
    pub slots_used: u64,
    /// Slots the file may hold.
    pub slots_max: u64,
    /// Highest slot ever used + 1 (the file's size in slots).
    pub high_water: u64,
    /// `pwrite`/`pwritev` system calls made.
    pub write_calls: u64,
    /// Bytes those calls wrote.
    pub bytes_written: u64,
    /// `pread` system calls made.
    pub read_calls: u64,
    /// Bytes those calls read.
    pub bytes_read: u64,
}

/// The allocation state of the slots: one bit per slot, set when allocated.
struct SlotMap {
    bits: Vec<u64>,
    max: u32,
    used: u64,
    /// Where the next allocation starts looking (next fit); always `< max`.
    cursor: u32,
    high_water: u64,
}

impl SlotMap {
    /// Takes up to `want` free slots in `from..to`, in ascending order; returns how many.
    fn scan(&mut self, from: u32, to: u32, want: usize, out: &mut Vec<u32>) -> usize {
        let (mut pos, mut got) = (u64::from(from), 0);
        while pos < u64::from(to) && got < want {
            // Cast: `pos < to <= u32::MAX`, so the word index fits a usize.
            #[allow(clippy::cast_possible_truncation)]
            let word = (pos / 64) as usize;
            let free = !self.bits[word] & (!0u64 << (pos % 64));
            if free == 0 {
                pos = (pos / 64 + 1) * 64;
                continue;
            }
            let slot = pos / 64 * 64 + u64::from(free.trailing_zeros());
            if slot >= u64::from(to) {
                break;
            }
            self.bits[word] |= 1 << (slot % 64);
            // Cast: `slot < to <= u32::MAX`.
            #[allow(clippy::cast_possible_truncation)]
            out.push(slot as u32);
            got += 1;
            pos = slot + 1;
        }
        if got > 0 {
            // `pos` is the last slot taken + 1, at most `max`.
            self.high_water = self.high_water.max(pos);
            self.cursor = if pos >= u64::from(self.max) { 0 } else { u32::try_from(pos).unwrap_or(0) };
        }
        got
    }

    fn is_set(&self, slot: u32) -> bool {
        slot < self.max && self.bits[slot as usize / 64] & (1 << (slot % 64)) != 0
    }
}

/// A private swap file of `PAGE`-sized slots; see the module docs.
pub struct SwapFile {
    file: File,
    direct: bool,
    max_slots: u32,
    map: Mutex<SlotMap>,
    write_calls: AtomicU64,
    bytes_written: AtomicU64,
    read_calls: AtomicU64,
    bytes_read: AtomicU64,
}

impl std::fmt::Debug for SwapFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwapFile")
            .field("fd", &self.file.as_raw_fd())
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

/// The file offset of byte `bytes` of slot `slot`.
fn offset(slot: u32, bytes: usize) -> libc::off_t {
    // Cast: slot * PAGE < 2^44 and `bytes` is a buffer length (< 2^63): the sum fits an off_t.
    #[allow(clippy::cast_possible_wrap)]
    let off = (u64::from(slot) * PAGE as u64 + bytes as u64) as libc::off_t;
    off
}

/// Whether `e` says the file system cannot do `O_TMPFILE`.
fn tmpfile_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL))
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Turns on `O_DIRECT` on `file`; `false` if the file system refuses it.
fn set_direct(file: &File) -> bool {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: F_SETFL on an fd we own; no memory is passed.
    flags >= 0 && unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } == 0
}

/// Opens an unnamed file in `dir`: `(file, direct)`.
fn open_private(dir: &Path, try_direct: bool, try_tmpfile: bool) -> io::Result<(File, bool)> {
    let tmpfile = |extra: i32| {
        OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE | extra).open(dir)
    };
    if try_tmpfile {
        // std adds O_CLOEXEC. EINVAL may mean either flag is refused: retry without O_DIRECT.
        let mut res = tmpfile(if try_direct { libc::O_DIRECT } else { 0 }).map(|f| (f, try_direct));
        if try_direct && res.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::EINVAL)) {
            res = tmpfile(0).map(|f| (f, false));
        }
        match res {
            Err(e) if tmpfile_unsupported(&e) => {}
            res => return res,
        }
    }
    for _ in 0..16 {
        let mut random = std::collections::hash_map::RandomState::new().build_hasher();
        random.write_u128(std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos()));
        let path = dir.join(format!(".vmm-swap-{}-{:016x}", std::process::id(), random.finish()));
        match OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path) {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                // Opening with O_DIRECT could create the file and then fail: set it afterwards.
                let direct = try_direct && set_direct(&file);
                return Ok((file, direct));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, "no free swap file name"))
}

impl SwapFile {
    /// A private swap file in `dir` holding at most `max_bytes`, rounded down to whole pages and
    /// clamped to `1..=u32::MAX` pages. Tries `O_TMPFILE | O_DIRECT` first, then falls back to a
    /// named file unlinked at once and/or buffered I/O (see the module docs).
    ///
    /// # Errors
    /// [`SwapFileError::Create`] if no file can be made in `dir`.
    pub fn create(dir: &Path, max_bytes: u64) -> Result<SwapFile, SwapFileError> {
        Self::create_with(dir, max_bytes, true, true)
    }

    /// [`SwapFile::create`], with `O_DIRECT` and `O_TMPFILE` optional (tests force the fallbacks).
    fn create_with(dir: &Path, max_bytes: u64, try_direct: bool, try_tmpfile: bool) -> Result<SwapFile, SwapFileError> {
        let (file, direct) = open_private(dir, try_direct, try_tmpfile)
            .map_err(|source| SwapFileError::Create { dir: dir.to_path_buf(), source })?;
        if !direct {
            // Swap-ins are random: readahead would only cache neighbours that nobody drops.
            // SAFETY: an advisory system call on an fd we own; no memory is passed.
            let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        }
        let max = u32::try_from((max_bytes / PAGE as u64).max(1)).unwrap_or(u32::MAX);
        log::info!("swap file in {}: {max} slots, {} I/O", dir.display(), if direct { "direct" } else { "buffered" });
        let map = SlotMap { bits: vec![0; max.div_ceil(64) as usize], max, used: 0, cursor: 0, high_water: 0 };
        Ok(SwapFile {
            file,
            direct,
            max_slots: max,
            map: Mutex::new(map),
            write_calls: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            read_calls: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
        })
    }

    /// The slot map. It is consistent after any panic (none happens while it is changed).
    fn map(&self) -> MutexGuard<'_, SlotMap> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether I/O bypasses the page cache with `O_DIRECT`.
    #[must_use]
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Allocates up to `n` free slots, preferring one contiguous run: next-fit from where the last
    /// allocation ended, wrapping around once. Appends them to `out` in the order found (ascending
    /// within a pass) and returns how many (fewer, possibly 0, when the file is full).
    pub fn alloc(&self, n: usize, out: &mut Vec<u32>) -> usize {
        let mut map = self.map();
        let want = n.min(usize::try_from(u64::from(map.max) - map.used).unwrap_or(usize::MAX));
        let (start, max) = (map.cursor, map.max);
        let mut got = map.scan(start, max, want, out);
        if got < want {
            got += map.scan(0, start, want - got, out);
        }
        map.used += got as u64;
        got
    }

    /// Frees `slot` (no I/O). Freeing a slot that is not in use is a caller bug: it panics in
    /// debug builds and is ignored otherwise.
    pub fn free(&self, slot: u32) {
        let freed = {
            let mut map = self.map();
            let was = map.is_set(slot);
            if was {
                map.bits[slot as usize / 64] &= !(1 << (slot % 64));
                map.used -= 1;
            }
            was
        };
        // After the lock is dropped, so the map's mutex is not poisoned.
        debug_assert!(freed, "freeing swap slot {slot}, which is not in use");
    }

    /// Whether `slot` is allocated.
    #[must_use]
    pub fn in_use(&self, slot: u32) -> bool {
        self.map().is_set(slot)
    }

    /// Writes `pages[i]` to `slots[i]`; each page is `PAGE` bytes at a `PAGE`-aligned address.
    /// Runs of consecutive slot numbers (in the order given) become one `pwritev` (or `pwrite`)
    /// of at most [`MAX_WRITE`] bytes. On error nothing is promised about what reached the file.
    ///
    /// # Errors
    /// [`SwapFileError::NoSpace`] on `ENOSPC`/`EDQUOT`; [`SwapFileError::BadSlot`] for a slot out
    /// of range; [`SwapFileError::Write`] on other errors, with `InvalidInput` for a length
    /// mismatch or a page of the wrong size or alignment (checked before any I/O).
    pub fn write(&self, slots: &[u32], pages: &[&[u8]]) -> Result<(), SwapFileError> {
        let bad =
            |slot: u32, msg| SwapFileError::Write { first: slot, end: slot.saturating_add(1), source: invalid(msg) };
        if slots.len() != pages.len() {
            return Err(bad(slots.first().copied().unwrap_or(0), "as many pages as slots are needed"));
        }
        for (&slot, page) in slots.iter().zip(pages) {
            if slot >= self.max_slots {
                return Err(SwapFileError::BadSlot { slot });
            }
            if page.len() != PAGE || !page.as_ptr().addr().is_multiple_of(PAGE) {
                return Err(bad(slot, "a page must be PAGE bytes at a PAGE-aligned address"));
            }
        }
        let mut i = 0;
        while i < slots.len() {
            let mut n = 1;
            while i + n < slots.len() && n < MAX_RUN && slots[i + n - 1].checked_add(1) == Some(slots[i + n]) {
                n += 1;
            }
            self.write_run(slots[i], &pages[i..i + n])?;
            i += n;
        }
        Ok(())
    }

    /// Writes `pages` (at most `MAX_RUN`, checked) to the consecutive slots from `first`.
    fn write_run(&self, first: u32, pages: &[&[u8]]) -> Result<(), SwapFileError> {
        // Cast: at most MAX_RUN pages, and `first + pages.len() <= max_slots` was checked.
        #[allow(clippy::cast_possible_truncation)]
        let end = first + pages.len() as u32;
        let fail = |source: io::Error| match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => SwapFileError::NoSpace,
            _ => SwapFileError::Write { first, end, source },
        };
        // Pages that follow each other in memory (a staging area) share one iovec: the kernel
        // builds fewer, larger direct-I/O segments.
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_RUN];
        let mut count = 0;
        for page in pages {
            let base = page.as_ptr().cast_mut();
            if count > 0 && iov[count - 1].iov_base.cast::<u8>().wrapping_add(iov[count - 1].iov_len) == base {
                iov[count - 1].iov_len += page.len();
            } else {
                iov[count] = libc::iovec { iov_base: base.cast(), iov_len: page.len() };
                count += 1;
            }
        }
        let (total, fd) = (pages.len() * PAGE, self.file.as_raw_fd());
        let (mut done, mut next) = (0, 0); // bytes written; first iovec not fully written
        while done < total {
            let v = &iov[next..count];
            // Cast: at most MAX_RUN (512) iovecs.
            #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
            let count = v.len() as libc::c_int;
            let ret = if v.len() == 1 {
                // SAFETY: `v[0]` describes (the unwritten tail of) a live page borrowed for this call.
                unsafe { libc::pwrite(fd, v[0].iov_base, v[0].iov_len, offset(first, done)) }
            } else {
                // SAFETY: every iovec in `v` describes (the unwritten tail of) a live page borrowed
                // for this call; the kernel only reads them.
                unsafe { libc::pwritev(fd, v.as_ptr(), count, offset(first, done)) }
            };
            self.write_calls.fetch_add(1, Relaxed);
            let Ok(mut n) = usize::try_from(ret) else {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(fail(e));
            };
            if n == 0 {
                return Err(fail(io::ErrorKind::WriteZero.into()));
            }
            done += n;
            self.bytes_written.fetch_add(n as u64, Relaxed);
            while n > 0 {
                let step = n.min(iov[next].iov_len);
                iov[next].iov_base = iov[next].iov_base.cast::<u8>().wrapping_add(step).cast();
                iov[next].iov_len -= step;
                n -= step;
                if iov[next].iov_len == 0 {
                    next += 1;
                }
            }
        }
        if !self.direct {
            self.writeback(offset(first, 0), total).map_err(fail)?;
        }
        Ok(())
    }

    /// Buffered mode: writes the range back and drops it from the page cache.
    fn writeback(&self, off: libc::off_t, len: usize) -> io::Result<()> {
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // Cast: `len` is a buffer length.
        #[allow(clippy::cast_possible_wrap)]
        // SAFETY: a system call on an fd we own; no memory is passed.
        if unsafe { libc::sync_file_range(self.file.as_raw_fd(), off, len as libc::off_t, flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.drop_cache(off, len);
        Ok(())
    }

    /// Buffered mode: drops the (clean) range from the page cache. Advisory: a failure only
    /// leaves a cached copy behind.
    fn drop_cache(&self, off: libc::off_t, len: usize) {
        // Cast: `len` is a buffer length.
        #[allow(clippy::cast_possible_wrap)]
        // SAFETY: a system call on an fd we own; no memory is passed.
        let _ =
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), off, len as libc::off_t, libc::POSIX_FADV_DONTNEED) };
    }

    /// Reads the consecutive slots `first..first + buf.len() / PAGE` into `buf` (a multiple of
    /// `PAGE` bytes at a `PAGE`-aligned address) with one `pread`, looping on short reads.
    ///
    /// # Errors
    /// [`SwapFileError::BadSlot`] if a slot is out of range; [`SwapFileError::Read`] on I/O
    /// errors, with `UnexpectedEof` if the file ends first (a slot never written past the end
    /// does not read as zeros) and `InvalidInput` for a badly sized or aligned `buf`.
    pub fn read(&self, first: u32, buf: &mut [u8]) -> Result<(), SwapFileError> {
        if first >= self.max_slots || (buf.len() / PAGE) as u64 > u64::from(self.max_slots - first) {
            return Err(SwapFileError::BadSlot { slot: first.max(self.max_slots) });
        }
        if !buf.len().is_multiple_of(PAGE) || !buf.as_ptr().addr().is_multiple_of(PAGE) {
            let source = invalid("a read buffer must be whole pages at a PAGE-aligned address");
            return Err(SwapFileError::Read { slot: first, source });
        }
        if buf.is_empty() {
            return Ok(()); // (and posix_fadvise would take length 0 as "to the end of the file")
        }
        let mut done = 0;
        let result = loop {
            if done == buf.len() {
                break Ok(());
            }
            let tail = &mut buf[done..];
            // SAFETY: `tail` is memory we borrow mutably for this call, valid for `tail.len()` bytes.
            let ret = unsafe {
                libc::pread(self.file.as_raw_fd(), tail.as_mut_ptr().cast(), tail.len(), offset(first, done))
            };
            self.read_calls.fetch_add(1, Relaxed);
            match usize::try_from(ret) {
                Ok(0) => break Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    done += n;
                    self.bytes_read.fetch_add(n as u64, Relaxed);
                }
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        break Err(e);
                    }
                }
            }
        };
        if !self.direct {
            self.drop_cache(offset(first, 0), buf.len());
        }
        // Cast: `done / PAGE` is below the number of slots read, which fits `max_slots - first`.
        #[allow(clippy::cast_possible_truncation)]
        result.map_err(|source| SwapFileError::Read { slot: first + (done / PAGE) as u32, source })
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> SwapFileStats {
        let map = self.map();
        SwapFileStats {
            slots_used: map.used,
            slots_max: u64::from(map.max),
            high_water: map.high_water,
            write_calls: self.write_calls.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            read_calls: self.read_calls.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
        }
    }

    /// Bytes of host memory the slot map takes (the bitmap: one bit per slot).
    #[must_use]
    pub fn metadata_bytes(&self) -> u64 {
        u64::from(self.max_slots).div_ceil(64) * 8
    }

    /// Checks that the slot map's count matches its bitmap, the cursor is in range, no bit past
    /// the end is set and `high_water` is above every used slot.
    ///
    /// # Errors
    /// A description of the first broken invariant.
    pub fn check_invariants(&self) -> Result<(), String> {
        let map = self.map();
        let ones: u64 = map.bits.iter().map(|w| u64::from(w.count_ones())).sum();
        if ones != map.used {
            return Err(format!("{} slots counted as used, {ones} bits set", map.used));
        }
        if map.cursor >= map.max {
            return Err(format!("cursor {} out of range ({} slots)", map.cursor, map.max));
        }
        let top = map
            .bits
            .iter()
            .rposition(|&w| w != 0)
            .map_or(0, |i| i as u64 * 64 + 64 - u64::from(map.bits[i].leading_zeros()));
        if top > u64::from(map.max) {
            return Err(format!("slot {} is set, past the end ({} slots)", top - 1, map.max));
        }
        if top > map.high_water {
            return Err(format!("slot {} is used, above the high-water mark {}", top - 1, map.high_water));
        }
        Ok(())
    }
}

/// A `PAGE`-aligned, zero-initialised heap buffer (for `O_DIRECT` I/O; sized in bytes, normally
/// whole pages).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only gives out `&[u8]`, like a Box<[u8]>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// The layout of a buffer of `len` bytes: at least a page, so that its size is never zero.
    fn layout(len: usize) -> Option<Layout> {
        Layout::from_size_align(len.max(PAGE), PAGE).ok()
    }

    /// A zeroed buffer of `len` bytes (e.g. `pages * PAGE`).
    ///
    /// # Panics
    /// If `len` overflows `isize` (like `Vec`); aborts via `handle_alloc_error` without memory.
    #[must_use]
    pub fn new(len: usize) -> AlignedBuf {
        let Some(layout) = Self::layout(len) else { panic!("AlignedBuf of {len} bytes: capacity overflow") };
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        AlignedBuf { ptr: NonNull::new(ptr).unwrap_or_else(|| handle_alloc_error(layout)), len }
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid, initialised (zeroed) memory of `len` bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    #[must_use]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(layout) = Self::layout(self.len) {
            // SAFETY: allocated in `new` with this very layout (`layout` is deterministic).
            unsafe { dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

#[cfg(test)]
mod tests;
