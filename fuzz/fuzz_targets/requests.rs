//! Raw bytes decoded as request messages and run through the real
//! handlers: no panic, no INTERNAL, no inconsistent engine.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| taskq::fuzzing::requests(data));
