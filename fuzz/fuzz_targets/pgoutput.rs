#![no_main]
//! Fuzz target: see `corecast::fuzzing::pgoutput`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corecast::fuzzing::pgoutput(data));
