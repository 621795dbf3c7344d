//! userfaultfd: the kernel API, hand-bound with vmm-sys-util's ioctl macros (the `userfaultfd`
//! crate needs bindgen and libclang). Each ioctl number is checked against the kernel's value at
//! compile time. Errno values become meaningful variants: the page already exists, the mapping is
//! changing (retry), the address space is gone.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use vmm_sys_util::ioctl::{_IOC_READ, _IOC_WRITE, ioctl_expr, ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffdio_move`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
ioctl_iowr_nr!(UFFDIO_MOVE, UFFDIO, 0x05, UffdioMove);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);

/// `size_of::<T>()` as the ioctl size field (the structs are a few dozen bytes).
#[allow(clippy::cast_possible_truncation)]
const fn sz<T>() -> u32 {
    size_of::<T>() as u32
}

// The numbers from <linux/userfaultfd.h> on x86-64, checked at compile time.
const RW: u32 = _IOC_READ | _IOC_WRITE;
const _: () = assert!(ioctl_expr(RW, UFFDIO, 0x3F, sz::<UffdioApi>()) == 0xc018_aa3f);
const _: () = assert!(ioctl_expr(RW, UFFDIO, 0x00, sz::<UffdioRegister>()) == 0xc020_aa00);
const _: () = assert!(ioctl_expr(_IOC_READ, UFFDIO, 0x01, sz::<UffdioRange>()) == 0x8010_aa01);
const _: () = assert!(ioctl_expr(_IOC_READ, UFFDIO, 0x02, sz::<UffdioRange>()) == 0x8010_aa02);
const _: () = assert!(ioctl_expr(RW, UFFDIO, 0x03, sz::<UffdioCopy>()) == 0xc028_aa03);
const _: () = assert!(ioctl_expr(RW, UFFDIO, 0x04, sz::<UffdioZeropage>()) == 0xc020_aa04);
const _: () = assert!(ioctl_expr(RW, UFFDIO, 0x05, sz::<UffdioMove>()) == 0xc028_aa05);
const _: () = assert!(ioctl_expr(RW, UFFDIO, 0x06, sz::<UffdioWriteprotect>()) == 0xc018_aa06);
const _: () = assert!(size_of::<UffdMsg>() == 32);

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1;
/// `UFFD_FEATURE_THREAD_ID`: fault messages carry the faulting thread id.
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_FEATURE_MOVE`: `UFFDIO_MOVE` (Linux 6.8).
const UFFD_FEATURE_MOVE: u64 = 1 << 16;
/// `UFFDIO_MOVE_MODE_DONTWAKE`.
const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
/// `UFFD_PAGEFAULT_FLAG_WP`: a write hit a write-protected page.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 2;
/// Bit of `UFFDIO_WRITEPROTECT` in `uffdio_register.ioctls`.
const UFFDIO_WRITEPROTECT_BIT: u64 = 1 << 0x06;
/// Bit of `UFFDIO_COPY` in `uffdio_register.ioctls`.
const UFFDIO_COPY_BIT: u64 = 1 << 0x03;

/// `struct uffd_msg` (only the page-fault arm is used).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UffdMsg {
    pub event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// `arg.pagefault.flags`.
    pub flags: u64,
    /// `arg.pagefault.address`.
    pub address: u64,
    /// `arg.pagefault.feat.ptid` (and padding).
    pub ptid: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("userfaultfd is not available (needs root or vm.unprivileged_userfaultfd=1)")]
    Create(#[source] io::Error),
    #[error("userfaultfd API handshake failed")]
    Api(#[source] io::Error),
    #[error("cannot register {len:#x} bytes at {addr:#x} with userfaultfd")]
    Register {
        addr: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("the registered range does not support UFFDIO_COPY and UFFDIO_WRITEPROTECT")]
    NoCopy,
    /// Some target pages were already present; `copied` bytes before the first one were filled.
    #[error("page at {addr:#x} already exists ({copied} bytes copied before it)")]
    Exists { addr: u64, copied: u64 },
    /// The mapping changed under the copy (e.g. a concurrent `MADV_DONTNEED`); retry.
    #[error("mapping changed during the copy at {addr:#x} ({copied} bytes copied); retry")]
    Again { addr: u64, copied: u64 },
    #[error("the guest address space is gone")]
    Gone,
    #[error("userfaultfd ioctl failed at {addr:#x}")]
    Ioctl {
        addr: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot read userfaultfd events")]
    Read(#[source] io::Error),
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    file: File,
    /// Whether `UFFDIO_MOVE` is available.
    can_move: bool,
    /// Held shared by every call on registered ranges, alone while ranges change how they are
    /// registered (they are unregistered for a moment: a call then would fail).
    modes: RwLock<()>,
}

impl Uffd {
    /// Opens a userfaultfd (blocking reads, close-on-exec) that also reports faults taken inside
    /// the kernel, which is where KVM's faults on guest memory come from.
    pub fn new() -> Result<Uffd, UffdError> {
        let file = Self::open_raw()?;
        // The handshake happens once per descriptor: ask which features the kernel has (an
        // API call with no features), then enable the ones we use that it offers.
        let probe = Self::open_raw()?;
        let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes exactly one UffdioApi, which outlives the call.
        let rc = unsafe { ioctl_with_mut_ref(&probe, UFFDIO_API(), &mut api) };
        if rc != 0 {
            return Err(UffdError::Api(io::Error::last_os_error()));
        }
        let can_move = api.features & UFFD_FEATURE_MOVE != 0;
        let features = UFFD_FEATURE_THREAD_ID | if can_move { UFFD_FEATURE_MOVE } else { 0 };
        let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        // SAFETY: as above.
        let rc = unsafe { ioctl_with_mut_ref(&file, UFFDIO_API(), &mut api) };
        if rc != 0 {
            return Err(UffdError::Api(io::Error::last_os_error()));
        }
        Ok(Uffd { file, can_move, modes: RwLock::new(()) })
    }

    /// A userfaultfd descriptor before its handshake.
    fn open_raw() -> Result<File, UffdError> {
        // SAFETY: the userfaultfd syscall takes only flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(UffdError::Create(io::Error::last_os_error()));
        }
        let fd = RawFd::try_from(fd).map_err(|_| UffdError::Create(io::Error::from_raw_os_error(libc::EBADF)))?;
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Whether [`move_pages`](Self::move_pages) is available (Linux 6.8 and later).
    pub fn can_move(&self) -> bool {
        self.can_move
    }

    /// Moves the present pages `[src, src + len)` to the missing pages `[dst, dst + len)`
    /// atomically: afterwards `src` is missing (a touch there faults to this userfaultfd) and
    /// `dst` holds the data, with no copy. Both ranges must be registered with this
    /// userfaultfd. Returns the bytes moved; stops at the first page that cannot move.
    ///
    /// # Safety
    /// `src` and `dst` must be private anonymous memory registered with this userfaultfd that
    /// no Rust reference covers: the call changes what both ranges hold.
    pub unsafe fn move_pages(&self, dst: u64, src: u64, len: u64) -> Result<u64, UffdError> {
        let _registered = self.registered();
        let mut m = UffdioMove { dst, src, len, mode: UFFDIO_MOVE_MODE_DONTWAKE, moved: 0 };
        // SAFETY: UFFDIO_MOVE reads and writes one UffdioMove and only remaps pages between the
        // two registered ranges (this function's contract).
        let rc = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_MOVE(), &mut m) };
        if rc == 0 {
            return Ok(m.moved.unsigned_abs());
        }
        let err = io::Error::last_os_error();
        let moved = u64::try_from(m.moved).unwrap_or(0);
        Err(match err.raw_os_error() {
            Some(libc::EEXIST) => UffdError::Exists { addr: dst + moved, copied: moved },
            Some(libc::EAGAIN) | Some(libc::EBUSY) => UffdError::Again { addr: src + moved, copied: moved },
            Some(libc::ESRCH) => UffdError::Gone,
            _ => UffdError::Ioctl { addr: src + moved, source: err },
        })
    }

    /// Registers `[addr, addr + len)` for missing-page faults and, with `wp`, write-protect
    /// faults too.
    ///
    /// # Safety
    /// The range must be a private anonymous mapping owned by the caller that stays mapped
    /// while this userfaultfd is used on it: from now on threads touching missing pages there
    /// block until [`copy`](Self::copy) or [`wake`](Self::wake) serves them, and `copy` writes
    /// into it.
    pub unsafe fn register(&self, addr: u64, len: u64, wp: bool) -> Result<(), UffdError> {
        let mode = UFFDIO_REGISTER_MODE_MISSING | if wp { UFFDIO_REGISTER_MODE_WP } else { 0 };
        // SAFETY: this function's contract.
        unsafe { self.register_mode(addr, len, mode) }
    }

    /// # Safety
    /// As [`register`](Self::register).
    unsafe fn register_mode(&self, addr: u64, len: u64, mode: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister { range: UffdioRange { start: addr, len }, mode, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes one UffdioRegister; the range contract is
        // the caller's.
        let rc = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_REGISTER(), &mut reg) };
        if rc != 0 {
            return Err(UffdError::Register { addr, len, source: io::Error::last_os_error() });
        }
        let wp = mode & UFFDIO_REGISTER_MODE_WP != 0;
        if reg.ioctls & UFFDIO_COPY_BIT == 0 || (wp && reg.ioctls & UFFDIO_WRITEPROTECT_BIT == 0) {
            return Err(UffdError::NoCopy);
        }
        Ok(())
    }

    /// Stops missing-page faults in `ranges` (each registered with `wp`) from coming here: from
    /// now on the kernel backs a missing page itself when it is first touched, as plain demand
    /// paging does, and only write-protect faults arrive. The ranges are unregistered and
    /// registered again for write-protect faults only; every other call here waits meanwhile.
    /// Threads blocked on a missing page there wake up and retry (and the kernel backs it).
    ///
    /// # Safety
    /// As [`register`](Self::register).
    pub unsafe fn stop_missing_faults(&self, ranges: &[(u64, u64)]) -> Result<(), UffdError> {
        let _alone = self.modes.write().unwrap_or_else(PoisonError::into_inner);
        for &(addr, len) in ranges {
            let r = UffdioRange { start: addr, len };
            // SAFETY: UFFDIO_UNREGISTER reads one UffdioRange; it only ends the registration
            // of the caller's range (and wakes its waiters).
            let rc = unsafe { ioctl_with_ref(&self.file, UFFDIO_UNREGISTER(), &r) };
            if rc != 0 {
                return Err(UffdError::Register { addr, len, source: io::Error::last_os_error() });
            }
            // SAFETY: the caller's contract.
            unsafe { self.register_mode(addr, len, UFFDIO_REGISTER_MODE_WP) }?;
        }
        Ok(())
    }

    /// Held while a call needs its range registered.
    fn registered(&self) -> RwLockReadGuard<'_, ()> {
        self.modes.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Write-protects (`protect`) or unprotects the present pages of `[addr, addr + len)` in a
    /// range registered with `wp`. Protecting drops every KVM translation of those pages (the
    /// kernel's MMU notifier fires); a write meanwhile takes a WP fault instead of failing.
    /// Unprotecting wakes threads waiting on a WP fault there.
    pub fn writeprotect(&self, addr: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        let w = UffdioWriteprotect {
            range: UffdioRange { start: addr, len },
            mode: if protect { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        let _registered = self.registered();
        loop {
            // SAFETY: UFFDIO_WRITEPROTECT reads one UffdioWriteprotect and only changes the
            // write permission of pages in a registered range; no memory Rust owns changes.
            let rc = unsafe { ioctl_with_ref(&self.file, UFFDIO_WRITEPROTECT(), &w) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) => continue,
                Some(libc::ESRCH) | Some(libc::ENOENT) => return Err(UffdError::Gone),
                _ => return Err(UffdError::Ioctl { addr, source: err }),
            }
        }
    }

    /// Atomically fills the missing pages `[dst, dst + len)` with the bytes at `src` and wakes
    /// the threads waiting on them (unless `wake` is false). Returns the bytes copied.
    ///
    /// # Safety
    /// `src` must be valid for reads of `len` bytes; `dst` must be in a registered range.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64, wake: bool) -> Result<u64, UffdError> {
        let mut c =
            UffdioCopy { dst, src: src as u64, len, mode: if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE }, copy: 0 };
        let _registered = self.registered();
        // SAFETY: UFFDIO_COPY reads and writes one UffdioCopy; it reads len bytes from src and
        // writes only missing pages of the registered destination (this function's contract).
        let rc = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_COPY(), &mut c) };
        fill_result(rc, c.copy, dst)
    }

    /// Maps the shared zero page at the missing pages `[dst, dst + len)` (reads are free; the
    /// first write then takes a copy-on-write fault in the kernel). Returns the bytes mapped.
    pub fn zeropage(&self, dst: u64, len: u64, wake: bool) -> Result<u64, UffdError> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE },
            zeropage: 0,
        };
        let _registered = self.registered();
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one UffdioZeropage and only maps zero pages
        // into missing pages of a registered range; it cannot alter memory Rust owns.
        let rc = unsafe { ioctl_with_mut_ref(&self.file, UFFDIO_ZEROPAGE(), &mut z) };
        fill_result(rc, z.zeropage, dst)
    }

    /// Wakes threads waiting on `[addr, addr + len)` without filling anything: they retry the
    /// access (and fault again if the page is still missing).
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let r = UffdioRange { start: addr, len };
        let _registered = self.registered();
        // SAFETY: UFFDIO_WAKE reads one UffdioRange and only wakes waiters.
        let rc = unsafe { ioctl_with_ref(&self.file, UFFDIO_WAKE(), &r) };
        if rc != 0 {
            return Err(UffdError::Ioctl { addr, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Blocks until at least one event arrives; fills `buf` and returns how many.
    pub fn read_events(&self, buf: &mut [UffdMsg]) -> Result<usize, UffdError> {
        loop {
            // SAFETY: buf is valid for writes of its full size in bytes; read writes at most that.
            let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), std::mem::size_of_val(buf)) };
            if n >= 0 {
                return Ok(n.unsigned_abs() / size_of::<UffdMsg>());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(UffdError::Read(err));
            }
        }
    }

    /// The descriptor, for `poll`.
    pub fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The result of a filling ioctl (COPY, ZEROPAGE) from its return code and the byte count the
/// kernel reported (`done`, negative errno on failure): errno becomes a variant that says what
/// to do (skip a present page, retry, stop).
fn fill_result(rc: i32, done: i64, dst: u64) -> Result<u64, UffdError> {
    if rc == 0 {
        return Ok(done.unsigned_abs());
    }
    let err = io::Error::last_os_error();
    let copied = u64::try_from(done).unwrap_or(0);
    Err(match err.raw_os_error() {
        Some(libc::EEXIST) => UffdError::Exists { addr: dst + copied, copied },
        Some(libc::EAGAIN) => UffdError::Again { addr: dst + copied, copied },
        Some(libc::ESRCH) | Some(libc::ENOENT) => UffdError::Gone,
        _ => UffdError::Ioctl { addr: dst, source: err },
    })
}
