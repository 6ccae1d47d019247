//! Host normalisation and routing never panic on hostile Host headers and paths.
//!
//! Run with: `RUSTC_BOOTSTRAP=1 cargo fuzz run router_lookup` (from the repository root)
#![no_main]

use libfuzzer_sys::fuzz_target;
use portunus_router::{HostPattern, Router, Site};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (host, path) = text.split_once('\n').unwrap_or((text, "/"));
    let _ = HostPattern::parse(host);
    let _ = portunus_router::normalize_host(host);
    let Ok(router) = Router::builder()
        .site(Site::new("a").host("example.com").host("*.example.com").default_target(0).route("/api", 1))
        .site(Site::new("b").host(host).default_target(2))
        .build()
    else {
        return;
    };
    if let Some(m) = router.lookup(host, path) {
        assert!(path.starts_with(m.prefix));
    }
});
