//! HTTPS end to end through the built binary: SNI, ALPN, redirects, HSTS, file and
//! local-CA certificates.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use portunus_store::{LOCAL_LEAF_LIFETIME, LocalCa};
use portunus_test_utils::tls::{connect, recording_config, request_over, trusting};
use portunus_test_utils::{EchoServer, Portunus, get, wait_until};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_portunus"))
}

/// Writes a certificate for `names` from `ca` as `<tag>.crt` / `<tag>.key`; returns the paths.
fn cert_files(dir: &Path, ca: &LocalCa, tag: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let pair = ca.issue(&names, LOCAL_LEAF_LIFETIME).unwrap();
    let (crt, key) = (
        dir.join(format!("{tag}.crt")),
        dir.join(format!("{tag}.key")),
    );
    std::fs::write(&crt, &pair.chain_pem).unwrap();
    std::fs::write(&key, &pair.key_pem).unwrap();
    (crt, key)
}

fn start(dir: &Path, head: &str, sites: &str) -> Portunus {
    let config = dir.join("portunus.toml");
    std::fs::write(
        &config,
        format!(
            "storage = \"{}\"\n[listen]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\n{head}\n{sites}",
            dir.join("storage").display()
        ),
    )
    .unwrap();
    Portunus::start(&bin(), &config, 2).unwrap()
}

#[tokio::test]
async fn sni_alpn_redirect_and_hsts() {
    let up = EchoServer::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::generate().unwrap();
    let (a_crt, a_key) = cert_files(dir.path(), &ca, "a", &["a.test"]);
    let (b_crt, b_key) = cert_files(dir.path(), &ca, "b", &["b.test"]);
    let (w_crt, w_key) = cert_files(dir.path(), &ca, "w", &["*.wild.test"]);
    let site = |host: &str, crt: &Path, key: &Path, extra: &str| {
        format!(
            "[[site]]\nhosts = [\"{host}\"]\nupstreams = [\"{}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n{extra}\n",
            up.url(),
            crt.display(),
            key.display()
        )
    };
    let sites = site("a.test", &a_crt, &a_key, "hsts = \"max-age=31536000\"")
        + &site("b.test", &b_crt, &b_key, "https_redirect = false")
        + &site("*.wild.test", &w_crt, &w_key, "");
    let p = start(dir.path(), "", &sites);
    let (http, https) = (p.addr("HTTP").unwrap(), p.addr("HTTPS").unwrap());

    // SNI picks the right certificate, the wildcard included.
    for (sni, names) in [
        ("a.test", vec!["a.test"]),
        ("b.test", vec!["b.test"]),
        ("x.wild.test", vec!["*.wild.test"]),
    ] {
        let (config, recorder) = recording_config(&[b"http/1.1"]);
        connect(https, Some(sni), config).await.unwrap();
        assert_eq!(recorder.names(), names, "{sni}");
    }
    // Unknown SNI, and no SNI without default_sni: the handshake fails, no certificate sent.
    for sni in [Some("unknown.test"), Some("a.b.wild.test"), None] {
        let (config, recorder) = recording_config(&[b"http/1.1"]);
        assert!(connect(https, sni, config).await.is_err(), "{sni:?}");
        assert!(recorder.leaf().is_none(), "{sni:?}: a certificate leaked");
    }

    // ALPN: h2 when offered, HTTP/1.1 otherwise; verified against the issuing root.
    let h2 = trusting(ca.root_pem(), &[b"h2", b"http/1.1"]);
    let stream = connect(https, Some("a.test"), h2).await.unwrap();
    let (reply, version) = request_over(stream, "a.test", "/over/h2").await.unwrap();
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(reply.json()["path"], "/over/h2");
    assert_eq!(reply.json()["headers"]["x-forwarded-proto"], "https");
    assert_eq!(reply.json()["headers"]["x-forwarded-ssl"], "on");
    assert_eq!(
        reply.headers["strict-transport-security"],
        "max-age=31536000"
    );
    let h1 = trusting(ca.root_pem(), &[b"http/1.1"]);
    let stream = connect(https, Some("b.test"), h1).await.unwrap();
    let (reply, version) = request_over(stream, "b.test", "/").await.unwrap();
    assert_eq!(version, http::Version::HTTP_11);
    assert!(reply.headers.get("strict-transport-security").is_none());

    // Plain HTTP: TLS sites redirect (path, query and port kept), except ACME challenges and
    // sites that turned it off.
    let r = get(http, "a.test", "/some/path?q=1").await.unwrap();
    assert_eq!(r.status, 308);
    assert_eq!(
        r.headers["location"],
        format!("https://a.test:{}/some/path?q=1", https.port())
    );
    let r = get(http, "a.test", "/.well-known/acme-challenge/unknown-token")
        .await
        .unwrap();
    assert_ne!(r.status, 308);
    let r = get(http, "b.test", "/plain").await.unwrap();
    assert_eq!((r.status, r.json()["path"].as_str()), (200, Some("/plain")));
    assert!(
        r.headers.get("strict-transport-security").is_none(),
        "no HSTS over HTTP"
    );
}

