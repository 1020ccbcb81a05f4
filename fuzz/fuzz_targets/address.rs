#![no_main]
// See shuttle::fuzzing::address for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shuttle::fuzzing::address(data));
