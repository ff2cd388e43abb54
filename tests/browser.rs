//! The demo page (`GET /`) in a real browser: headless Chromium, driven by
//! `tests/browser/demo.mjs` (playwright-core), joins one room from two pages and chats, with
//! permessage-deflate (Chromium always offers it), checked on /metrics.
//!
//! Needs Debian's `/usr/bin/chromium` and `npm ci` in `tests/browser`; `.ci/run` installs both.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `<title>` of the page as it is in the source tree.
fn page_title() -> String {
    let html = std::fs::read_to_string(root().join("src/demo/index.html")).unwrap();
    let start = html.find("<title>").expect("the page has a <title>") + "<title>".len();
    let end = start + html[start..].find("</title>").unwrap();
    let title = html[start..end].trim().to_string();
    assert!(!title.is_empty(), "the page's <title> is empty");
    title
}

fn check_prerequisites() {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push(format!("{CHROMIUM} (apt-get install chromium)"));
    }
    if !root()
        .join("tests/browser/node_modules/playwright-core")
        .is_dir()
    {
        missing.push("tests/browser/node_modules (cd tests/browser && npm ci)".to_string());
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node (apt-get install nodejs)".to_string());
    }
    assert!(
        missing.is_empty(),
        "the browser test needs: {}.\n.ci/run installs them (chromium via apt, `npm ci` in \
         tests/browser); run it once, or install them by hand.",
        missing.join(", ")
    );
}

#[test]
fn demo_page_chats_between_two_browser_pages() {
    check_prerequisites();
    let title = page_title();
    let server = ServerProc::start(&["--workers", "2"]);

    let resp = http_exchange(server.ws, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    let (head, body) = resp.split_once("\r\n\r\n").expect("a complete response");
    assert!(head.starts_with("HTTP/1.1 200 "), "GET / answered: {head}");
    assert!(
        head.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("content-type:") && l.contains("text/html")
        }),
        "GET / is not text/html: {head}"
    );
    assert!(
        body.contains(&format!("<title>{title}</title>")),
        "GET / does not carry the page's title {title:?}"
    );

    let shot = root().join("target/demo-screenshot.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&shot);
    let logs = std::env::temp_dir().join(format!("megasock-browser-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    let (out_path, err_path) = (logs.join("stdout"), logs.join("stderr"));

    let started = Instant::now();
    let mut node = Command::new("node")
        .arg("tests/browser/demo.mjs")
        .arg(format!("http://{}", server.ws))
        .arg(&shot)
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn node");
    // demo.mjs stops itself after 30 s; this is the backstop if node itself hangs.
    let status = loop {
        if let Some(s) = node.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = node.kill();
            let _ = node.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&logs);
    println!("{out}{err}demo.mjs took {:.1?}", started.elapsed());
    match status {
        Some(s) => assert!(s.success(), "demo.mjs failed ({s}):\n{out}{err}"),
        None => panic!("demo.mjs did not finish within 60 s:\n{out}{err}"),
    }

    // Chromium always offers permessage-deflate: both pages agreed to it, the messages they
    // sent arrived compressed, and the copies megasock sent them went out compressed (the
    // texts are long enough for --deflate-min-size and shrink).
    let text = server.metrics_text();
    let metric = |name: &str| server.metric(name);
    assert!(
        metric("megasock_deflate_negotiated_total") >= 2,
        "pages did not negotiate permessage-deflate:\n{text}"
    );
    assert!(
        metric("megasock_deflate_messages_inflated_total") >= 2,
        "Chromium's messages did not arrive compressed:\n{text}"
    );
    assert!(
        metric("megasock_deflate_messages_compressed_total") >= 2,
        "the demo's messages were not sent compressed:\n{text}"
    );
    assert!(
        metric("megasock_deflate_compress_out_bytes_total")
            < metric("megasock_deflate_compress_in_bytes_total"),
        "{text}"
    );

    let size = std::fs::metadata(&shot)
        .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()))
        .len();
    assert!(size > 1024, "screenshot is only {size} bytes");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "screenshot is not a PNG"
    );
}

/// The demo page over https:// and its WebSocket over wss://, in Chromium, with a certificate
/// made for the test. Chromium is told to trust exactly that certificate's key
/// (`--ignore-certificate-errors-spki-list`, a pin, not `--ignore-certificate-errors`), which
/// needs no NSS database; without the flag the page does not load (checked by hand).
#[test]
fn demo_page_chats_over_wss_with_a_test_certificate() {
    check_prerequisites();
    let dir = std::env::temp_dir().join(format!("megasock-browser-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let sha256 = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .unwrap()
        .common
        .hash_provider;
    let spki = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(sha256.hash(&rcgen::PublicKeyData::subject_public_key_info(&key)))
    };
    let server = ServerProc::start(&[
        "--workers",
        "2",
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ]);
    let wss = std::fs::read_to_string(server.ready_path())
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("wss="))
        .expect("a wss= line")
        .to_string();
    let shot = root().join("target/demo-screenshot-wss.png");
    let _ = std::fs::remove_file(&shot);
    let started = Instant::now();
    let out = Command::new("node")
        .arg("tests/browser/demo.mjs")
        .arg(format!("https://{wss}"))
        .arg(&shot)
        .env(
            "DEMO_CHROMIUM_ARGS",
            format!("--ignore-certificate-errors-spki-list={spki}"),
        )
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .expect("spawn node");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}demo.mjs over wss took {:.1?}", started.elapsed());
    assert!(out.status.success(), "demo.mjs over wss failed:\n{text}");
    // Everything went through TLS: the page, then two WebSockets (GET / and /rooms/...
    // pages are served and closed; the chat sockets end with the pages).
    assert!(server.metric("megasock_tls_handshakes_total") >= 4);
    assert_eq!(
        server.metric("megasock_disconnects_total{reason=\"tls_handshake_failed\"}"),
        0
    );
    assert!(server.metric("megasock_handshakes_total") >= 2);
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "screenshot is not a PNG"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
