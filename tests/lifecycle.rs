//! Limits and lifecycle: timeouts, pings, connection limit, slow consumers, shutdown, leaks,
//! and the command line.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn handshake_timeout_closes_silent_and_slow_clients() {
    let srv = ServerProc::start(&["--workers", "1", "--handshake-timeout", "500ms"]);
    let mut silent = TcpStream::connect(srv.ws).unwrap();
    let mut partial = TcpStream::connect(srv.ws).unwrap();
    partial
        .write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let start = Instant::now();
    for s in [&mut silent, &mut partial] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 16];
        assert_eq!(
            s.read(&mut b).unwrap_or(0),
            0,
            "expected the server to close"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(
        srv.metric("megasock_disconnects_total{reason=\"handshake_timeout\"}"),
        2
    );
    srv.wait_metric("megasock_connections", 5, |v| v == 0);
}

#[test]
fn quiet_connections_are_pinged_and_idle_ones_closed() {
    let srv = ServerProc::start(&[
        "--workers",
        "1",
        "--ping-interval",
        "300ms",
        "--idle-timeout",
        "1200ms",
    ]);
    let mut idle = Client::connect(srv.ws, "/echo");
    let mut alive = Client::connect(srv.ws, "/echo");
    // The live client answers every ping and stays open well past the idle timeout.
    let live = std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_millis(2500);
        let mut pings = 0;
        alive.set_timeout(Duration::from_millis(100));
        while Instant::now() < until {
            if let Some(f) = alive.try_recv() {
                assert_eq!(f.opcode, PING, "unexpected {f:?}");
                pings += 1;
                alive.send_frame(PONG, true, &f.payload);
            }
        }
        assert!(pings >= 2, "got {pings} pings");
        alive.set_timeout(Duration::from_secs(5));
        alive.send_text("still open");
        let mut f = alive.recv();
        while f.opcode == PING {
            f = alive.recv();
        }
        assert_eq!(f.payload, b"still open");
    });
    // The idle client ignores pings: ping first, then close 1001.
    let f = idle.recv();
    assert_eq!(f.opcode, PING);
    let start = Instant::now();
    assert_eq!(idle.expect_close(), Some(1001));
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "closed too early"
    );
    idle.reply_close(1001);
    idle.expect_eof();
    live.join().unwrap();
    assert_eq!(
        srv.metric("megasock_disconnects_total{reason=\"idle_timeout\"}"),
        1
    );
    assert!(srv.metric("megasock_pings_sent_total") >= 3);
    // The loop-lag summary: turns counted, and quantiles published once a second from the
    // worker's turn histogram (in seconds).
    srv.wait_metric("megasock_loop_turn_seconds_count{worker=\"0\"}", 5, |v| {
        v > 0
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = srv.metrics_text();
        let max: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("megasock_loop_turn_seconds{worker=\"0\",quantile=\"1\"} ")
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if max > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "turn quantiles never published:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn over_max_connections_clients_get_503() {
    let srv = ServerProc::start(&["--workers", "2", "--max-connections", "3"]);
    let held: Vec<Client> = (0..3).map(|_| Client::connect(srv.ws, "/echo")).collect();
    let resp = http_exchange(srv.ws, upgrade_request("/echo").as_bytes());
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp}");
    assert!(resp.contains("\r\nConnection: close\r\n"));
    assert!(resp.contains("\r\nRetry-After: 1\r\n"));
    assert_eq!(
        srv.metric("megasock_disconnects_total{reason=\"over_capacity\"}"),
        1
    );
    // Room again once a client leaves.
    drop(held);
    srv.wait_metric("megasock_connections", 10, |v| v == 0);
    let mut c = Client::connect(srv.ws, "/echo");
    c.send_text("back");
    assert_eq!(c.recv().payload, b"back");
}

/// A member with a tiny receive buffer that never reads, in a room with a fast reader.
fn slow_consumer_setup(srv: &ServerProc) -> (Client, Client, Client) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&srv.ws.into()).unwrap();
    let slow = Client::from_stream(sock.into(), "/ws/flood");
    let reader = Client::connect(srv.ws, "/ws/flood");
    let publisher = Client::connect(srv.ws, "/ws/flood");
    (slow, reader, publisher)
}

