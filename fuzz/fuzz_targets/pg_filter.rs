#![no_main]
//! Fuzz target: see `corecast::fuzzing::pg_filter`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corecast::fuzzing::pg_filter(data));
