#![no_main]
//! Fuzz target: see `corecast::fuzzing::ws_conn`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corecast::fuzzing::ws_conn(data));
