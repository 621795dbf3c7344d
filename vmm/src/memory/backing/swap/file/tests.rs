//! Tests of the swap file.
use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;

/// A fresh directory under /tmp, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = format!("/tmp/swapfile-test-{name}-{}-{}", std::process::id(), N.fetch_add(1, Relaxed));
        std::fs::create_dir(&path).unwrap();
        TempDir(path.into())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A page of bytes unique to `tag`.
fn page(tag: u64) -> Vec<u8> {
    (0..PAGE as u64 / 8).flat_map(|i| (tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i).to_le_bytes()).collect()
}

/// An aligned buffer holding `page(tag)` for each tag.
fn filled(tags: &[u32]) -> AlignedBuf {
    let mut buf = AlignedBuf::new(tags.len() * PAGE);
    for (p, &tag) in buf.as_mut_slice().chunks_exact_mut(PAGE).zip(tags) {
        p.copy_from_slice(&page(tag.into()));
    }
    buf
}

fn pages(buf: &AlignedBuf) -> Vec<&[u8]> {
    buf.as_slice().chunks_exact(PAGE).collect()
}

/// Pages of `file` in the host page cache (mincore on a fresh mapping).
fn resident_pages(file: &File) -> usize {
    let len = usize::try_from(file.metadata().unwrap().len()).unwrap();
    let (prot, flags, fd) = (libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd());
    // SAFETY: a new read-only mapping of our file, never dereferenced, unmapped below.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    assert_ne!(addr, libc::MAP_FAILED);
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `addr..addr + len` is the mapping above; `vec` has a byte per page.
    assert_eq!(unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) }, 0);
    // SAFETY: exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

#[test]
fn file_is_private() {
    for tmpfile in [true, false] {
        let dir = TempDir::new("private");
        let sf = SwapFile::create_with(&dir.0, 1 << 20, true, tmpfile).unwrap();
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0, "a name is visible");
        let link = std::fs::read_link(format!("/proc/self/fd/{}", sf.file.as_raw_fd())).unwrap();
        assert!(link.starts_with(&dir.0) && link.to_string_lossy().ends_with(" (deleted)"), "{link:?}");
        let meta = sf.file.metadata().unwrap();
        assert_eq!((meta.permissions().mode() & 0o7777, meta.nlink()), (0o600, 0));
        assert!(sf.direct(), "/tmp is ext4 and takes O_DIRECT");
    }
    let dir = TempDir::new("sizes");
    assert_eq!(SwapFile::create(&dir.0, 0).unwrap().stats().slots_max, 1);
    assert_eq!(SwapFile::create(&dir.0, 3 * PAGE as u64 - 1).unwrap().stats().slots_max, 2);
    assert_eq!(SwapFile::create(&dir.0, 1 << 30).unwrap().metadata_bytes(), 32 << 10);
    let missing = dir.0.join("missing");
    let err = SwapFile::create(&missing, 1 << 20);
    assert!(matches!(err, Err(SwapFileError::Create { dir, .. }) if dir == missing));
}

#[test]
fn alloc_is_next_fit_and_reuses() {
    let dir = TempDir::new("alloc");
    let sf = SwapFile::create(&dir.0, 16 * PAGE as u64).unwrap();
    let alloc = |n| {
        let mut v = vec![];
        assert_eq!(sf.alloc(n, &mut v), v.len());
        v
    };
    let check = |used| {
        assert_eq!(sf.stats().slots_used, used);
        sf.check_invariants().unwrap();
    };
    assert_eq!(alloc(10), (0..10).collect::<Vec<_>>());
    check(10);
    assert_eq!(sf.stats().high_water, 10);
    for s in [3, 4, 5] {
        sf.free(s);
    }
    check(7);
    assert!(!sf.in_use(4) && sf.in_use(6) && !sf.in_use(10) && !sf.in_use(99));
    assert_eq!(alloc(6), (10..16).collect::<Vec<_>>(), "next fit continues at the cursor");
    check(13);
    assert_eq!(alloc(3), [3, 4, 5], "after wrapping around");
    check(16);
    assert!(alloc(2).is_empty(), "full");
    sf.free(0);
    sf.free(15);
    assert_eq!(alloc(5), [15, 0], "from the cursor (6) to the end, then wrapped");
    check(16);
    assert_eq!(sf.stats().high_water, 16);
    sf.free(7);
    for bad in [7, 16, u32::MAX] {
        // The debug_assert fires in debug builds; either way the counts stay right.
        assert_eq!(catch_unwind(AssertUnwindSafe(|| sf.free(bad))).is_err(), cfg!(debug_assertions));
        check(15);
    }
    assert_eq!(alloc(1), [7]);
    check(16);
}

