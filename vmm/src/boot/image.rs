//! Loading the guest ELF.
//!
//! The image is untrusted input. Its headers are validated here (x86-64, executable, segments
//! inside the image window, entry in an executable segment) before linux-loader copies it. The
//! copy goes into a staging view of guest memory that covers only the frames allocated for the
//! image, so even a header that slipped past validation cannot write anywhere else.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};

use linux_loader::elf::{EM_X86_64, Elf64_Ehdr, Elf64_Phdr, PF_W, PF_X, PT_LOAD};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::mmap::MmapRegion;
use vm_memory::{ByteValued, GuestAddress, GuestRegionMmap};

use protocol::layout::{IMAGE_VA_END, IMAGE_VA_START};

use crate::memory::addr::{Gfn, Gva, NodeId, PAGE_SIZE};
use crate::memory::backing::ram::GuestMemoryMmap;
use crate::memory::frames::page_state::FrameState;
use crate::memory::space::pagetable::PteFlags;
use crate::memory::{MemoryError, MemoryManager};

/// Most program headers accepted.
const MAX_PHDRS: u16 = 64;
/// Largest image accepted.
pub const MAX_IMAGE_SIZE: u64 = 256 << 20;
const ET_EXEC: u16 = 2;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot open guest image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read guest image {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest image {0} is not an ELF file")]
    NotElf(PathBuf),
    #[error("guest image {0} is not a 64-bit little-endian ELF")]
    Not64(PathBuf),
    #[error("guest image {path} is for machine {machine}, not x86-64")]
    NotX86_64 { path: PathBuf, machine: u16 },
    #[error("guest image {0} is not a static executable (link it with --no-pie)")]
    NotExec(PathBuf),
    #[error("guest image {path}: {reason}")]
    BadSegments { path: PathBuf, reason: String },
    #[error("guest image {path}: entry point {entry:#x} is not in an executable segment")]
    BadEntry { path: PathBuf, entry: u64 },
    #[error("cannot allocate memory for the guest image")]
    Memory(#[source] MemoryError),
    #[error("cannot load guest image {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
}

/// A loadable segment.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub va: u64,
    pub mem_len: u64,
    pub file_len: u64,
    pub writable: bool,
    pub executable: bool,
}

/// A validated image, ready to load.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    file: File,
    pub entry: Gva,
    pub segments: Vec<Segment>,
    /// Page-aligned guest-virtual span of all segments.
    pub va_start: u64,
    pub va_end: u64,
    /// Where `va_start` is in the headers' physical (`p_paddr`) addresses.
    paddr_base: u64,
}

/// Where the image ended up.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct LoadedImage {
    pub entry: u64,
    pub va_start: u64,
    pub va_end: u64,
    pub gpa_start: u64,
}

impl Image {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<Image, ImageError> {
        let file = File::open(path).map_err(|source| ImageError::Open { path: path.to_path_buf(), source })?;
        Image::from_file(file, path)
    }

    /// Validates an image held in memory (the built-in default guest); `name` stands for its
    /// path in errors.
    pub fn from_bytes(name: &Path, bytes: &[u8]) -> Result<Image, ImageError> {
        let open = |source| ImageError::Open { path: name.to_path_buf(), source };
        // SAFETY: memfd_create with a constant name and flags; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"vmm-guest-image".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(open(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let mut file = File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        std::io::Write::write_all(&mut file, bytes).and_then(|()| file.rewind()).map_err(open)?;
        Image::from_file(file, name)
    }