/// Publishes 1 KiB messages until `done` says stop; the reader and publisher drain as it goes.
fn flood(
    srv: &ServerProc,
    reader: &mut Client,
    publisher: &mut Client,
    done: impl Fn(&ServerProc) -> bool,
) -> usize {
    let payload = vec![b'x'; 1024];
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(srv) {
        assert!(Instant::now() < deadline, "flood did not trip the limit");
        // Small batches: the fast reader and the publisher must never fall 64 KiB behind.
        for _ in 0..16 {
            publisher.send_binary(&payload);
            sent += 1;
        }
        for _ in 0..16 {
            assert_eq!(reader.recv().payload.len(), 1024);
            assert_eq!(publisher.recv().payload.len(), 1024);
        }
    }
    sent
}

#[test]
fn slow_consumer_is_closed_with_1008_and_others_keep_receiving() {
    let srv = ServerProc::start(&[
        "--workers",
        "2",
        "--max-backpressure",
        "64KiB",
        "--close-timeout",
        "20s",
    ]);
    let (mut slow, mut reader, mut publisher) = slow_consumer_setup(&srv);
    let sent = flood(&srv, &mut reader, &mut publisher, |s| {
        s.metric("megasock_disconnects_total{reason=\"slow_consumer\"}") == 1
    });
    // The others go on receiving after the slow one was cut off.
    for i in 0..50 {
        publisher.send_text(&format!("after {i}"));
        assert_eq!(reader.recv().payload, format!("after {i}").into_bytes());
        assert_eq!(publisher.recv().payload, format!("after {i}").into_bytes());
    }
    // The slow client finds data it had not read, then close 1008.
    let mut data = 0;
    let code = loop {
        let f = slow.recv();
        if f.opcode == CLOSE {
            break u16::from_be_bytes([f.payload[0], f.payload[1]]);
        }
        data += 1;
    };
    assert_eq!(code, 1008);
    assert!(
        data > 0 && data < sent,
        "data frames before close: {data} of {sent}"
    );
    slow.reply_close(1008);
    slow.expect_eof();
    assert!(srv.metric("megasock_messages_dropped_total{reason=\"slow_consumer\"}") > 0);
}

#[test]
fn slow_consumer_drop_policy_keeps_the_connection_and_counts_drops() {
    let srv = ServerProc::start(&[
        "--workers",
        "1",
        "--max-backpressure",
        "64KiB",
        "--slow-consumer",
        "drop",
    ]);
    let (mut slow, mut reader, mut publisher) = slow_consumer_setup(&srv);
    flood(&srv, &mut reader, &mut publisher, |s| {
        s.metric("megasock_messages_dropped_total{reason=\"slow_consumer\"}") > 10
    });
    assert_eq!(
        srv.metric("megasock_disconnects_total{reason=\"slow_consumer\"}"),
        0
    );
    // Still open: drain what it has, then it receives new messages again.
    slow.set_timeout(Duration::from_millis(300));
    while slow.try_recv().is_some() {}
    slow.set_timeout(Duration::from_secs(10));
    publisher.send_text("you are back");
    loop {
        let f = slow.recv();
        if f.payload == b"you are back" {
            break;
        }
    }
}

#[test]
fn sigterm_sends_1001_to_everyone_and_exits_zero() {
    let mut srv = ServerProc::start(&["--workers", "2", "--drain-timeout", "5s"]);
    let mut clients: Vec<Client> = (0..6)
        .map(|i| Client::connect(srv.ws, if i % 2 == 0 { "/echo" } else { "/ws/room" }))
        .collect();
    // Queued output is flushed before the close.
    clients[0].send_text("before shutdown");
    assert_eq!(clients[0].recv().payload, b"before shutdown");
    srv.signal(libc::SIGTERM);
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close(), Some(1001));
        c.reply_close(1001);
    }
    // New clients are refused once draining.
    let status = srv.wait_exit(10);
    assert!(status.success(), "exit status {status}");
    assert!(TcpStream::connect(srv.ws).is_err());
}

#[test]
fn shutdown_does_not_wait_past_drain_timeout_for_silent_clients() {
    let mut srv = ServerProc::start(&["--workers", "1", "--drain-timeout", "1s"]);
    let mut mute = Client::connect(srv.ws, "/echo");
    srv.signal(libc::SIGINT);
    assert_eq!(mute.expect_close(), Some(1001));
    let start = Instant::now();
    let status = srv.wait_exit(10);
    assert!(status.success());
    assert!(start.elapsed() < Duration::from_secs(4));
}

