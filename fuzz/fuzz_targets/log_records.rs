#![no_main]
//! Fuzz target: see `corecast::fuzzing::log_records`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corecast::fuzzing::log_records(data));