/// 600 pages: 520 consecutive slots (512 + 8 across the 2 MiB cap), 40 scattered, 40 descending.
fn round_trip(sf: &SwapFile) {
    let mut slots = Vec::new();
    assert_eq!(sf.alloc(700, &mut slots), 700);
    let order: Vec<u32> = (0..520).chain((530..610).step_by(2)).chain((620..660).rev()).collect();
    let src = filled(&order);
    let before = sf.stats();
    sf.write(&order, &pages(&src)).unwrap();
    let after = sf.stats();
    assert_eq!(after.write_calls - before.write_calls, 2 + 40 + 40);
    assert_eq!(after.bytes_written - before.bytes_written, 600 * PAGE as u64);
    let mut one = AlignedBuf::new(PAGE);
    for &slot in &order {
        sf.read(slot, one.as_mut_slice()).unwrap();
        assert!(one.as_slice() == page(slot.into()), "slot {slot}");
    }
    let mut run = AlignedBuf::new(520 * PAGE);
    sf.read(0, run.as_mut_slice()).unwrap();
    assert!(run.as_slice() == &src.as_slice()[..520 * PAGE]);
    let end = sf.stats();
    assert_eq!((end.read_calls - after.read_calls, end.bytes_read - after.bytes_read), (601, 1120 * PAGE as u64));
    for s in slots {
        sf.free(s);
    }
    assert_eq!(sf.stats().slots_used, 0);
    sf.check_invariants().unwrap();
    assert_eq!(resident_pages(&sf.file), 0, "pages left in the host page cache");
}

#[test]
fn round_trip_direct() {
    let dir = TempDir::new("direct");
    let sf = SwapFile::create(&dir.0, 1024 * PAGE as u64).unwrap();
    assert!(sf.direct());
    round_trip(&sf);
}

#[test]
fn round_trip_buffered() {
    for tmpfile in [true, false] {
        let dir = TempDir::new("buffered");
        let sf = SwapFile::create_with(&dir.0, 1024 * PAGE as u64, false, tmpfile).unwrap();
        assert!(!sf.direct());
        round_trip(&sf);
    }
}

#[test]
fn bad_arguments_and_reads_past_the_end() {
    let dir = TempDir::new("eof");
    let sf = SwapFile::create(&dir.0, 64 * PAGE as u64).unwrap();
    let (src, mut one, mut two) = (filled(&[0, 1]), AlignedBuf::new(PAGE), AlignedBuf::new(2 * PAGE));
    sf.write(&[0, 1], &pages(&src)).unwrap();
    let eof =
        |r| matches!(r, Err(SwapFileError::Read { slot: 2, source }) if source.kind() == io::ErrorKind::UnexpectedEof);
    assert!(eof(sf.read(2, one.as_mut_slice())), "slot 2 was never written");
    assert!(eof(sf.read(1, two.as_mut_slice())), "a run past the end");
    assert!(matches!(sf.read(64, one.as_mut_slice()), Err(SwapFileError::BadSlot { slot: 64 })));
    assert!(matches!(sf.read(63, two.as_mut_slice()), Err(SwapFileError::BadSlot { slot: 64 })));
    assert!(matches!(sf.write(&[2, 64], &pages(&src)), Err(SwapFileError::BadSlot { slot: 64 })));
    let invalid = |r| match r {
        Err(SwapFileError::Write { source, .. } | SwapFileError::Read { source, .. }) => {
            source.kind() == io::ErrorKind::InvalidInput
        }
        _ => false,
    };
    assert!(invalid(sf.read(0, &mut two.as_mut_slice()[8..8 + PAGE])), "misaligned read");
    assert!(invalid(sf.read(0, &mut two.as_mut_slice()[..100])), "partial page");
    assert!(invalid(sf.write(&[2], &[&src.as_slice()[8..8 + PAGE]])), "misaligned page");
    assert!(invalid(sf.write(&[2], &[&src.as_slice()[..100]])), "short page");
    assert!(invalid(sf.write(&[2, 3], &pages(&src)[..1])), "fewer pages than slots");
    assert_eq!(sf.stats().bytes_written, 2 * PAGE as u64, "bad calls wrote nothing");
    sf.read(0, two.as_mut_slice()).unwrap();
    assert!(two.as_slice() == src.as_slice());
    let (mut empty, odd) = (AlignedBuf::new(0), AlignedBuf::new(100));
    assert!(empty.is_empty() && sf.read(0, empty.as_mut_slice()).is_ok());
    assert!(odd.len() == 100 && odd.as_slice().as_ptr().addr().is_multiple_of(PAGE) && odd.as_slice() == [0; 100]);
}