#[test]
fn clients_killed_mid_frame_leave_nothing_behind() {
    let srv = ServerProc::start(&["--workers", "2", "--max-message-size", "1MiB"]);
    for i in 0..20 {
        let mut c = Client::connect(srv.ws, if i % 2 == 0 { "/echo" } else { "/ws/r" });
        match i % 4 {
            0 => c
                .send_raw(&Client::frame_bytes(0x82, &[1; 5000], true)[..3000])
                .unwrap(),
            1 => c.send_frame(TEXT, false, b"first fragment"),
            2 => c.send_raw(&[0x81]).unwrap(),
            _ => c
                .send_raw(&Client::frame_bytes(0x82, &[1; 500_000], true)[..400_000])
                .unwrap(),
        }
        if i % 3 == 0 {
            // Abort with a reset instead of a FIN.
            socket2::SockRef::from(&c.s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(c);
    }
    for _ in 0..5 {
        let mut s = TcpStream::connect(srv.ws).unwrap();
        s.write_all(b"GET /echo HTTP/1.1\r\nHost:").unwrap();
    }
    srv.wait_metric("megasock_connections", 10, |v| v == 0);
    assert_eq!(srv.metric("megasock_accepted_total"), 25);
}

#[test]
fn help_lists_every_option_with_default_and_bad_values_name_the_option() {
    let out = Command::new(env!("CARGO_BIN_EXE_megasock"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for opt in [
        "--listen",
        "--workers",
        "--pin",
        "--backlog",
        "--max-connections",
        "--max-message-size",
        "--max-backpressure",
        "--slow-consumer",
        "--handshake-timeout",
        "--ping-interval",
        "--idle-timeout",
        "--close-timeout",
        "--drain-timeout",
        "--ring-capacity",
        "--metrics-listen",
        "--ready-file",
        "--config",
    ] {
        assert!(help.contains(opt), "--help lacks {opt}");
    }
    assert!(help.matches("[default:").count() >= 16, "{help}");
    for (args, needle) in [
        (vec!["--workers", "0"], "--workers"),
        (vec!["--max-message-size", "lots"], "--max-message-size"),
        (vec!["--idle-timeout", "0s"], "--idle-timeout"),
        (vec!["--config", "/nonexistent/megasock.toml"], "--config"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_megasock"))
            .arg("serve")
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    }
}

#[test]
fn config_file_values_apply_and_flags_win() {
    let dir = std::env::temp_dir().join(format!("megasock-cfgtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("megasock.toml");
    std::fs::write(
        &cfg,
        "max-message-size = \"100B\"\nworkers = 1\nmax-connections = 1\n",
    )
    .unwrap();
    let cfg_arg = cfg.to_str().unwrap();
    let srv = ServerProc::start(&["--config", cfg_arg, "--max-connections", "5"]);
    let mut a = Client::connect(srv.ws, "/echo");
    let _b = Client::connect(srv.ws, "/echo"); // flag (5) beat the file (1)
    a.send_binary(&[0; 101]);
    assert_eq!(
        a.expect_close(),
        Some(1009),
        "file's max-message-size applies"
    );
}

/// Starts megasock under a shell that lowers the fd limits first; returns its stderr.
fn stderr_under_limits(ulimits: &str, args: &str) -> String {
    let dir = std::env::temp_dir().join(format!("megasock-ulimit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ready = dir.join(format!("ready-{}", ulimits.len() + args.len()));
    let _ = std::fs::remove_file(&ready);
    let script = format!(
        "{ulimits}; exec {} serve --listen 127.0.0.1:0 --workers 1 --ready-file {} {args}",
        env!("CARGO_BIN_EXE_megasock"),
        ready.display()
    );
    let child = Command::new("bash")
        .args(["-c", &script])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_file(&ready);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn startup_raises_the_soft_fd_limit_and_warns_about_what_caps_connections() {
    // A lowered soft limit is raised to the hard limit, and the startup line says so.
    let log = stderr_under_limits("ulimit -Sn 256", "");
    let line = log
        .lines()
        .find(|l| l.contains("RLIMIT_NOFILE"))
        .expect(&log);
    assert!(line.contains("(was 256,"), "{line}");
    assert!(
        line.contains("workers 1") && line.contains("max-connections"),
        "{line}"
    );
    // A hard limit too low for --max-connections: one warning naming the fix, and the limit
    // is lowered to what the fds allow.
    let log = stderr_under_limits("ulimit -n 1024", "--max-connections 50000");
    let warn = log
        .lines()
        .find(|l| l.contains("RLIMIT_NOFILE is 1024"))
        .unwrap_or_else(|| panic!("no fd warning in:\n{log}"));
    assert!(
        warn.contains("scripts/tune.sh apply --connections 50000"),
        "{warn}"
    );
    assert!(log.contains("--max-connections 50000 lowered to"), "{log}");
}

#[test]
fn plan_prints_the_formula_figures() {
    let out = Command::new(env!("CARGO_BIN_EXE_megasock"))
        .args([
            "plan",
            "--connections",
            "1000000",
            "--message-rate",
            "100",
            "--room-size",
            "1000",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    // 1M x (3907 + 216 + 8 kernel + 128 megasock) bytes idle.
    assert!(text.contains("memory idle:   4259000000 B"), "{text}");
    assert!(text.contains("fds (nofile):  1101024"), "{text}");
    assert!(text.contains("deliveries:    100000/s"), "{text}");
    // This machine's hard fd limit (20,000 here) cannot hold a million: exit status 1.
    let hard = rlimit::Resource::NOFILE.get().unwrap().1;
    if hard < 1_101_024 {
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(text.contains("TOO LOW"), "{text}");
    }
    let small = Command::new(env!("CARGO_BIN_EXE_megasock"))
        .args(["plan", "--connections", "100"])
        .output()
        .unwrap();
    let text = String::from_utf8(small.stdout).unwrap();
    assert!(text.contains("memory idle:   425900 B"), "{text}");
}

#[test]
fn several_listen_addresses_and_pinned_workers() {
    let dir = std::env::temp_dir().join(format!("megasock-multi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ready = dir.join("ready");
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new(env!("CARGO_BIN_EXE_megasock"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.2:0",
            "--workers",
            "2",
            "--pin",
        ])
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    wait_for_file(&ready);
    let text = std::fs::read_to_string(&ready).unwrap();
    let addrs: Vec<std::net::SocketAddr> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ws="))
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(addrs.len(), 2, "{text}");
    let mut a = Client::connect(addrs[0], "/ws/both");
    let mut b = Client::connect(addrs[1], "/ws/both");
    a.send_text("across listeners");
    assert_eq!(b.recv().payload, b"across listeners");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(a.expect_close(), Some(1001));
    assert_eq!(b.expect_close(), Some(1001));
    drop((a, b));
    assert!(child.wait().unwrap().success());
}

fn wait_for_file(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn shipped_config_file_is_valid() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/megasock.toml");
    // The test's own --listen/--metrics-listen/--workers/--takeover flags win over the file's.
    let sock = std::env::temp_dir().join(format!("megasock-shipped-{}.sock", std::process::id()));
    let srv = ServerProc::start(&[
        "--config",
        cfg,
        "--workers",
        "1",
        "--takeover",
        sock.to_str().unwrap(),
    ]);
    let mut c = Client::connect(srv.ws, "/ws/deploy");
    c.send_text("configured");
    assert_eq!(c.recv().payload, b"configured");
}

/// Sets the fd limit of another process (prlimit(2)).
fn set_nofile(pid: u32, n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: 20_000.max(n),
    };
    // SAFETY: prlimit(2) reads `lim` (a valid rlimit) and writes nothing (null old-limit).
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn accept_backs_off_on_emfile_instead_of_spinning_and_resumes() {
    let srv = ServerProc::start(&["--workers", "1"]);
    let pid = srv.child.id();
    let hard = rlimit::Resource::NOFILE.get().unwrap().1;
    // Leave the server no free fd: every accept(2) now fails with EMFILE.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    set_nofile(pid, open.saturating_sub(1));
    let mut s = TcpStream::connect(srv.ws).unwrap(); // completes in the kernel's backlog
    s.write_all(upgrade_request("/echo").as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    set_nofile(pid, hard);
    // The waiting client is accepted on the next retry and upgraded.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101");
    // About one failed attempt per 100 ms back-off, not a spin (thousands per second).
    let errors = srv.metric("megasock_accept_errors_total");
    assert!((1..=40).contains(&errors), "accept errors: {errors}");
}

/// `--log-format json`: every log line is one JSON object with ts, level, target and msg.
#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_megasock"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = 0;
    for line in stderr.lines().take(20) {
        let line = line.unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON object per line");
        for key in ["ts", "level", "target", "msg"] {
            assert!(v.get(key).is_some_and(|x| x.is_string()), "{key} in {line}");
        }
        seen += 1;
        if v["msg"].as_str().unwrap().contains("listening on") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen >= 1, "no log line");
}
