//! Runs every scenario of megasock-bench briefly (a few hundred connections) against a real
//! megasock server and checks that the JSON report holds sane, non-zero figures.
//!
//! The server binary: `$MEGASOCK_BIN` if set, else `megasock` next to the megasock-bench binary
//! under test (`<target>/<debug|release>/megasock`). Build it first (`cargo build --workspace`);
//! the tests fail, not skip, when it is missing.

use serde_json::Value;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_megasock-bench");

fn megasock_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MEGASOCK_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "MEGASOCK_BIN={} does not exist", p.display());
        return p;
    }
    let p = Path::new(BENCH).with_file_name("megasock");
    assert!(
        p.is_file(),
        "the megasock binary is missing at {}: build it first with `cargo build --workspace` \
         (or point MEGASOCK_BIN at a megasock binary)",
        p.display()
    );
    p
}

fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("megasock-bench-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A megasock server on 127.0.0.1:<kernel-picked port>, stopped (SIGTERM) on drop.
struct Server {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Server {
    fn start(name: &str, workers: u32) -> Server {
        Server::start_with(name, workers, &[])
    }

    fn start_with(name: &str, workers: u32, extra: &[&str]) -> Server {
        let dir = scratch_dir(name);
        let ready = dir.join("server.ready");
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let child = Command::new(megasock_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--workers",
                &workers.to_string(),
                "--ready-file",
            ])
            .arg(&ready)
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start megasock");
        let mut s = Server {
            child,
            addr: String::new(),
            dir,
        };
        let t0 = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Some(a) = text.lines().find_map(|l| l.strip_prefix("ws=")) {
                    s.addr = a.trim().to_string();
                    break;
                }
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("megasock exited ({st}) before it was ready: {}", s.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "megasock not ready after 20 s: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) with the pid of our own child process; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    status: i32,
    stdout: String,
    stderr: String,
    json: Value,
    dir: PathBuf,
}

/// A thread reading `r` to its end (a pipe of the child, so that it never blocks on a full pipe).
fn read_all(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Run megasock-bench with `args` (plus --json and --progress none), at most 120 s.
fn bench(name: &str, args: &[&str]) -> Run {
    let dir = scratch_dir(&format!("run-{name}"));
    let json_path = dir.join(format!("{name}.json"));
    let mut child = Command::new(BENCH)
        .args(args)
        .arg("--json")
        .arg(&json_path)
        .args(["--progress", "none"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start megasock-bench");
    let t_out = read_all(child.stdout.take().unwrap());
    let t_err = read_all(child.stderr.take().unwrap());
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("megasock-bench {args:?} did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = t_out.join().unwrap();
    let stderr = t_err.join().unwrap();
    let json = match std::fs::read_to_string(&json_path) {
        Ok(t) => serde_json::from_str(&t)
            .unwrap_or_else(|e| panic!("bad JSON in {}: {e}", json_path.display())),
        Err(_) => Value::Null,
    };
    Run {
        status: status.code().unwrap_or(-1),
        stdout,
        stderr,
        json,
        dir,
    }
}

impl Run {
    fn ok(&self) -> &Value {
        assert_eq!(
            self.status, 0,
            "megasock-bench failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert_eq!(
            self.json["ok"], true,
            "report not ok: {}",
            self.json["problems"]
        );
        &self.json
    }

    fn files_exist(&self) {
        for (_, p) in self.json["files"]["hgrm"].as_object().expect("hgrm files") {
            let p = p.as_str().unwrap();
            let text = std::fs::read_to_string(p).unwrap_or_else(|_| panic!("missing {p}"));
            assert!(
                text.contains("Percentile") && text.contains("#[Max"),
                "{p} is not an .hgrm file"
            );
        }
        let plots = self.json["files"]["plots"].as_array().expect("plots");
        assert!(!plots.is_empty(), "no plot written");
        for p in plots {
            let p = p.as_str().unwrap();
            let text = std::fs::read_to_string(p).unwrap_or_else(|_| panic!("missing {p}"));
            assert!(text.starts_with("<svg"), "{p} is not an SVG");
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn sane_latency(v: &Value, what: &str) {
    let (p50, p99, max) = (f(&v["p50"]), f(&v["p99"]), f(&v["max"]));
    assert!(f(&v["count"]) > 0.0, "{what}: empty histogram");
    assert!(
        p50 > 0.0 && p50 <= p99 && p99 <= max,
        "{what}: p50 {p50} p99 {p99} max {max}"
    );
    assert!(max < 60e6, "{what}: max {max} µs is absurd");
}

/// A broadcast report without lost, duplicated, reordered or corrupt deliveries.
fn every_delivery_sound(j: &Value) {
    for k in ["lost", "duplicated", "reordered", "corrupt"] {
        assert_eq!(j[k], 0, "{k}");
    }
}

#[test]
fn connect_holds_every_connection_and_measures_the_server() {
    let s = Server::start("connect", 2);
    let pid = s.pid().to_string();
    let r = bench(
        "connect",
        &[
            "connect",
            "--url",
            &s.url("/echo"),
            "--conns",
            "300",
            "--hold",
            "1",
            "--server-pid",
            &pid,
        ],
    );
    let j = r.ok();
    assert_eq!(j["connected"], 300);
    assert_eq!(j["failed"], 0);
    assert_eq!(j["open_at_end_of_hold"], 300);
    assert!(f(&j["connect_rate_per_s"]) > 0.0);
    sane_latency(&j["latency_us"], "handshake");
    sane_latency(&j["tcp_connect_latency_us"], "tcp connect");
    assert!(f(&j["server"]["rss_after_bytes"]) > 0.0);
    assert!(j["server"]["rss_per_conn_bytes"].is_number());
    assert!(j["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["open"] == 300));
    assert!(j["timeline"][0]["server_rss_bytes"].as_u64().unwrap() > 0);
    r.files_exist();
    assert!(r.stdout.contains("result: ok"));
}

#[test]
fn echo_checks_every_round_trip() {
    let s = Server::start("echo", 2);
    let r = bench(
        "echo",
        &[
            "echo",
            "--url",
            &s.url("/echo"),
            "--conns",
            "50",
            "--inflight",
            "4",
            "--secs",
            "1",
            "--size",
            "100",
        ],
    );
    let j = r.ok();
    assert!(
        f(&j["msgs_per_s"]) > 100.0,
        "msgs_per_s {}",
        j["msgs_per_s"]
    );
    assert!(f(&j["round_trips"]) >= f(&j["round_trips_in_window"]));
    assert_eq!(j["mismatched"], 0);
    assert_eq!(j["unanswered"], 0);
    assert_eq!(j["failed"], 0);
    sane_latency(&j["latency_us"], "rtt");
    r.files_exist();
    // Text frames too (the server validates UTF-8).
    let r = bench(
        "echo-text",
        &[
            "echo",
            "--url",
            &s.url("/echo"),
            "--conns",
            "10",
            "--secs",
            "0.5",
            "--text",
            "--no-plots",
        ],
    );
    assert_eq!(r.ok()["mismatched"], 0);
}

#[test]
fn large_messages_arrive_in_pieces_and_are_reassembled() {
    // 200 KB frames take several reads each (the 64 KiB read buffer, then the connection's own).
    let s = Server::start_with(
        "large",
        2,
        &["--max-message-size", "1MiB", "--max-backpressure", "16MiB"],
    );
    let r = bench(
        "large-echo",
        &[
            "echo",
            "--url",
            &s.url("/echo"),
            "--conns",
            "4",
            "--inflight",
            "2",
            "--secs",
            "0.5",
            "--size",
            "200000",
            "--no-plots",
        ],
    );
    let j = r.ok();
    assert!(f(&j["round_trips"]) > 0.0);
    assert_eq!(j["mismatched"], 0);
    let r = bench(
        "large-bcast",
        &[
            "broadcast",
            "--url",
            &s.url("/ws/it-large"),
            "--subs",
            "20",
            "--pubs",
            "2",
            "--msgs",
            "10",
            "--size",
            "200000",
            "--no-plots",
        ],
    );
    let j = r.ok();
    assert_eq!(j["deliveries"], 20 * 2 * 10);
    assert_eq!(j["lost"], 0);
}

#[test]
fn broadcast_delivers_everything_once_in_order() {
    let s = Server::start("broadcast", 2);
    let r = bench(
        "broadcast",
        &[
            "broadcast",
            "--url",
            &s.url("/ws/it-bcast"),
            "--subs",
            "200",
            "--pubs",
            "4",
            "--msgs",
            "50",
            "--size",
            "64",
        ],
    );
    let j = r.ok();
    assert_eq!(j["deliveries"], 200 * 4 * 50);
    assert_eq!(j["expected_deliveries"], 200 * 4 * 50);
    every_delivery_sound(j);
    assert!(f(&j["deliveries_per_s"]) > 0.0);
    sane_latency(&j["latency_us"], "delivery");
    assert!(f(&j["loadgen"]["run_cpu_s"]) > 0.0);
    r.files_exist();
}

#[test]
fn broadcast_over_two_processes_and_many_source_addresses_merges_exactly() {
    let s = Server::start("procs", 2);
    let r = bench(
        "procs",
        &[
            "broadcast",
            "--url",
            &s.url("/ws/it-procs"),
            "--subs",
            "120",
            "--pubs",
            "3",
            "--msgs",
            "40",
            "--procs",
            "2",
            "--threads",
            "1",
            "--source-ips",
            "127.0.0.2-127.0.0.9",
            "--no-plots",
        ],
    );
    let j = r.ok();
    assert_eq!(j["config"]["procs"], 2);
    assert_eq!(j["config"]["source_addresses"], 8);
    assert_eq!(j["members"], 120);
    assert_eq!(j["deliveries"], 120 * 3 * 40);
    // The merged histogram holds every delivery of both processes.
    assert_eq!(j["latency_us"]["count"], 120 * 3 * 40);
    every_delivery_sound(j);
}

#[test]
fn ladder_climbs_every_step() {
    let s = Server::start("ladder", 2);
    let r = bench(
        "ladder",
        &[
            "ladder",
            "--url",
            &s.url("/ws/it-ladder"),
            "--steps",
            "50,100,200",
            "--rounds",
            "5",
            "--interval",
            "50ms",
            "--bound",
            "5s",
        ],
    );
    let j = r.ok();
    let steps = j["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    for (st, want) in steps.iter().zip([50, 100, 200]) {
        assert_eq!(st["members"], want);
        assert_eq!(st["received"], want * 5);
        assert_eq!(st["lost"], 0);
        assert_eq!(st["pass"], true);
        let p95 = f(&st["last_member_ms"]["p95"]);
        assert!(p95 > 0.0 && p95 < 5000.0, "p95 {p95}");
    }
    assert_eq!(j["max_members_under_bound"], 200);
    sane_latency(&j["latency_us"], "ladder delivery");
    r.files_exist();
}

#[test]
fn refused_connections_fail_the_run_with_their_cause() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = bench(
        "refused",
        &[
            "connect",
            "--url",
            &format!("ws://127.0.0.1:{port}/echo"),
            "--conns",
            "20",
            "--hold",
            "0",
            "--no-plots",
        ],
    );
    assert_eq!(r.status, 1, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(r.json["ok"], false);
    assert_eq!(r.json["failed"], 20);
    assert_eq!(r.json["connections"]["failures"]["refused"], 20);
}

#[test]
fn limits_that_cannot_hold_the_run_are_refused_before_connecting() {
    let r = bench(
        "limits",
        &[
            "connect",
            "--url",
            "ws://127.0.0.1:9/echo",
            "--conns",
            "100000000",
            "--hold",
            "0",
        ],
    );
    assert_eq!(r.status, 2);
    assert!(
        r.stderr
            .contains("scripts/tune.sh apply --role loadgen --connections 100000000"),
        "{}",
        r.stderr
    );
    assert!(r.json.is_null(), "no report for a refused run");
}

/// A test CA and a certificate for 127.0.0.1 signed by it, as PEM files in `dir`.
fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(30);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[test]
fn wss_connect_echo_and_broadcast_over_tls() {
    let pki = scratch_dir("pki");
    let (ca, cert, key) = test_pki(&pki);
    let s = Server::start_with(
        "wss",
        2,
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let ready = std::fs::read_to_string(s.dir.join("server.ready")).unwrap();
    let wss = ready
        .lines()
        .find_map(|l| l.strip_prefix("wss="))
        .expect("a wss= line")
        .trim()
        .to_string();
    let ca = ca.to_str().unwrap();
    let url = |path: &str| format!("wss://{wss}{path}");
    let r = bench(
        "wss-connect",
        &[
            "connect",
            "--url",
            &url("/echo"),
            "--conns",
            "200",
            "--hold",
            "0.5",
            "--ca",
            ca,
        ],
    );
    assert_eq!(r.ok()["connected"], 200);
    let r = bench(
        "wss-echo",
        &[
            "echo",
            "--url",
            &url("/echo"),
            "--conns",
            "20",
            "--secs",
            "0.5",
            "--size",
            "20000",
            "--insecure",
            "--no-plots",
        ],
    );
    let j = r.ok();
    assert_eq!(j["mismatched"], 0);
    assert_eq!(j["unanswered"], 0);
    let r = bench(
        "wss-broadcast",
        &[
            "broadcast",
            "--url",
            &url("/ws/it-wss"),
            "--subs",
            "100",
            "--pubs",
            "2",
            "--msgs",
            "50",
            "--size",
            "64",
            "--ca",
            ca,
            "--no-plots",
        ],
    );
    let j = r.ok();
    assert_eq!(j["deliveries"], 100 * 2 * 50);
    every_delivery_sound(j);
    // No CA: refused before connecting, with what to do.
    let r = bench(
        "wss-noca",
        &["connect", "--url", &url("/echo"), "--conns", "1"],
    );
    assert_ne!(r.status, 0);
    assert!(
        r.stderr.contains("--ca FILE") || r.stdout.contains("--ca FILE"),
        "{}",
        r.stderr
    );
    let _ = std::fs::remove_dir_all(&pki);
}
