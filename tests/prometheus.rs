//! deploy/prometheus and deploy/grafana against the real thing: promtool checks the config and
//! the alert rules, then a real `prometheus` scrapes a megasock under load, and every query of
//! every dashboard panel (and the query side of every alert) must parse and return data. A
//! renamed or missing metric fails here, not on an operator's screen.
//!
//! Needs Debian's `prometheus` package (`prometheus` and `promtool` on PATH); `.ci/run`
//! installs it.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

const MISSING: &str = "is not installed: tests/prometheus.rs needs Debian's `prometheus` package \
                       (prometheus and promtool); .ci/run installs it \
                       (apt-get install prometheus)";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Panics with the install hint unless `tool` runs.
fn require(tool: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{tool} --version` failed ({}): {tool} {MISSING}",
            out.status
        ),
        Err(e) => panic!("{tool} {MISSING} ({e})"),
    }
}

fn promtool(args: &[&str], file: &Path) {
    let out = Command::new("promtool")
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("promtool {MISSING} ({e})"));
    assert!(
        out.status.success(),
        "promtool {} {} failed:\n{}{}",
        args.join(" "),
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client (GET, Connection: close).

/// `%XX` for every byte but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Undoes `Transfer-Encoding: chunked`.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line without CRLF")?;
        let line = std::str::from_utf8(&body[..eol]).map_err(|e| e.to_string())?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|e| format!("chunk size {line:?}: {e}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// GET `target` from `addr`: the status and the body.
fn http_get(addr: SocketAddr, target: &str) -> Result<(u16, String), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no response head in {:?}", String::from_utf8_lossy(&raw)))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line: {head}"))?;
    let body = &raw[end + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

// ---------------------------------------------------------------------------------------------
// The prometheus process.

/// A running `prometheus`, killed (by pid) and reaped on drop, panics included.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Prometheus {
    /// Starts prometheus scraping `target` every second with the rules in `rules`, and waits
    /// for `/-/ready`.
    fn start(target: SocketAddr, rules: &Path) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("megasock-prometheus-{}", std::process::id()));
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n  - job_name: megasock\n    scrape_interval: 1s\n    \
             scrape_timeout: 1s\n    metrics_path: /metrics\n    static_configs:\n      \
             - targets: ['{target}']\n",
            rules.display()
        );
        // The port is free when picked; another process may take it before prometheus binds,
        // so a bind failure is retried with a new one.
        for attempt in 1..=3 {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("prometheus.yml"), &config).unwrap();
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
            let child = Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("prometheus {MISSING} ({e})"));
            // From here on, a panic kills it (Drop).
            let mut p = Prometheus {
                child,
                addr,
                dir: dir.clone(),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok((200, _)) = http_get(addr, "/-/ready") {
                    return p;
                }
                if let Ok(Some(status)) = p.child.try_wait() {
                    let text = p.log();
                    if text.contains("address already in use") && attempt < 3 {
                        break;
                    }
                    panic!("prometheus exited ({status}) before it was ready:\n{text}");
                }
                assert!(
                    Instant::now() < deadline,
                    "prometheus not ready within 30 s:\n{}",
                    p.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET an API path; the `data` member, or the error Prometheus gave.
    fn api(&self, target: &str) -> Result<Value, String> {
        let (status, body) = http_get(self.addr, target)?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!(
                "HTTP {status}: {}: {}",
                v["errorType"].as_str().unwrap_or("?"),
                v["error"].as_str().unwrap_or(&body)
            ))
        }
    }

    /// An instant query: its result (a vector's samples), or the error.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        match data["resultType"].as_str() {
            Some("vector" | "matrix") => Ok(data["result"].as_array().cloned().unwrap_or_default()),
            // A scalar or string always has a value.
            Some(_) => Ok(vec![data["result"].clone()]),
            None => Err(format!("no resultType in {data}")),
        }
    }

    /// The first sample's value of `expr` as a number (None if empty or not a number).
    fn value(&self, expr: &str) -> Option<f64> {
        let r = self.query(expr).ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Load: room traffic, echo, a protocol error, a 404, normal closes and API publishes, until
// stopped, so the counters the dashboard shows are moving while Prometheus scrapes.

struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

const ROOM: &str = "prom-load";
const MEMBERS: usize = 4;

fn load_loop(ws: SocketAddr, admin: SocketAddr, stop: &AtomicBool) {
    let mut room: Vec<Client> = (0..MEMBERS)
        .map(|_| Client::connect(ws, &format!("/ws/{ROOM}")))
        .collect();
    let mut echo = Client::connect(ws, "/echo");
    for c in room.iter().chain([&echo]) {
        c.set_timeout(Duration::from_secs(5));
    }
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for (i, c) in room.iter_mut().enumerate() {
            c.send_text(&format!("m {round} {i}"));
        }
        // Every member gets every member's message; API publishes to the room are extra.
        for (i, c) in room.iter_mut().enumerate() {
            let mut got = 0;
            while got < MEMBERS {
                match c.recv_or_end() {
                    Ok(f) if f.opcode == TEXT && f.payload.starts_with(b"m ") => got += 1,
                    Ok(_) => {}
                    Err(end) => {
                        panic!("room member {i}, round {round}: {end:?} after {got} messages")
                    }
                }
            }
        }
        echo.send_text(&format!("echo {round}"));
        loop {
            let f = echo.recv();
            if f.opcode == TEXT {
                assert_eq!(f.payload, format!("echo {round}").as_bytes());
                break;
            }
        }
        // Twice a second or so (rounds take 20 ms and more).
        if round % 25 == 0 {
            // An unmasked frame: close 1002 (protocol_error).
            let mut bad = Client::connect(ws, "/echo");
            bad.send_raw(&Client::frame_bytes(0x81, b"unmasked", false))
                .unwrap();
            assert_eq!(bad.expect_close(), Some(1002));
            // An unknown path: 404.
            let resp = http_exchange(ws, upgrade_request("/no-such-route").as_bytes());
            assert!(
                resp.starts_with("HTTP/1.1 404 "),
                "expected 404, got: {resp}"
            );
            // A normal close (client_close).
            let mut polite = Client::connect(ws, "/echo");
            polite.reply_close(1000);
            assert_eq!(polite.expect_close(), Some(1000));
            // The publish API (megasock_api_published_total, admin 202).
            let body = format!("api {round}");
            let req = format!(
                "POST /publish/{ROOM} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let resp = http_exchange(admin, req.as_bytes());
            assert!(resp.starts_with("HTTP/1.1 202 "), "publish API: {resp}");
        }
        round += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Load {
    fn start(ws: SocketAddr, admin: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || load_loop(ws, admin, &flag));
        Load {
            stop,
            handle: Some(handle),
        }
    }

    /// Panics (with its panic) if the load thread stopped.
    fn check_alive(&mut self) {
        if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
            if let Err(e) = self.handle.take().unwrap().join() {
                std::panic::resume_unwind(e);
            }
            panic!("the load thread stopped early");
        }
    }

    /// Stops the load; panics if it failed.
    fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Err(e) = self.handle.take().unwrap().join() {
            std::panic::resume_unwind(e);
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join(); // bounded: every read in the loop times out
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The dashboard.

/// Every `(panel title, refId, expr)` of the dashboard, rows' nested panels included.
fn dashboard_exprs(dash: &Value) -> Vec<(String, String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("(untitled)").to_string();
            if p["type"] != "row" {
                assert_eq!(
                    p["datasource"]["uid"], "${datasource}",
                    "panel {title:?}: datasource must be the ${{datasource}} variable"
                );
                let targets = p["targets"].as_array().cloned().unwrap_or_default();
                assert!(!targets.is_empty(), "panel {title:?} has no targets");
                for t in targets {
                    let expr = t["expr"]
                        .as_str()
                        .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
                    let ref_id = t["refId"].as_str().unwrap_or("?").to_string();
                    out.push((title.clone(), ref_id, expr.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// Grafana's interval variables as a 30 s window.
fn substitute(expr: &str) -> String {
    expr.replace("${__rate_interval}", "30s")
        .replace("$__rate_interval", "30s")
        .replace("${__interval}", "30s")
        .replace("$__interval", "30s")
}

/// `query op threshold` (how every alert is written): the query; None if not of that shape.
fn alert_query(expr: &str) -> Option<&str> {
    let (rest, threshold) = expr.trim().rsplit_once(' ')?;
    threshold.parse::<f64>().ok()?;
    let (query, op) = rest.trim_end().rsplit_once(' ')?;
    ["==", "!=", ">", "<", ">=", "<="]
        .contains(&op)
        .then_some(query.trim_end())
}

#[test]
fn dashboard_and_alert_queries_return_data_from_a_live_server() {
    require("promtool");
    require("prometheus");
    let prom_config = repo_file("deploy/prometheus/prometheus.yml");
    let alerts = repo_file("deploy/prometheus/alerts.yml");
    promtool(&["check", "config"], &prom_config);
    promtool(&["check", "rules"], &alerts);

    let dash_path = repo_file("deploy/grafana/megasock.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&dash_path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", dash_path.display()));
    let inputs = dash["__inputs"].as_array().cloned().unwrap_or_default();
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"),
        "the dashboard needs a DS_PROMETHEUS input"
    );
    let vars = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "the dashboard needs a `datasource` template variable"
    );
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 10, "only {} dashboard queries", exprs.len());

    let srv = ServerProc::start(&["--workers", "2", "--ping-interval", "1s"]);
    let mut load = Load::start(srv.ws, srv.metrics);
    let prom = Prometheus::start(srv.metrics, &alerts);

    // At least three scrapes, so every rate() has two samples in its window.
    let deadline = Instant::now() + Duration::from_secs(20);
    while prom
        .value("count_over_time(up{job=\"megasock\"}[1m]) >= 3")
        .is_none()
    {
        load.check_alive();
        assert!(
            Instant::now() < deadline,
            "fewer than 3 scrapes of megasock in 20 s; targets: {:?}\n{}",
            prom.api("/api/v1/targets"),
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        prom.value("up{job=\"megasock\"}"),
        Some(1.0),
        "megasock's /metrics is not scraped cleanly; targets: {:?}",
        prom.api("/api/v1/targets")
    );

    // The load shows in what Prometheus stored.
    for expr in [
        "sum(megasock_messages_sent_total)",
        "megasock_http_responses_total{status=\"404\"}",
        "megasock_disconnects_total{reason=\"protocol_error\"}",
        "megasock_disconnects_total{reason=\"client_close\"}",
        "sum(megasock_published_total)",
        "megasock_api_published_total",
        "megasock_delivery_latency_seconds_count",
    ] {
        let v = prom.value(expr);
        assert!(
            v.is_some_and(|v| v > 0.0),
            "{expr} = {v:?}: the load did not show"
        );
    }

    let mut failures = Vec::new();
    for (title, ref_id, expr) in &exprs {
        let q = substitute(expr);
        if q.contains('$') {
            failures.push(format!(
                "panel {title:?} {ref_id}: unknown variable in `{expr}`"
            ));
            continue;
        }
        match prom.query(&q) {
            Err(e) => failures.push(format!("panel {title:?} {ref_id}: `{q}`: {e}")),
            Ok(r) if r.is_empty() => {
                failures.push(format!("panel {title:?} {ref_id}: `{q}`: empty result"))
            }
            Ok(_) => {}
        }
    }

    // Every alert rule loaded, evaluated without error, and its query (the part before the
    // threshold) returns data.
    let deadline = Instant::now() + Duration::from_secs(20);
    let rules = loop {
        let groups = prom.api("/api/v1/rules").expect("rules API");
        let rules: Vec<Value> = groups["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "alert rules not all evaluated within 20 s: {rules:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    for r in &rules {
        let name = r["name"].as_str().unwrap_or("?");
        let expr = r["query"].as_str().unwrap_or("");
        if r["health"] != "ok" {
            failures.push(format!("alert {name}: `{expr}`: {}", r["lastError"]));
        }
        match alert_query(expr) {
            None => failures.push(format!(
                "alert {name}: `{expr}` is not `query <op> threshold`"
            )),
            Some(q) => match prom.query(q) {
                Err(e) => failures.push(format!("alert {name}: `{q}`: {e}")),
                Ok(r) if r.is_empty() => {
                    failures.push(format!("alert {name}: `{q}`: empty result"))
                }
                Ok(_) => {}
            },
        }
    }

    load.check_alive();
    load.finish();
    assert!(
        failures.is_empty(),
        "{} of {} dashboard queries and {} alerts failed against a live megasock:\n  {}",
        failures.len(),
        exprs.len(),
        rules.len(),
        failures.join("\n  ")
    );
    drop(prom);
    drop(srv);
}
