#![no_main]
// See shuttle::fuzzing::proxy_header for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shuttle::fuzzing::proxy_header(data));
