//! Container discovery for the Portunus reverse proxy: Docker Engine API to routes.
//!
//! This crate does:
//! - connect to the engine (`docker.endpoint`, else `DOCKER_HOST`, else
//!   `unix:///var/run/docker.sock`), list the running containers, then follow the event
//!   stream, reconnecting with backoff and resyncing when the engine comes back;
//! - turn labels (`portunus.host`, `.port`, `.path`, `.tls`, `.network`, `.enable`) and
//!   nginx-proxy's `VIRTUAL_HOST`, `VIRTUAL_PORT`, `VIRTUAL_PATH` and `LETSENCRYPT_HOST` into
//!   sites, labels winning over variables; pool containers that share a host; leave out
//!   containers whose health check fails;
//! - apply the trust rules: `exposed_by_default`/`portunus.enable`, `allowed_domains`, and
//!   hosts owned by the configuration file, reporting what it refuses with the container's
//!   name.
//!
//! This crate does not proxy, obtain certificates or decide what to do with the sites it
//! reports: [`Discovery::run`] calls the caller back with the full set on every change. It
//! depends on `portunus-router` for host validation only.
//!
//! ```
//! use std::collections::HashMap;
//! use portunus_docker::{ContainerInfo, DockerSettings, sites};
//!
//! let mut web = ContainerInfo::default();
//! web.name = "web-1".into();
//! web.labels = HashMap::from([("portunus.host".into(), "app.example.com".into())]);
//! web.exposed_ports = vec![8080];
//! web.networks = vec![("bridge".into(), "172.17.0.2".parse()?)];
//! web.healthy = true;
//! let (found, problems) = sites(&[web], &DockerSettings::new(true));
//! assert!(problems.is_empty());
//! assert_eq!(found[0].upstreams, ["http://172.17.0.2:8080"]);
//! # Ok::<(), std::net::AddrParseError>(())
//! ```

mod discovery;
mod labels;

pub use discovery::{DiscoveredSite, Discovery, DockerSettings, Error, sites};
pub use labels::{ContainerInfo, ContainerRoute, LabelError, Rules, TlsMode, allowed, routes};
