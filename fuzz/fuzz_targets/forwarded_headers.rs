//! Header rewriting never panics, and never lets a hop-by-hop header or a spoofed
//! `X-Forwarded-For` from an untrusted peer through.
//!
//! Run with: `RUSTC_BOOTSTRAP=1 cargo fuzz run forwarded_headers` (from the repository root)
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portunus_proxy::fuzzing::forwarded(data);
});
