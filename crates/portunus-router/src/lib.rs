//! Pure host and path matching: compile a set of sites into an immutable [`Router<T>`].
//!
//! This crate does:
//! - normalise host names (case, port, trailing dot, IDN to punycode) the same way at build time
//!   and at lookup time;
//! - match exact names first, then `*.example.com` wildcards (exactly one label deep);
//! - pick, within a site, the route with the longest path prefix on segment boundaries
//!   (`/api` matches `/api` and `/api/x`, not `/apix`), else the site's default target;
//! - refuse to build a table in which one host or one route is defined twice, naming both places.
//!
//! This crate does not do I/O, does not depend on tokio or hyper, and does not know what a
//! target is: `T` is whatever the caller routes to (an upstream pool, a static answer, ...).
//! Lookups cost the same whether the table holds a hundred hosts or a hundred thousand.
//!
//! ```
//! use portunus_router::{Router, Site};
//!
//! let router = Router::builder()
//!     .site(
//!         Site::new("portunus.toml:4:1")
//!             .host("example.com")
//!             .host("*.example.com")
//!             .default_target("web")
//!             .route("/api", "api"),
//!     )
//!     .build()?;
//!
//! let hit = router.lookup("WWW.Example.com:8443", "/api/users");
//! assert_eq!(hit.map(|m| (*m.target, m.prefix)), Some(("api", "/api")));
//! assert!(router.lookup("example.com", "/apix").is_some_and(|m| *m.target == "web"));
//! assert!(router.lookup("other.org", "/").is_none());
//! # Ok::<(), portunus_router::BuildErrors>(())
//! ```

mod host;
mod router;

pub use host::{HostError, HostPattern, normalize_host, split_host_port};
pub use router::{BuildError, BuildErrors, Match, Router, RouterBuilder, Site};
