//! An upstream's response, head and body, read as the proxy reads it: never a panic, never
//! more body than was sent, and a length-framed body yields exactly its length.
//!
//! Run with: `RUSTC_BOOTSTRAP=1 cargo fuzz run upstream_response` (from the repository root)
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portunus_proxy::fuzzing::upstream_response(data);
});
