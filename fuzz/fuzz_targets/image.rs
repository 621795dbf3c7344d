#![no_main]
//! See `vmm::fuzz::image`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::fuzz::image(data));
