#![no_main]
// See shuttle::fuzzing::admin_decoder for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shuttle::fuzzing::admin_decoder(data));
