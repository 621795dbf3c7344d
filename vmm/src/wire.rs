//! Reading and writing protocol structs in guest memory as plain bytes.

use vm_memory::ByteValued;

use protocol::memcall::MemCall;
use protocol::shared::SharedPage;
use protocol::{BootInfo, MemStats};

/// A protocol struct as bytes (the protocol crate cannot implement vm-memory's trait itself).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Wire<T>(pub T);

// SAFETY: BootInfo is repr(C) plain data (integers and arrays of integers) with no padding
// (protocol asserts its size equals the sum of its fields); every bit pattern is valid.
unsafe impl ByteValued for Wire<BootInfo> {}
// SAFETY: MemCall is repr(C), two u32 then u64s and arrays of u64 (64 bytes, asserted in
// protocol): no padding, every bit pattern valid.
unsafe impl ByteValued for Wire<MemCall> {}
// SAFETY: MemStats is repr(C) and only u64 fields: no padding, every bit pattern valid.
unsafe impl ByteValued for Wire<MemStats> {}
// SAFETY: SharedPage is repr(C) and only u64 fields: no padding, every bit pattern valid.
unsafe impl ByteValued for Wire<SharedPage> {}
