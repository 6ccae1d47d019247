//! Worker threads: one single-threaded tokio runtime per worker.
//!
//! The HTTP and HTTPS listeners are bound once per worker with `SO_REUSEPORT`, so the kernel
//! spreads new connections over the workers and a connection stays on one thread from accept
//! to close: no work stealing and no cross-thread wake-ups on the request path, and each
//! worker keeps its own upstream connection pool. Worker 0 is the main thread's runtime, which
//! also runs the control plane (certificates, ACME, Docker, admin API).
//! This measured faster per core than tokio's multi-thread scheduler (BENCHMARKS.md).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::thread::JoinHandle;

use anyhow::Context;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The runtimes that serve client connections.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// How many workers `configured` means: 0 is one per CPU.
pub fn count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// A single-threaded runtime with I/O and timers (each worker's, and the CLI commands').
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

impl Workers {
    /// `main` is worker 0; starts `n - 1` more threads, each with its own runtime.
    pub fn start(main: Handle, n: usize) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = vec![main];
        let mut threads = Vec::new();
        for i in 1..n.max(1) {
            let rt = runtime()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("portunus-worker-{i}"))
                .spawn(move || rt.block_on(stop.cancelled_owned()))
                .context("cannot start a worker thread")?;
            threads.push(thread);
        }
        Ok(Self {
            handles,
            stop,
            threads: Mutex::new(threads),
        })
    }

    /// The workers' runtimes, worker 0 first.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stops the worker threads (their remaining tasks are dropped) and waits for them.
    pub fn stop(&self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut *crate::instance::lock(&self.threads));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Binds `addr` `n` times: one socket per worker, sharing the port with `SO_REUSEPORT` when
/// `n > 1`. `[::]` falls back to `0.0.0.0` on hosts without IPv6. Port 0 picks one port for all.
pub fn bind_each(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let first = match bind_one(addr, n > 1) {
        Ok(l) => l,
        Err(e) if addr.ip().is_unspecified() && addr.is_ipv6() => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            bind_one(v4, n > 1)
                .with_context(|| format!("cannot listen on {addr} ({e}) nor on {v4}"))?
        }
        Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr}")),
    };
    let local = first.local_addr().context("listener address")?;
    let mut all = vec![first];
    for _ in 1..n {
        all.push(bind_one(local, true).with_context(|| format!("cannot listen on {local}"))?);
    }
    Ok(all)
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}
