#![no_main]
//! See `vmm::fuzz::console`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::console(data));
