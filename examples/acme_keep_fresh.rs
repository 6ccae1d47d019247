//! Keep ACME certificates fresh in a directory with `portunus-store` + `portunus-acme` alone:
//! no Portunus HTTP server, just a tiny http-01 responder written here. Other programs read
//! `<dir>/certs/<ca-key>/<name>/{fullchain.pem, privkey.pem}`.
//!
//! Run with (against a local Pebble started by `shared/rig/pebble-up`, whose http-01 port is
//! `$RIG_HTTP01_PORT`):
//! `cargo run --example acme_keep_fresh -- "$PEBBLE_DIRECTORY" "$PEBBLE_TLS_CA" /tmp/certs 127.0.0.1:$RIG_HTTP01_PORT a.example.test b.example.test`
//! (Ctrl-C stops it.)

use std::sync::Arc;

use portunus_acme::{AcmeConfig, AcmeEvent, AcmeManager, ChallengeKind};
use portunus_store::{CertResolver, Challenges, FsStorage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Answers `GET /.well-known/acme-challenge/<token>` from `challenges`; 404 otherwise.
async fn http01_responder(listener: TcpListener, challenges: Arc<Challenges>) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let challenges = Arc::clone(&challenges);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let Ok(n) = stream.read(&mut buf).await else {
                return;
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let answer = path
                .strip_prefix("/.well-known/acme-challenge/")
                .and_then(|token| challenges.http01(token));
            let response = match answer {
                Some(body) => format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                ),
                None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_owned(),
            };
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [directory, ca_root, dir, listen, names @ ..] = args.as_slice() else {
        eprintln!(
            "usage: acme_keep_fresh DIRECTORY_URL CA_ROOT_PEM STORAGE_DIR HTTP01_ADDR NAME..."
        );
        std::process::exit(2);
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let resolver = Arc::new(CertResolver::new());
    let storage = Arc::new(FsStorage::open(dir)?);
    let config = AcmeConfig::new(directory.clone())
        .ca_root(ca_root)
        .challenges(vec![ChallengeKind::Http01]);
    let acme = AcmeManager::new(config, storage, Arc::clone(&resolver), provider)?;
    acme.set_names(names.iter().cloned());
    for problem in acme.load().await {
        eprintln!("skipped: {problem}");
    }
    tokio::spawn(http01_responder(
        TcpListener::bind(listen).await?,
        Arc::clone(resolver.challenges()),
    ));
    let mut events = acme.subscribe();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event {
                AcmeEvent::Issued {
                    name, not_after, ..
                } => println!("issued {name}, valid until {not_after}"),
                AcmeEvent::Failed { name, error, .. } => println!("failed {name}: {error}"),
                _ => {}
            }
        }
    });
    println!(
        "keeping {} certificate(s) fresh in {dir} (Ctrl-C stops)",
        names.len()
    );
    acme.run(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}