#[tokio::test]
async fn replaced_certificate_files_are_picked_up_without_dropping_connections() {
    let up = EchoServer::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::generate().unwrap();
    let (crt, key) = cert_files(dir.path(), &ca, "site", &["f.test"]);
    let p = start(
        dir.path(),
        "",
        &format!(
            "[[site]]\nhosts = [\"f.test\"]\nupstreams = [\"{}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            up.url(),
            crt.display(),
            key.display()
        ),
    );
    let https = p.addr("HTTPS").unwrap();
    let (config, recorder) = recording_config(&[b"http/1.1"]);
    let stream = connect(https, Some("f.test"), config).await.unwrap();
    let first = recorder.leaf().unwrap();
    // Keep a connection open across the change.
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let ask = |sender: &mut hyper::client::conn::http1::SendRequest<
        http_body_util::Empty<bytes::Bytes>,
    >| {
        sender.send_request(
            http::Request::get("/")
                .header("host", "f.test")
                .body(http_body_util::Empty::new())
                .unwrap(),
        )
    };
    assert_eq!(ask(&mut sender).await.unwrap().status(), 200);

    // Replace both files (a new key and certificate from another CA).
    let other = LocalCa::generate().unwrap();
    let pair = other
        .issue(&["f.test".to_owned()], LOCAL_LEAF_LIFETIME)
        .unwrap();
    std::fs::write(&key, &pair.key_pem).unwrap();
    std::fs::write(&crt, &pair.chain_pem).unwrap();
    let mut latest = first.clone();
    for _ in 0..200 {
        let (config, recorder) = recording_config(&[b"http/1.1"]);
        connect(https, Some("f.test"), config).await.unwrap();
        latest = recorder.leaf().unwrap();
        if latest != first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(latest, first, "new handshakes must get the new certificate");
    let res = ask(&mut sender).await.unwrap();
    assert_eq!(res.status(), 200, "the old connection keeps working");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_ca_serves_curl_and_reuses_its_certificates_after_restart() {
    let up = EchoServer::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sites = format!(
        "[[site]]\nhosts = [\"local.test\", \"127.0.0.1\"]\nupstreams = [\"{}\"]\ntls = \"internal\"\n",
        up.url()
    );
    let p = start(dir.path(), "default_sni = \"127.0.0.1\"", &sites);
    let https = p.addr("HTTPS").unwrap();
    let root = dir.path().join("storage/ca/root.pem");
    let curl = |url: String, resolve: Option<String>| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "--cacert"]).arg(&root);
        if let Some(r) = resolve {
            cmd.args(["--resolve", &r]);
        }
        let out = cmd
            .arg(url)
            .output()
            .expect("curl is needed: apt-get install curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let doc = curl(
        format!("https://local.test:{}/hello", https.port()),
        Some(format!("local.test:{}:127.0.0.1", https.port())),
    );
    assert_eq!(doc["path"], "/hello");
    // By IP: no SNI, the default_sni certificate (with the IP address in it).
    let doc = curl(format!("https://127.0.0.1:{}/ip", https.port()), None);
    assert_eq!(doc["path"], "/ip");

    let link = dir.path().join("storage/certs/internal/local.test");
    let before = std::fs::read_link(&link).unwrap();
    drop(p);
    let p = start(dir.path(), "default_sni = \"127.0.0.1\"", &sites);
    assert!(p.addr("HTTPS").is_some());
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        before,
        "a fresh stored certificate is reused"
    );
}

