#![no_main]
//! Fuzz target: see `corecast::fuzzing::join_config`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corecast::fuzzing::join_config(data));
