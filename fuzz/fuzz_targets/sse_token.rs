#![no_main]
//! Fuzz target: see `corecast::fuzzing::sse_token`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corecast::fuzzing::sse_token(data));
