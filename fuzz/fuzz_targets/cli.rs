#![no_main]
//! See `vmm::fuzz::cli`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::cli(data));
