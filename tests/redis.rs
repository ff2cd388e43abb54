//! The Redis bridge against a real `redis-server` (Debian's package; `.ci/run` installs it),
//! started on a free loopback port and stopped by pid: rooms across two megasock nodes, exactly
//! once and in per-sender order; bare payloads from other backends; Redis down and back
//! without restarting megasock; the stream of client messages.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A redis-server on 127.0.0.1, stopped (by pid) when dropped.
struct Redis {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's redis-server package; .ci/run installs it)");
        let r = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.cmd(&["PING"]).as_deref() != Some("+PONG") {
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn start() -> Redis {
        Redis::start_on(free_port())
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one command; returns the first line of the reply (RESP), or None if unreachable.
    fn cmd(&self, args: &[&str]) -> Option<String> {
        let raw = self.raw(args)?;
        Some(raw.lines().next().unwrap_or("").to_string())
    }

    /// The whole reply, read until it stops coming.
    fn raw(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], self.port))).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => break,
            }
        }
        (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(redis: &str, extra: &[&str]) -> ServerProc {
    let mut args = vec!["--workers", "2", "--redis", redis];
    args.extend_from_slice(extra);
    ServerProc::start_with(&args, |c| {
        c.env(
            "RUST_LOG",
            std::env::var("MEGASOCK_TEST_LOG").unwrap_or_else(|_| "error".into()),
        );
    })
}

/// Waits until `srv` reports its Redis link up and `n` room channels subscribed.
fn wait_subscribed(srv: &ServerProc, n: i64) {
    srv.wait_metric("megasock_redis_link_up", 10, |v| v == 1);
    srv.wait_metric("megasock_redis_subscriptions", 10, |v| v >= n);
}

#[test]
fn a_room_spans_two_nodes_exactly_once_in_order() {
    let redis = Redis::start();
    let a = node(&redis.url(), &[]);
    let b = node(&redis.url(), &[]);
    let mut on_a: Vec<Client> = (0..3).map(|_| Client::connect(a.ws, "/ws/town")).collect();
    let mut on_b: Vec<Client> = (0..3).map(|_| Client::connect(b.ws, "/ws/town")).collect();
    wait_subscribed(&a, 1);
    wait_subscribed(&b, 1);
    // Two senders, one per node, 100 messages each, mixed opcodes.
    for i in 0..100 {
        on_a[0].send_text(&format!("a{i}"));
        on_b[0].send_binary(format!("b{i}").as_bytes());
    }
    for (who, c) in on_a.iter_mut().chain(on_b.iter_mut()).enumerate() {
        c.set_timeout(Duration::from_secs(10));
        let (mut next_a, mut next_b) = (0, 0);
        for _ in 0..200 {
            let f = c.recv();
            let text = String::from_utf8(f.payload).unwrap();
            let (from, n) = text.split_at(1);
            let n: usize = n.parse().unwrap();
            match from {
                "a" => {
                    assert_eq!((n, f.opcode), (next_a, TEXT), "client {who}");
                    next_a += 1;
                }
                _ => {
                    assert_eq!((n, f.opcode), (next_b, BINARY), "client {who}");
                    next_b += 1;
                }
            }
        }
        assert!(
            c.nothing_pending() || {
                std::thread::sleep(Duration::from_millis(200));
                c.nothing_pending()
            },
            "client {who}: a duplicate"
        );
    }
    assert!(a.metric("megasock_redis_published_total") >= 100);
    assert!(b.metric("megasock_redis_received_total") >= 100);
    assert_eq!(a.metric("megasock_redis_dropped_total"), 0);
    // The publish API goes through the bridge too, and a bare PUBLISH from any backend is a
    // text message.
    let resp = http_exchange(
        b.metrics,
        b"POST /publish/town HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: 3\r\n\r\napi",
    );
    assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
    redis.cmd(&["PUBLISH", "megasock:room:town", "bare"]);
    // Two publishers (node b's bridge, redis-cli): no order between them, each exactly once.
    for c in on_a.iter_mut().chain(on_b.iter_mut()) {
        let mut got = [c.recv(), c.recv()];
        got.sort_by(|x, y| x.payload.cmp(&y.payload));
        assert_eq!((got[0].opcode, &got[0].payload[..]), (TEXT, &b"api"[..]));
        assert_eq!((got[1].opcode, &got[1].payload[..]), (TEXT, &b"bare"[..]));
    }
}

#[test]
fn redis_down_keeps_local_delivery_and_recovers_without_a_restart() {
    let port = free_port();
    let redis = Redis::start_on(port);
    let a = node(&redis.url(), &["--redis-required"]);
    let b = node(&redis.url(), &[]);
    let mut a1 = Client::connect(a.ws, "/ws/ops");
    let mut a2 = Client::connect(a.ws, "/ws/ops");
    let mut b1 = Client::connect(b.ws, "/ws/ops");
    wait_subscribed(&a, 1);
    wait_subscribed(&b, 1);
    drop(redis); // killed
    a.wait_metric("megasock_redis_link_up", 10, |v| v == 0);
    let ready = http_exchange(
        a.metrics,
        b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(
        ready.starts_with("HTTP/1.1 503"),
        "--redis-required: {ready}"
    );
    // Members on one node still reach each other.
    a1.send_text("local");
    assert_eq!(a1.recv().payload, b"local");
    assert_eq!(a2.recv().payload, b"local");
    // Redis comes back on the same port: the nodes reconnect and resubscribe by themselves.
    let _redis = Redis::start_on(port);
    wait_subscribed(&a, 1);
    wait_subscribed(&b, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    b1.set_timeout(Duration::from_millis(500));
    let mut crossed = false;
    while !crossed && Instant::now() < deadline {
        a1.send_text("again");
        while let Some(f) = b1.try_recv() {
            crossed |= f.payload == b"again";
        }
    }
    assert!(crossed, "cross-node delivery resumed");
    let ready = http_exchange(
        a.metrics,
        b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(
        a.metric("megasock_redis_dropped_total{reason=\"redis_down\"}") >= 1
            || a.metric("megasock_redis_published_total") >= 1
    );
}

#[test]
fn every_client_message_lands_in_the_stream_once() {
    let redis = Redis::start();
    let a = node(&redis.url(), &["--redis-stream", "megasock:in"]);
    let mut room = Client::connect(a.ws, "/ws/jobs");
    let mut echo = Client::connect(a.ws, "/echo");
    for i in 0..50 {
        room.send_text(&format!("job-{i}"));
        echo.send_text(&format!("echo-{i}"));
    }
    for i in 0..50 {
        assert_eq!(room.recv().payload, format!("job-{i}").as_bytes());
        assert_eq!(echo.recv().payload, format!("echo-{i}").as_bytes());
    }
    a.wait_metric("megasock_redis_stream_appended_total", 10, |v| v == 100);
    assert_eq!(redis.cmd(&["XLEN", "megasock:in"]).as_deref(), Some(":100"));
    let all = redis.raw(&["XRANGE", "megasock:in", "-", "+"]).unwrap();
    for i in 0..50 {
        assert_eq!(
            all.matches(&format!("\r\njob-{i}\r\n")).count(),
            1,
            "job-{i}"
        );
        assert_eq!(
            all.matches(&format!("\r\necho-{i}\r\n")).count(),
            1,
            "echo-{i}"
        );
    }
    assert!(
        all.contains("\r\njobs\r\n")
            && all.contains("\r\nroom\r\n")
            && all.contains("\r\nnode\r\n")
    );
}

/// A local Redis Cluster of three masters (`redis-server --cluster-enabled` and
/// `redis-cli --cluster create`), each stopped by pid.
struct RedisCluster {
    nodes: Vec<Redis>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl RedisCluster {
    fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(format!("megasock-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = Vec::new();
        for i in 0..3 {
            // A cluster node also listens on its port + 10000 (the cluster bus).
            let port = std::iter::repeat_with(free_port)
                .find(|&p| p <= 55000)
                .unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(dir.join(format!("nodes-{i}.conf")))
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server");
            let r = Redis { child, port };
            let deadline = Instant::now() + Duration::from_secs(10);
            while r.cmd(&["PING"]).as_deref() != Some("+PONG") {
                assert!(Instant::now() < deadline, "cluster node did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            nodes.push(r);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes.iter().all(|n| {
            n.raw(&["CLUSTER", "INFO"])
                .is_some_and(|i| i.contains("cluster_state:ok"))
        }) {
            assert!(Instant::now() < deadline, "cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster {
            nodes,
            _dir: TempDir(dir),
        }
    }
}

/// `--redis-sharded`: rooms across two megasock nodes through a 3-master Redis Cluster, each
/// room's channel subscribed and published only on the master that owns its slot.
#[test]
fn sharded_pubsub_keeps_each_room_on_its_shard() {
    let cluster = RedisCluster::start();
    let seed = cluster.nodes[0].url();
    let a = node(&seed, &["--redis-sharded"]);
    let b = node(&seed, &["--redis-sharded"]);
    let rooms = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
    let mut clients = Vec::new();
    for r in rooms {
        let path = format!("/ws/{r}");
        clients.push((
            r,
            Client::connect(a.ws, &path),
            Client::connect(b.ws, &path),
        ));
    }
    wait_subscribed(&a, rooms.len() as i64);
    wait_subscribed(&b, rooms.len() as i64);
    for (r, on_a, _) in clients.iter_mut() {
        on_a.send_text(&format!("to {r}"));
    }
    for (r, on_a, on_b) in clients.iter_mut() {
        assert_eq!(on_a.recv().payload, format!("to {r}").as_bytes());
        on_b.set_timeout(Duration::from_secs(10));
        assert_eq!(
            on_b.recv().payload,
            format!("to {r}").as_bytes(),
            "room {r} across nodes"
        );
    }
    // Every room channel is held by exactly one master: the owner of its slot.
    let mut per_master = Vec::new();
    for n in &cluster.nodes {
        let listed = n.raw(&["PUBSUB", "SHARDCHANNELS"]).unwrap_or_default();
        per_master.push(listed);
    }
    let mut masters_used = std::collections::HashSet::new();
    for r in rooms {
        let channel = format!("megasock:room:{r}");
        let holders: Vec<usize> = per_master
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains(&format!("\r\n{channel}\r\n")))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(holders.len(), 1, "{channel} held by {holders:?}");
        masters_used.insert(holders[0]);
    }
    assert!(
        masters_used.len() >= 2,
        "the rooms spread over the shards: {masters_used:?}"
    );
}

/// A channel that never goes quiet does not hold back a new room's subscription.
#[test]
fn a_busy_channel_does_not_hold_back_new_rooms() {
    let redis = Redis::start();
    let a = node(&redis.url(), &[]);
    let _busy_member = Client::connect(a.ws, "/ws/busy");
    wait_subscribed(&a, 1);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pump = {
        let (stop, port) = (stop.clone(), redis.port);
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
            let cmd = b"*3\r\n$7\r\nPUBLISH\r\n$18\r\nmegasock:room:busy\r\n$4\r\ntick\r\n";
            let mut sink = [0u8; 4096];
            s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            // One message every 2 ms: never 50 ms of silence on the subscriber's connection.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                if s.write_all(cmd).is_err() {
                    return;
                }
                let _ = s.read(&mut sink);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut quiet = Client::connect(a.ws, "/ws/quiet");
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis
        .raw(&["PUBSUB", "CHANNELS", "megasock:room:quiet"])
        .is_none_or(|r| !r.contains("quiet"))
    {
        assert!(
            Instant::now() < deadline,
            "the quiet room was never subscribed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    redis.cmd(&["PUBLISH", "megasock:room:quiet", "hello quiet"]);
    quiet.set_timeout(Duration::from_secs(5));
    assert_eq!(quiet.recv().payload, b"hello quiet");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pump.join().unwrap();
}

/// `--proxy-protocol`: the client address from HAProxy's PROXY header (v1 or v2) is the one
/// megasock reports (here in the stream entries); a connection without the header gets 400.
#[test]
fn proxy_protocol_gives_the_real_client_address() {
    let redis = Redis::start();
    let a = node(
        &redis.url(),
        &["--proxy-protocol", "--redis-stream", "megasock:in"],
    );
    // v2: PROXY, TCP over IPv4, 203.0.113.7:4242 -> 10.0.0.1:8080.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend([
        0x21, 0x11, 0, 12, 203, 0, 113, 7, 10, 0, 0, 1, 0x10, 0x92, 0x1f, 0x90,
    ]);
    let v1 = b"PROXY TCP6 2001:db8::5 2001:db8::1 5555 8080\r\n".to_vec();
    for (header, text) in [(v2, "via v2"), (v1, "via v1")] {
        let mut s = TcpStream::connect(a.ws).unwrap();
        s.write_all(&header).unwrap();
        let mut c = Client::from_stream(s, "/ws/proxied");
        c.send_text(text);
        assert_eq!(c.recv().payload, text.as_bytes());
    }
    a.wait_metric("megasock_redis_stream_appended_total", 10, |v| v == 2);
    let all = redis.raw(&["XRANGE", "megasock:in", "-", "+"]).unwrap();
    assert!(all.contains("\r\n203.0.113.7:4242\r\n"), "{all}");
    assert!(all.contains("\r\n[2001:db8::5]:5555\r\n"), "{all}");
    // No header: refused before the upgrade.
    let resp = http_exchange(a.ws, upgrade_request("/ws/proxied").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("PROXY"), "{resp}");
}
