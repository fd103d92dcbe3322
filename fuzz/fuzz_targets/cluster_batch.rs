#![no_main]
//! Fuzz target: see `corecast::fuzzing::cluster_batch`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corecast::fuzzing::cluster_batch(data));
