//! ACME end to end: the built binary against a real Pebble (Debian package `pebble`), each
//! test with its own Pebble, challtestsrv and ports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use portunus_test_utils::pebble::{Options, Pebble, available, free_port};
use portunus_test_utils::tls::{connect, recording_config, request_over, trusting};
use portunus_test_utils::{EchoServer, Portunus, wait_until};
use rustls::pki_types::CertificateDer;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_portunus"))
}

struct Env {
    dir: tempfile::TempDir,
    pebble: Pebble,
    http: u16,
    https: u16,
    admin: u16,
}

fn env(eab: Vec<(String, String)>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (http, https, admin) = (free_port(), free_port(), free_port());
    let options = Options {
        http01_port: http,
        tlsalpn01_port: https,
        eab,
    };
    let pebble = Pebble::start(&dir.path().join("pebble"), &options).unwrap();
    Env {
        dir,
        pebble,
        http,
        https,
        admin,
    }
}

impl Env {
    fn https(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.https))
    }

    /// Writes the configuration; `acme_extra` goes into `[acme]`.
    fn config(&self, acme_extra: &str, sites: &str) -> PathBuf {
        let path = self.dir.path().join("portunus.toml");
        std::fs::write(
            &path,
            format!(
                r#"email = "ops@example.test"
storage = "{storage}"
[listen]
http = "127.0.0.1:{http}"
https = "127.0.0.1:{https}"
admin = "127.0.0.1:{admin}"
[acme]
ca = "{directory}"
ca_root = "{ca_root}"
backoff_base = "1s"
{acme_extra}
{sites}"#,
                storage = self.dir.path().join("storage").display(),
                http = self.http,
                https = self.https,
                admin = self.admin,
                directory = self.pebble.directory,
                ca_root = self.pebble.tls_ca.display(),
            ),
        )
        .unwrap();
        path
    }

    fn start(&self, config: &Path) -> Portunus {
        Portunus::start(&bin(), config, 3).unwrap()
    }

    /// Waits until `host` presents a certificate chaining to Pebble's root; returns its leaf.
    async fn served(&self, host: &str, p: &Portunus) -> CertificateDer<'static> {
        let root = self.pebble.root_pem().unwrap();
        for _ in 0..300 {
            let (config, recorder) = recording_config(&[b"http/1.1"]);
            if connect(self.https(), Some(host), config).await.is_ok()
                && let Ok(stream) = connect(
                    self.https(),
                    Some(host),
                    trusting(&root, &[b"h2", b"http/1.1"]),
                )
                .await
            {
                let (reply, _) = request_over(stream, host, "/").await.unwrap();
                assert_eq!(reply.status, 200, "{host}");
                return recorder.leaf().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{host} never got a valid certificate\n{}\n{}",
            p.log(),
            self.pebble.log()
        );
    }

    fn status(&self) -> serde_json::Value {
        let out = std::process::Command::new("curl")
            .args(["-fsS", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{}/status", self.admin))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }
}

fn sites(upstream: &str) -> String {
    format!(
        r#"
[[site]]
hosts = ["one.test"]
upstreams = ["{upstream}"]
[[site]]
hosts = ["two.test", "www.two.test"]
upstreams = ["{upstream}"]
[[site]]
hosts = ["three.test"]
upstreams = ["{upstream}"]
"#
    )
}

const HOSTS: [&str; 4] = ["one.test", "two.test", "www.two.test", "three.test"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_issues_reuses_after_restart_and_renews_on_demand() {
    if !available() {
        return;
    }
    let up = EchoServer::start("up").await.unwrap();
    let env = env(Vec::new());
    let config = env.config("challenges = [\"tls-alpn-01\"]", &sites(&up.url()));
    let p = env.start(&config);
    let mut leaves = Vec::new();
    for host in HOSTS {
        leaves.push(env.served(host, &p).await);
    }
    assert!(!p.log().contains("http-01"), "only tls-alpn-01 was enabled");

    // Restart: the stored certificates are reused, nothing is ordered.
    drop(p);
    let p = env.start(&config);
    for (host, leaf) in HOSTS.iter().zip(&leaves) {
        assert_eq!(
            &env.served(host, &p).await,
            leaf,
            "{host}: same certificate after restart"
        );
    }
    assert!(!p.log().contains("ordering certificate"), "{}", p.log());

    // `portunus certs list` shows them through the admin API.
    let out = std::process::Command::new(bin())
        .args(["certs", "list", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for host in HOSTS {
        assert!(listing.contains(host), "{listing}");
    }

    // Forced renewal while a keep-alive connection stays up.
    let root = env.pebble.root_pem().unwrap();
    let stream = connect(
        env.https(),
        Some("one.test"),
        trusting(&root, &[b"http/1.1"]),
    )
    .await
    .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let ask =
        |s: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>| {
            s.send_request(
                http::Request::get("/")
                    .header("host", "one.test")
                    .body(http_body_util::Empty::new())
                    .unwrap(),
            )
        };
    assert_eq!(ask(&mut sender).await.unwrap().status(), 200);
    let out = std::process::Command::new(bin())
        .args(["certs", "renew", "one.test", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut renewed = leaves[0].clone();
    for _ in 0..300 {
        let (c, recorder) = recording_config(&[b"http/1.1"]);
        if connect(env.https(), Some("one.test"), c).await.is_ok() {
            renewed = recorder.leaf().unwrap();
            if renewed != leaves[0] {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(
        renewed,
        leaves[0],
        "the forced renewal swapped the certificate\n{}",
        p.log()
    );
    assert_eq!(
        ask(&mut sender).await.unwrap().status(),
        200,
        "the old connection stays up"
    );
    // The other names were not touched.
    assert_eq!(env.served("three.test", &p).await, leaves[3]);
    let status = env.status();
    let one = status["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "one.test")
        .unwrap();
    assert!(
        one["not_after"].as_u64().unwrap() > 0 && one["next_renewal"].as_u64().unwrap() > 0,
        "{status}"
    );
    assert!(
        one["issuer"].as_str().unwrap().contains("Pebble"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_01_issues_certificates() {
    if !available() {
        return;
    }
    let up = EchoServer::start("up").await.unwrap();
    let env = env(Vec::new());
    let config = env.config("challenges = [\"http-01\"]", &sites(&up.url()));
    let p = env.start(&config);
    for host in HOSTS {
        env.served(host, &p).await;
    }
    // The ACME challenge requests never reached the upstream.
    assert!(up.seen().iter().all(|s| !s.uri.contains("acme-challenge")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unvalidatable_host_backs_off_without_holding_back_the_others() {
    if !available() {
        return;
    }
    let up = EchoServer::start("up").await.unwrap();
    let env = env(Vec::new());
    // Nothing answers on 127.0.0.2: validation of bad.test fails every time.
    env.pebble.set_address("bad.test", "127.0.0.2").unwrap();
    let config = env.config(
        "",
        &format!(
            "[[site]]\nhosts = [\"good.test\", \"bad.test\"]\nupstreams = [\"{}\"]\n",
            up.url()
        ),
    );
    let p = env.start(&config);
    env.served("good.test", &p).await;
    assert!(
        wait_until(Duration::from_secs(30), || {
            env.status()["certificates"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["name"] == "bad.test" && c["last_error"].is_string())
            })
        })
        .await,
        "{}",
        p.log()
    );
    let status = env.status();
    let bad = status["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bad.test")
        .unwrap();
    assert!(
        bad["last_error"].as_str().unwrap().contains("bad.test"),
        "{status}"
    );
    assert!(bad["not_after"].is_null());
    // Backoff (1 s, 2 s, 4 s, ...): a handful of orders in 6 seconds, not a loop.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let orders = p
        .log()
        .lines()
        .filter(|l| l.contains("ordering certificate") && l.contains("bad.test"))
        .count();
    assert!(
        (1..=5).contains(&orders),
        "{orders} orders for bad.test\n{}",
        p.log()
    );
    let persisted = std::fs::read_to_string(
        std::fs::read_dir(env.dir.path().join("storage/state"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("bad.test.json"),
    )
    .unwrap();
    assert!(persisted.contains("\"failures\""), "{persisted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_ca_is_survived_and_the_renewal_succeeds_when_it_returns() {
    if !available() {
        return;
    }
    let up = EchoServer::start("up").await.unwrap();
    let mut env = env(Vec::new());
    let config = env.config(
        "",
        &format!(
            "[[site]]\nhosts = [\"keep.test\"]\nupstreams = [\"{}\"]\n",
            up.url()
        ),
    );
    let p = env.start(&config);
    let first = env.served("keep.test", &p).await;
    env.pebble.stop_pebble();
    let out = std::process::Command::new(bin())
        .args(["certs", "renew", "keep.test", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            env.status()["certificates"][0]["last_error"].is_string()
        })
        .await,
        "{}",
        p.log()
    );
    // Still serving the current certificate.
    let (c, recorder) = recording_config(&[b"http/1.1"]);
    connect(env.https(), Some("keep.test"), c).await.unwrap();
    assert_eq!(recorder.leaf().unwrap(), first);
    assert!(p.log().contains("certificate order failed"), "{}", p.log());

    env.pebble.start_pebble().unwrap();
    let root = env.pebble.root_pem().unwrap();
    let mut renewed = false;
    for _ in 0..300 {
        if connect(
            env.https(),
            Some("keep.test"),
            trusting(&root, &[b"http/1.1"]),
        )
        .await
        .is_ok()
        {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        renewed,
        "renewed from the restarted CA without a restart\n{}",
        p.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            env.status()["certificates"][0]["last_error"].is_null()
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_binding() {
    if !available() {
        return;
    }
    let up = EchoServer::start("up").await.unwrap();
    // 32 bytes, base64url as a CA hands it out.
    let hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W".to_owned();
    let env = env(vec![("kid-1".to_owned(), hmac.clone())]);
    let config = env.config(
        &format!("eab = {{ kid = \"kid-1\", hmac_key = \"{hmac}\" }}"),
        &format!(
            "[[site]]\nhosts = [\"eab.test\"]\nupstreams = [\"{}\"]\n",
            up.url()
        ),
    );
    let p = env.start(&config);
    env.served("eab.test", &p).await;
    let accounts = env.dir.path().join("storage/accounts");
    let ca_dir = std::fs::read_dir(&accounts)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let account = ca_dir.join("ops_example.test/account.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&account).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!p.log().contains(&hmac), "the HMAC key is never logged");
}
