#![no_main]
// See shuttle::fuzzing::config_file for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shuttle::fuzzing::config_file(data));
