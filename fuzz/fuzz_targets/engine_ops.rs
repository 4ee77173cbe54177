//! Arbitrary operation sequences on the engine, checked against the
//! reference model and the engine's invariants after every operation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| taskq::fuzzing::engine_ops(data));
