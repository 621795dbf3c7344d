//! x86-64 system tables for a guest that runs entirely at CPL3: the GDT (flat DPL3 code and data
//! segments plus one TSS per vCPU), the TSS (an IST stack for double faults and an I/O permission
//! bitmap that opens exactly the VMM's ports), and IDT gates that deliver exceptions to DPL3
//! handlers without a privilege change.
//!
//! The guest cannot load any of these itself (`lgdt`, `lidt`, `ltr` are privileged): the VMM
//! sets GDTR, IDTR and TR through `KVM_SET_SREGS`, and maps the tables supervisor-only.
//!
//! I/O permission: this host's KVM (PVM) ignores `RFLAGS.IOPL`, and on other hosts IOPL=3 would
//! open all 65536 ports. The TSS bitmap works everywhere and opens only `protocol::port`.

use kvm_bindings::kvm_segment;

/// GDT index of the (unused) kernel code segment.
const KERNEL_CODE: u16 = 1;
/// GDT index of the (unused) kernel data segment.
const KERNEL_DATA: u16 = 2;
/// GDT index of the DPL3 data segment.
const USER_DATA: u16 = 3;
/// GDT index of the DPL3 64-bit code segment.
const USER_CODE: u16 = 4;
/// GDT index of vCPU 0's TSS descriptor (16 bytes: two slots per vCPU).
const FIRST_TSS: u16 = 5;

/// Selector of the user data segment (RPL 3).
pub const USER_DS: u16 = (USER_DATA << 3) | 3;
/// Selector of the user code segment (RPL 3).
pub const USER_CS: u16 = (USER_CODE << 3) | 3;

/// Selector of vCPU `cpu`'s TSS.
pub fn tss_selector(cpu: u32) -> u16 {
    let idx = u32::from(FIRST_TSS) + 2 * cpu;
    u16::try_from(idx << 3).expect("GDT holds at most 8190 entries")
}

/// Number of 8-byte GDT slots for `cpus` vCPUs.
pub fn gdt_entries(cpus: u32) -> usize {
    usize::from(FIRST_TSS) + 2 * cpus as usize
}

/// Segment-descriptor access byte and flags.
mod desc {
    pub const PRESENT: u64 = 1 << 47;
    pub const DPL3: u64 = 3 << 45;
    /// Code or data (not a system descriptor).
    pub const CODE_DATA: u64 = 1 << 44;
    pub const EXECUTABLE: u64 = 1 << 43;
    /// Readable (code) / writable (data).
    pub const RW: u64 = 1 << 41;
    pub const ACCESSED: u64 = 1 << 40;
    pub const GRANULARITY_4K: u64 = 1 << 55;
    /// 32-bit default operand size (data: 32-bit stack).
    pub const DB: u64 = 1 << 54;
    pub const LONG_MODE: u64 = 1 << 53;
    /// Limit 0xfffff (with 4 KiB granularity: 4 GiB; ignored in long mode).
    pub const LIMIT_MAX: u64 = 0xffff | (0xf << 48);
    /// System descriptor type 0xB: 64-bit TSS, busy.
    pub const TSS_BUSY: u64 = 0xb << 40;
}

/// A flat code or data descriptor.
fn segment(code: bool, dpl3: bool) -> u64 {
    use desc::*;
    let mut d = PRESENT | CODE_DATA | RW | ACCESSED | GRANULARITY_4K | LIMIT_MAX;
    if code {
        d |= EXECUTABLE | LONG_MODE;
    } else {
        d |= DB;
    }
    if dpl3 {
        d |= DPL3;
    }
    d
}

/// The two GDT slots of a 64-bit TSS descriptor.
fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    use desc::*;
    let limit = u64::from(limit);
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | TSS_BUSY
        | PRESENT
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// The GDT: null, kernel code/data (unused), user data, user code, then one TSS per vCPU.
/// Accessed and busy bits are preset so the CPU never writes the table.
pub fn gdt(cpus: u32, tss_va: impl Fn(u32) -> u64) -> Vec<u64> {
    let mut g = vec![0u64; gdt_entries(cpus)];
    g[usize::from(KERNEL_CODE)] = segment(true, false);
    g[usize::from(KERNEL_DATA)] = segment(false, false);
    g[usize::from(USER_DATA)] = segment(false, true);
    g[usize::from(USER_CODE)] = segment(true, true);
    for cpu in 0..cpus {
        let i = usize::from(tss_selector(cpu) >> 3);
        g[i..i + 2].copy_from_slice(&tss_descriptor(tss_va(cpu), TSS_LIMIT));
    }
    g
}

