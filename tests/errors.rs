//! Every bad input gets one clear error line on stderr and a distinct non-zero exit code, never
//! a panic or a backtrace.

mod common;

use std::time::Duration;

use common::{run, run_with, scratch};
use vmm::exit_code::{BAD_IMAGE, UNAVAILABLE, USAGE};

const USAGE_CODE: i32 = USAGE as i32;

fn usage(args: &[&str], needle: &str) {
    run(args).assert_error(USAGE_CODE, needle);
}

#[test]
fn no_dev_kvm() {
    // A private mount namespace with an empty /dev: the real open(2) fails with ENOENT.
    let r = run_with(
        &["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev && exec \"$0\" \"$@\""],
        &[],
        Duration::from_secs(60),
    );
    r.assert_error(UNAVAILABLE as i32, "cannot open /dev/kvm");
    assert!(r.stderr.contains("No such file"), "{}", r.stderr);
}

#[test]
fn no_permission_for_dev_kvm() {
    let r = run_with(&["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], &[], Duration::from_secs(60));
    r.assert_error(UNAVAILABLE as i32, "cannot open /dev/kvm");
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
}

#[test]
fn kernel_missing_not_elf_not_x86_64() {
    run(&["--kernel", "/nonexistent/guest.elf"]).assert_error(BAD_IMAGE as i32, "cannot open guest image");

    let text = scratch("not-elf");
    std::fs::write(&text, "this is not an ELF file, just text that is long enough to have a header").unwrap();
    run(&["--kernel", text.to_str().unwrap()]).assert_error(BAD_IMAGE as i32, "is not an ELF file");

    // A valid ELF64 header for AArch64 (e_machine 183).
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&183u16.to_le_bytes());
    let arm = scratch("arm.elf");
    std::fs::write(&arm, &elf).unwrap();
    run(&["--kernel", arm.to_str().unwrap()]).assert_error(BAD_IMAGE as i32, "not x86-64");

    // A directory is not an image either.
    run(&["--kernel", "/tmp"]).assert_error(BAD_IMAGE as i32, "guest image");
    for p in [text, arm] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn bad_memory_sizes() {
    usage(&["--memory", "size=0"], "must not be zero");
    usage(&["--memory", "size=4097"], "not a multiple of 4 KiB");
    usage(&["--memory", "size=12Q"], "invalid size `12Q`");
    usage(&["--memory", "512M"], "not key=value");
    // Beyond the guest-physical address space (48 bits here)...
    usage(&["--memory", "size=1024T"], "beyond this host's");
    // ...and within it but beyond what the host can map (128 TiB of user address space).
    usage(&["--memory", "size=200T"], "the host cannot map that much");
}

#[test]
fn bad_numa_layouts() {
    usage(
        &["--numa", "node=0,size=256M,cpus=0", "--numa", "node=1,size=256M,cpus=1", "--memory", "size=1G"],
        "add up to",
    );
    usage(
        &["--numa", "node=0,size=256M,cpus=0-1", "--numa", "node=1,size=256M,cpus=1"],
        "vCPU 1 is in both NUMA node 0 and node 1",
    );
    usage(
        &["--cpus", "3", "--numa", "node=0,size=256M,cpus=0", "--numa", "node=1,size=256M,cpus=1"],
        "vCPU 2 belongs to no NUMA node",
    );
    usage(&["--numa", "node=0,size=256M,cpus=0", "--numa-distance", "0:1=20"], "node 1, which is not defined");
    usage(
        &["--numa", "node=0,size=256M,cpus=0", "--numa", "node=1,size=256M,cpus=1", "--numa-distance", "0:1=5"],
        "at least 10",
    );
    usage(&["--numa", "node=0,size=256M,cpus=0", "--numa", "node=2,size=256M,cpus=1"], "node 1 is missing");
    usage(&["--numa", "node=0,size=256M,cpus=0,host-node=7"], "host NUMA node 7");
    usage(&["--numa", "node=0,cpus=0"], "`size=SIZE` is missing");
    usage(&["--numa-distance", "zero-one"], "expected A:B=D");
}

#[test]
fn too_many_vcpus() {
    usage(&["--cpus", "0"], "at least 1");
    // Beyond what KVM allows on this host (1024 here), but plausible for some host.
    usage(&["--cpus", "2000"], "KVM on this host allows at most");
    // Allowed by KVM, beyond the protocol's limit.
    usage(&["--cpus", "300"], "this VMM supports at most 256 vCPUs");
    usage(&["--cpus", "100000"], "no x86 KVM host allows more than 4096");
}

#[test]
fn guest_args_too_long_and_bad_cli() {
    let long = format!("scenario=boot pad={}", "x".repeat(2000));
    usage(&["--guest-args", &long], "at most 1024 are allowed");
    usage(&["--bogus-flag"], "unexpected argument '--bogus-flag'");
    usage(&["--cpus", "two"], "invalid --cpus `two`");
}

#[test]
fn bad_cpu_affinities() {
    usage(&["--cpus", "boot=1,affinity=sometimes"], "is not off, auto or [VCPU@[CPUS],...]");
    usage(&["--cpus", "boot=1,affinity=[0@[1],0@[0]]"], "vCPU 0 is listed twice");
    usage(&["--cpus", "boot=1,affinity=[1@[0]]"], "names vCPU 1, but the VM has 1 vCPUs");
    usage(&["--cpus", "boot=2,affinity=[0@[1-0]]"], "invalid CPU list `1-0`");
    usage(&["--cpus", "boot=1,affinity=[0@[4000]]"], "host CPU 4000 is not one this process may run on");
    usage(&["--cpus", "boot=1,smt=on"], "unknown key `smt`");
}

#[test]
fn bad_profile_arguments() {
    usage(&["--profile", "hz=100"], "`path=FILE` is missing");
    usage(&["--profile", "path=/tmp/p.txt,hz=0"], "hz 0 is not between 1 and 10000");
    usage(&["--profile", "path=/tmp/p.txt,every=2"], "unknown key `every`");
    // A path that cannot be written: the VM runs, then the profile cannot be written.
    let r = run(&["--profile", "path=/nonexistent/dir/p.txt", "--guest-args", "scenario=boot"]);
    r.assert_error(vmm::exit_code::IO as i32, "cannot write the profile /nonexistent/dir/p.txt");
}
