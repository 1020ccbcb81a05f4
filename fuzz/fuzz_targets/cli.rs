#![no_main]
// See shuttle::fuzzing::cli for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shuttle::fuzzing::cli(data));
