#![no_main]
//! See `vmm::fuzz::memcalls`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::memcalls(data));