#[test]
fn concurrent_use() {
    let dir = TempDir::new("threads");
    let sf = SwapFile::create(&dir.0, 64 * PAGE as u64).unwrap();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                let mut back = AlignedBuf::new(PAGE);
                for _ in 0..50 {
                    let mut slots = Vec::new();
                    assert_eq!(sf.alloc(16, &mut slots), 16);
                    sf.write(&slots, &pages(&filled(&slots))).unwrap();
                    for &s in &slots {
                        sf.read(s, back.as_mut_slice()).unwrap();
                        assert!(back.as_slice() == page(s.into()));
                        sf.free(s);
                    }
                }
            });
        }
    });
    assert_eq!(sf.stats().slots_used, 0);
    sf.check_invariants().unwrap();
}

#[test]
fn check_invariants_catches_corruption() {
    let dir = TempDir::new("invariants");
    let sf = SwapFile::create(&dir.0, 100 * PAGE as u64).unwrap();
    assert_eq!(sf.alloc(10, &mut vec![]), 10);
    sf.map().used = 9;
    assert!(sf.check_invariants().is_err(), "count");
    sf.map().used = 10;
    sf.map().high_water = 9;
    assert!(sf.check_invariants().is_err(), "high water");
    sf.map().high_water = 10;
    sf.check_invariants().unwrap();
    sf.map().bits[1] |= 1 << 40; // slot 104 of 100
    sf.map().used = 11;
    assert!(sf.check_invariants().is_err(), "past the end");
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() { Ok(()) } else { Err(format!("{cmd:?}: {}", err.trim())) }
}

/// An ext4 image of `mib` MiB loop-mounted at `<dir>/mnt`; on drop, even after a failure, it is
/// unmounted (`mount -o loop` sets autoclear, so that detaches the loop device) and removed.
struct LoopFs(TempDir, bool);

impl LoopFs {
    fn new(mib: u64) -> Result<LoopFs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let mut fs = LoopFs(TempDir::new("enospc"), false);
        let (img, mnt) = (fs.0.0.join("img"), fs.mnt());
        std::fs::create_dir(&mnt).and_then(|()| File::create(&img)?.set_len(mib << 20)).map_err(|e| e.to_string())?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))?;
        run(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt))?;
        fs.1 = true;
        Ok(fs)
    }

    fn mnt(&self) -> PathBuf {
        self.0.0.join("mnt")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.1 && run(Command::new("umount").arg(self.mnt())).is_err() {
            let _ = run(Command::new("umount").arg("-l").arg(self.mnt()));
        }
    }
}

#[test]
fn no_space_on_a_full_file_system() {
    let fs = match LoopFs::new(8) {
        Ok(fs) => fs,
        Err(why) => return eprintln!("skipping the ENOSPC test: {why}"),
    };
    let sf = SwapFile::create(&fs.mnt(), 64 << 20).unwrap();
    let mut written = Vec::new();
    loop {
        let mut slots = Vec::new();
        assert_eq!(sf.alloc(MAX_RUN, &mut slots), MAX_RUN, "the 8 MiB file system should fill first");
        match sf.write(&slots, &pages(&filled(&slots))) {
            Ok(()) => written.extend(slots),
            Err(SwapFileError::NoSpace) => break slots.iter().for_each(|&s| sf.free(s)),
            Err(e) => panic!("expected NoSpace, got {e:?}"),
        }
    }
    eprintln!("ENOSPC after {} MiB (direct = {})", (written.len() * PAGE) >> 20, sf.direct());
    assert!(!written.is_empty());
    assert_eq!(sf.stats().slots_used, written.len() as u64);
    sf.check_invariants().unwrap();
    let mut one = AlignedBuf::new(PAGE);
    for &s in &written {
        sf.read(s, one.as_mut_slice()).unwrap();
        assert!(one.as_slice() == page(s.into()), "slot {s}");
    }
}
