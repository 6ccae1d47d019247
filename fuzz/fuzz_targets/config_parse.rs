//! Configuration parsing never panics: any text gives a configuration or errors with
//! positions inside the text.
//!
//! Run with: `RUSTC_BOOTSTRAP=1 cargo fuzz run config_parse` (from the repository root)
#![no_main]

// The binary's configuration module, compiled here as it is.
#[allow(dead_code, clippy::all)]
#[path = "../../src/config.rs"]
mod config;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = config::parse(std::path::Path::new("fuzz.toml"), text) {
        let lines = text.lines().count().max(1);
        for e in errors.0 {
            assert!(e.line >= 1 && e.line <= lines + 1, "{e}");
        }
    }
});