/// Offset of IST1 in the 64-bit TSS.
const TSS_IST1: usize = 36;
/// Offset of the I/O map base field.
const TSS_IOMAP_BASE: usize = 102;
/// Size of the TSS proper; the I/O bitmap follows it.
const TSS_HEADER: usize = 104;
/// I/O bitmap bytes: one bit per port up to `protocol::port::LAST`.
const IOMAP_BYTES: usize = protocol::port::LAST as usize / 8 + 1;
/// Bytes of TSS plus bitmap plus the 0xff terminator the CPU may read past the last port.
pub const TSS_SIZE: usize = TSS_HEADER + IOMAP_BYTES + 1;
/// TSS segment limit (last valid byte).
#[allow(clippy::cast_possible_truncation)]
const TSS_LIMIT: u32 = TSS_SIZE as u32 - 1;
/// Stride between vCPUs' TSSs in the system area.
pub const TSS_STRIDE: u64 = 256;
const _: () = assert!(TSS_SIZE as u64 <= TSS_STRIDE);

/// A TSS whose IST1 is `ist1` and whose I/O bitmap allows exactly the protocol's ports.
pub fn tss(ist1: u64) -> [u8; TSS_SIZE] {
    let mut t = [0u8; TSS_SIZE];
    t[TSS_IST1..TSS_IST1 + 8].copy_from_slice(&ist1.to_le_bytes());
    t[TSS_IOMAP_BASE..TSS_IOMAP_BASE + 2].copy_from_slice(&u16::try_from(TSS_HEADER).expect("small").to_le_bytes());
    // A set bit denies the port.
    t[TSS_HEADER..].fill(0xff);
    for port in protocol::port::FIRST..=protocol::port::LAST {
        let p = usize::from(port);
        t[TSS_HEADER + p / 8] &= !(1 << (p % 8));
    }
    t
}

/// Gate attributes: present, DPL3 (so `int n` is allowed too), 64-bit interrupt gate.
const GATE_PRESENT: u64 = 1 << 47;
const GATE_DPL3: u64 = 3 << 45;
const GATE_INTERRUPT: u64 = 0xe << 40;

/// An IDT gate to a CPL3 handler at `handler` in the user code segment, on IST `ist` (0: none).
pub fn idt_gate(handler: u64, ist: u8) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(USER_CS) << 16)
        | (u64::from(ist & 7) << 32)
        | GATE_PRESENT
        | GATE_DPL3
        | GATE_INTERRUPT
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// The double-fault vector, which runs on IST1.
pub const VECTOR_DOUBLE_FAULT: usize = 8;
/// Exception vectors the guest may install handlers for.
pub const NR_EXCEPTION_VECTORS: usize = 32;

/// `kvm_segment` for the flat user code (`code`) or data segment.
pub fn user_segment(code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: if code { USER_CS } else { USER_DS },
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// `kvm_segment` for vCPU `cpu`'s TSS at `base`.
pub fn tss_segment(cpu: u32, base: u64) -> kvm_segment {
    kvm_segment {
        base,
        limit: TSS_LIMIT,
        selector: tss_selector(cpu),
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_sdm_encodings() {
        // The well-known flat segment encodings.
        assert_eq!(segment(true, true), 0x00af_fb00_0000_ffff);
        assert_eq!(segment(false, true), 0x00cf_f300_0000_ffff);
        assert_eq!(segment(true, false), 0x00af_9b00_0000_ffff);
        assert_eq!(tss_descriptor(0x1234_5678_9abc_def0, 0x67), [0x9a00_8bbc_def0_0067, 0x1234_5678]);
        let g = idt_gate(0x1122_3344_5566_7788, 1);
        assert_eq!(g, [0x5566_ee01_0023_7788, 0x1122_3344]);
    }

    #[test]
    fn iomap_opens_only_protocol_ports() {
        let t = tss(0x5000);
        let denied = |p: u16| t[TSS_HEADER + usize::from(p) / 8] & (1 << (p % 8)) != 0;
        assert!(!denied(protocol::port::EXIT));
        assert!(denied(protocol::port::FIRST - 1));
        assert!(denied(0x3f8));
        assert_eq!(t[TSS_SIZE - 1], 0xff);
        assert_eq!(u64::from_le_bytes(t[TSS_IST1..TSS_IST1 + 8].try_into().unwrap()), 0x5000);
    }
}
