#![no_main]
//! Fuzz target: see `corecast::fuzzing::phoenix_decode`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corecast::fuzzing::phoenix_decode(data));
