#![no_main]
// See shuttle::fuzzing::api_bodies for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shuttle::fuzzing::api_bodies(data));