#[tokio::test]
async fn broken_certificate_is_skipped_and_other_sites_serve() {
    use std::os::unix::fs::PermissionsExt;
    let up = EchoServer::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::generate().unwrap();
    let (good_crt, good_key) = cert_files(dir.path(), &ca, "good", &["good.test"]);
    let (bad_crt, _) = cert_files(dir.path(), &ca, "bad", &["bad.test"]);
    let (_, other_key) = cert_files(dir.path(), &ca, "other", &["bad.test"]);
    std::fs::set_permissions(&good_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let site = |host: &str, crt: &Path, key: &Path| {
        format!(
            "[[site]]\nhosts = [\"{host}\"]\nupstreams = [\"{}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            up.url(),
            crt.display(),
            key.display()
        )
    };
    let p = start(
        dir.path(),
        "",
        &(site("good.test", &good_crt, &good_key) + &site("bad.test", &bad_crt, &other_key)),
    );
    let https = p.addr("HTTPS").unwrap();
    let (config, recorder) = recording_config(&[b"http/1.1"]);
    connect(https, Some("good.test"), config).await.unwrap();
    assert_eq!(recorder.names(), ["good.test"]);
    let (config, _) = recording_config(&[b"http/1.1"]);
    assert!(connect(https, Some("bad.test"), config).await.is_err());
    assert!(
        wait_until(Duration::from_secs(5), || p.log().contains("bad.crt")).await,
        "the mismatched pair is reported with its path:\n{}",
        p.log()
    );
    assert!(
        p.log().contains("readable by group or others"),
        "{}",
        p.log()
    );
}

#[test]
fn unusable_storage_is_a_clear_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portunus.toml");
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    std::fs::write(
        &config,
        format!(
            "storage = \"{}\"\n[listen]\nhttps = \"127.0.0.1:0\"\n[[site]]\nhosts = [\"s.test\"]\nrespond = \"x\"\ntls = \"internal\"\n",
            file.join("storage").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["run", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("storage"), "{stderr}");
}

#[tokio::test]
async fn acme_ca_internal_serves_default_sites_from_the_local_ca() {
    let up = EchoServer::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // No `tls` key: ACME by default, and `acme.ca = "internal"` makes that the local CA.
    let p = start(
        dir.path(),
        "[acme]\nca = \"internal\"",
        &format!(
            "[[site]]\nhosts = [\"auto.test\"]\nupstreams = [\"{}\"]\n",
            up.url()
        ),
    );
    let root = std::fs::read_to_string(dir.path().join("storage/ca/root.pem")).unwrap();
    let stream = connect(
        p.addr("HTTPS").unwrap(),
        Some("auto.test"),
        trusting(&root, &[b"h2"]),
    )
    .await
    .unwrap();
    let (reply, _) = request_over(stream, "auto.test", "/").await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(!p.log().contains("ordering certificate"));
}

/// `openssl s_client` once with `-sess_out`, once with `-sess_in`: what the first printed,
/// and whether the second resumed.
fn resumed(port: u16, version: &str, ca: &Path, dir: &Path) -> (String, bool) {
    let session = dir.join(format!("session{version}"));
    let run = |arg: &str| {
        let mut child = std::process::Command::new("openssl")
            .args([
                "s_client",
                version,
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "local.test",
            ])
            .arg("-CAfile")
            .arg(ca)
            .arg(arg)
            .arg(&session)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl is needed: apt-get install openssl");
        // Keep stdin open a moment: TLS 1.3 tickets arrive after the handshake.
        std::thread::sleep(Duration::from_millis(500));
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = run("-sess_out");
    assert!(first.contains("New,"), "{first}");
    let reused = run("-sess_in").contains("Reused,");
    (first, reused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_with_tls_1_2_and_1_3() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(
        dir.path(),
        "",
        "[[site]]\nhosts = [\"local.test\"]\nrespond = \"hi\"\ntls = \"internal\"\n",
    );
    let port = p.addr("HTTPS").unwrap().port();
    let ca = dir.path().join("storage/ca/root.pem");
    for version in ["-tls1_2", "-tls1_3"] {
        let (first, reused) = resumed(port, version, &ca, dir.path());
        assert!(reused, "{version} did not resume");
        if version == "-tls1_3" {
            // OpenSSL offers AES-256-GCM-SHA384 first; the server picks by its own order.
            assert!(
                first.contains("Cipher is TLS_AES_128_GCM_SHA256"),
                "{first}"
            );
        }
    }
}
