#![no_main]
// See shuttle::fuzzing::handover for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| shuttle::fuzzing::handover(data));