    /// Validates the image in `file` (read from its start); `path` names it in errors.
    fn from_file(mut file: File, path: &Path) -> Result<Image, ImageError> {
        let p = || path.to_path_buf();
        let file_len = file.metadata().map_err(|source| ImageError::Read { path: p(), source })?.len();
        let mut ehdr = Elf64_Ehdr::default();
        if file_len < size_of::<Elf64_Ehdr>() as u64 {
            return Err(ImageError::NotElf(p()));
        }
        file.read_exact(ehdr.as_mut_slice()).map_err(|source| ImageError::Read { path: p(), source })?;
        if ehdr.e_ident[..4] != *b"\x7fELF" {
            return Err(ImageError::NotElf(p()));
        }
        if ehdr.e_ident[4] != ELFCLASS64 || ehdr.e_ident[5] != ELFDATA2LSB {
            return Err(ImageError::Not64(p()));
        }
        if ehdr.e_machine != EM_X86_64 {
            return Err(ImageError::NotX86_64 { path: p(), machine: ehdr.e_machine });
        }
        if ehdr.e_type != ET_EXEC {
            return Err(ImageError::NotExec(p()));
        }
        let bad = |reason: String| ImageError::BadSegments { path: p(), reason };
        if ehdr.e_phnum == 0 || ehdr.e_phnum > MAX_PHDRS || usize::from(ehdr.e_phentsize) != size_of::<Elf64_Phdr>() {
            return Err(bad(format!("{} program headers of {} bytes", ehdr.e_phnum, ehdr.e_phentsize)));
        }
        file.seek(SeekFrom::Start(ehdr.e_phoff)).map_err(|source| ImageError::Read { path: p(), source })?;
        let mut segments = Vec::new();
        let mut delta = None;
        for _ in 0..ehdr.e_phnum {
            let mut ph = Elf64_Phdr::default();
            file.read_exact(ph.as_mut_slice()).map_err(|source| ImageError::Read { path: p(), source })?;
            if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
                continue;
            }
            let end = ph.p_vaddr.checked_add(ph.p_memsz).ok_or_else(|| bad("segment end overflows".into()))?;
            if ph.p_vaddr < IMAGE_VA_START || end > IMAGE_VA_END {
                return Err(bad(format!(
                    "segment {:#x}..{end:#x} is outside the image window {IMAGE_VA_START:#x}..{IMAGE_VA_END:#x}",
                    ph.p_vaddr
                )));
            }
            if ph.p_filesz > ph.p_memsz {
                return Err(bad("a segment's file size exceeds its memory size".into()));
            }
            if ph.p_offset.checked_add(ph.p_filesz).is_none_or(|e| e > file_len) {
                return Err(bad("a segment extends past the end of the file".into()));
            }
            if ph.p_filesz > 0 {
                let d = ph.p_paddr.wrapping_sub(ph.p_vaddr);
                if *delta.get_or_insert(d) != d {
                    return Err(bad("segments' physical and virtual layouts differ".into()));
                }
            }
            segments.push(Segment {
                va: ph.p_vaddr,
                mem_len: ph.p_memsz,
                file_len: ph.p_filesz,
                writable: ph.p_flags & PF_W != 0,
                executable: ph.p_flags & PF_X != 0,
            });
        }
        segments.sort_by_key(|s| s.va);
        if segments.is_empty() {
            return Err(bad("no loadable segments".into()));
        }
        for w in segments.windows(2) {
            if w[0].va + w[0].mem_len > w[1].va {
                return Err(bad(format!("segments at {:#x} and {:#x} overlap", w[0].va, w[1].va)));
            }
        }
        // W^X: no page may end up writable and executable, whether one segment asks for both or
        // two segments share a page.
        if let Some(s) = segments.iter().find(|s| s.writable && s.executable) {
            return Err(bad(format!("the segment at {:#x} is writable and executable (W^X)", s.va)));
        }
        for w in segments.windows(2) {
            let shared = (w[0].va + w[0].mem_len - 1) / PAGE_SIZE == w[1].va / PAGE_SIZE;
            if shared && (w[0].writable || w[1].writable) && (w[0].executable || w[1].executable) {
                return Err(bad(format!(
                    "segments at {:#x} and {:#x} share a page that would be writable and executable (W^X)",
                    w[0].va, w[1].va
                )));
            }
        }
        let va_start = segments[0].va & !(PAGE_SIZE - 1);
        let last = segments.last().expect("non-empty");
        let va_end = (last.va + last.mem_len).next_multiple_of(PAGE_SIZE);
        if va_end - va_start > MAX_IMAGE_SIZE {
            return Err(bad(format!("image spans {} bytes; at most {MAX_IMAGE_SIZE} are allowed", va_end - va_start)));
        }
        let entry = ehdr.e_entry;
        if !segments.iter().any(|s| s.executable && s.va <= entry && entry < s.va + s.mem_len) {
            return Err(ImageError::BadEntry { path: p(), entry });
        }
        // linux-loader copies each segment to its p_paddr; the staging view maps the image
        // frames at va_start + delta, so every segment lands at its offset from va_start.
        let delta = delta.unwrap_or(0);
        if delta % PAGE_SIZE != 0 {
            return Err(bad("physical and virtual addresses differ by a non-page multiple".into()));
        }
        let paddr_base = va_start.wrapping_add(delta);
        if paddr_base.checked_add(va_end - va_start).is_none() {
            return Err(bad("physical load addresses overflow".into()));
        }
        Ok(Image { path: path.to_path_buf(), file, entry: Gva(entry), segments, va_start, va_end, paddr_base })
    }

    /// Copies the image into frames from `node`, maps its pages with each segment's
    /// permissions, and returns where it went.
    pub fn load(mut self, mm: &mut MemoryManager, node: NodeId) -> Result<LoadedImage, ImageError> {
        let pages = (self.va_end - self.va_start) / PAGE_SIZE;
        let base = mm.alloc_frames(node, pages, None).map_err(ImageError::Memory)?;
        // Every page the copy will touch becomes resident; the VMM writes only resident frames.
        for s in &self.segments {
            if s.file_len > 0 {
                let first = (s.va - self.va_start) / PAGE_SIZE;
                let last = (s.va + s.file_len - 1 - self.va_start) / PAGE_SIZE;
                for i in first..=last {
                    mm.make_resident(base.plus(i)).map_err(ImageError::Memory)?;
                }
            }
        }
        let staging = self.staging_view(mm, base, pages)?;
        Elf::load(&staging, None, &mut self.file, None)
            .map_err(|source| ImageError::Load { path: self.path.clone(), source })?;

        // Page permissions: the union of the segments sharing each page.
        let mut perms = vec![None::<(bool, bool)>; crate::memory::addr::to_usize(pages)];
        for s in &self.segments {
            let first = (s.va - self.va_start) / PAGE_SIZE;
            let last = (s.va + s.mem_len - 1 - self.va_start) / PAGE_SIZE;
            for slot in &mut perms[crate::memory::addr::to_usize(first)..=crate::memory::addr::to_usize(last)] {
                let (w, x) = slot.unwrap_or((false, false));
                *slot = Some((w || s.writable, x || s.executable));
            }
        }
        for (i, p) in perms.iter().enumerate() {
            let Some((w, x)) = *p else { continue };
            let mut flags = PteFlags::USER;
            flags.set(PteFlags::WRITABLE, w);
            flags.set(PteFlags::NO_EXECUTE, !x);
            let i = i as u64;
            mm.map_one(
                Gva(self.va_start + i * PAGE_SIZE),
                base.plus(i),
                crate::memory::space::pagetable::PageSize::Size4K,
                flags,
            )
            .map_err(ImageError::Memory)?;
        }
        debug_assert!(
            mm.frames().states().census(base, pages)[FrameState::Free as usize] == 0,
            "image frames are all allocated"
        );
        Ok(LoadedImage { entry: self.entry.0, va_start: self.va_start, va_end: self.va_end, gpa_start: base.gpa().0 })
    }

    /// A vm-memory view whose only region is the image frames, placed at the image's physical
    /// load address, so linux-loader's `p_paddr`-based copy lands in those frames and nowhere else.
    fn staging_view(&self, mm: &MemoryManager, base: Gfn, pages: u64) -> Result<GuestMemoryMmap, ImageError> {
        let len = pages * PAGE_SIZE;
        let bad = |reason: &str| ImageError::BadSegments { path: self.path.clone(), reason: reason.into() };
        if !mm.ram().is_ram(base.gpa(), len) {
            return Err(bad("image frames are not contiguous guest RAM"));
        }
        let hva = mm.ram().host_addr(base.gpa()).ok_or_else(|| bad("image frames are not guest RAM"))?;
        // SAFETY: [hva, hva + len) lies inside one guest RAM mapping (checked above), which
        // outlives this short-lived view; build_raw does not unmap it on drop.
        let region = unsafe {
            MmapRegion::<()>::build_raw(
                hva,
                crate::memory::addr::to_usize(len),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            )
        }
        .map_err(|_| bad("cannot create the staging view"))?;
        let region = GuestRegionMmap::new(region, GuestAddress(self.paddr_base))
            .ok_or_else(|| bad("physical load address overflows"))?;
        GuestMemoryMmap::from_regions(vec![region]).map_err(|_| bad("cannot create the staging view"))
    }
}
