#![no_main]
//! Fuzz target: see `corecast::fuzzing::http_request`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| corecast::fuzzing::http_request(data));
