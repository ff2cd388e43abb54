//! Restarting without refusing a single connect: a new megasock takes over the listening
//! sockets (`--takeover PATH`) while the old one drains (close 1001 to its clients), and
//! clients that connect the whole time never see a failure. (Two processes merely sharing the
//! port through SO_REUSEPORT lose a few connects per restart: the old listeners' accept queues
//! are reset when they close. That is why `--takeover` exists.)

mod common;
use common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connects, upgrades, echoes one message, closes; over and over until told to stop.
/// Returns (attempts, failures and what they were).
fn connect_loop(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut attempts = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        attempts += 1;
        count.fetch_add(1, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(|| {
            let s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut c = Client::try_from_stream(s, "/echo")?;
            c.send_text("hi");
            match c.try_recv() {
                Some(f) if f.payload == b"hi" => Ok(()),
                Some(f) if f.opcode == CLOSE => Ok(()), // told 1001 by a draining server
                other => Err(format!("echo: {other:?}")),
            }
        });
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push("panic".into()),
        }
    }
    (attempts, failures)
}

fn restart_with(extra_new: &[&str], old_args: &[&str]) -> (usize, Vec<String>) {
    let mut old = ServerProc::start(old_args);
    let port = old.ws.port();
    // A client of the old server stays connected until the old server says 1001.
    let mut resident = Client::connect(old.ws, "/echo");
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let loopers = Loops::start(old.ws, &stop, &count);
    let wait_for = |n: usize| {
        let until = count.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(10);
        while count.load(Ordering::Relaxed) < until && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(50);
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--workers", "2"];
    args.extend_from_slice(extra_new);
    let new = ServerProc::start_on(&listen, &args);
    wait_for(50);
    old.signal(libc_sigterm());
    assert_eq!(
        resident.expect_close(),
        Some(1001),
        "resident client told 1001"
    );
    resident.reply_close(1001);
    let status = old.wait_exit(15);
    assert!(
        status.success(),
        "old server exits 0 after draining: {status}"
    );
    wait_for(200);
    stop.store(true, Ordering::Relaxed);
    let (attempts, failures) = loopers.join();
    drop(new);
    (attempts, failures)
}

const LOOPS: usize = 8;

/// `LOOPS` connect loops at once, so the old server's accept queue is rarely empty when it
/// goes.
struct Loops(Vec<std::thread::JoinHandle<(usize, Vec<String>)>>);

impl Loops {
    fn start(
        addr: std::net::SocketAddr,
        stop: &Arc<AtomicBool>,
        count: &Arc<AtomicUsize>,
    ) -> Loops {
        Loops(
            (0..LOOPS)
                .map(|_| {
                    let (stop, count) = (stop.clone(), count.clone());
                    std::thread::spawn(move || connect_loop(addr, stop, count))
                })
                .collect(),
        )
    }

    /// All attempts, and every failure.
    fn join(self) -> (usize, Vec<String>) {
        let mut attempts = 0;
        let mut failures = Vec::new();
        for l in self.0 {
            let (a, f) = l.join().unwrap();
            attempts += a;
            failures.extend(f);
        }
        (attempts, failures)
    }
}

fn libc_sigterm() -> i32 {
    15
}

#[test]
fn a_new_process_takes_over_the_listeners_and_no_connect_fails() {
    let dir = std::env::temp_dir().join(format!("megasock-takeover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("takeover.sock");
    let path = path.to_str().unwrap();
    let (attempts, failures) = restart_with(
        &["--takeover", path],
        &[
            "--workers",
            "2",
            "--takeover",
            path,
            "--drain-timeout",
            "3s",
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "{attempts} connects, {} failed: {failures:?}",
        failures.len()
    );
    assert!(attempts > 300, "the loop ran: {attempts}");
    assert!(
        failures.is_empty(),
        "{} of {attempts} connects failed: {failures:?}",
        failures.len()
    );
}

/// SIGHUP with `--takeover`: the process starts its successor (same binary, same arguments),
/// hands it the listeners and drains; connects never fail and the successor serves on.
#[test]
fn sighup_restarts_in_place_without_a_failed_connect() {
    let dir = std::env::temp_dir().join(format!("megasock-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("takeover.sock");
    let sock = sock.to_str().unwrap().to_string();
    let mut old = ServerProc::start(&[
        "--workers",
        "2",
        "--takeover",
        &sock,
        "--drain-timeout",
        "3s",
    ]);
    let old_pid = old.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let loopers = Loops::start(old.ws, &stop, &count);
    std::thread::sleep(Duration::from_millis(300));
    old.signal(1); // SIGHUP
    let status = old.wait_exit(15);
    assert!(
        status.success(),
        "the old process drains and exits 0: {status}"
    );
    // The successor rewrote the ready file (same arguments) with its own pid.
    let successor: u32 = std::fs::read_to_string(old.ready_path())
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .expect("pid line");
    assert_ne!(successor, old_pid, "a new process serves");
    // The admin listener was handed over too: same address, answered by the successor.
    let admin_after = std::fs::read_to_string(old.ready_path())
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("admin="))
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .expect("admin line");
    assert_eq!(admin_after, old.metrics, "the admin address carries over");
    let health = http_exchange(
        admin_after,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let _successor = KillOnDrop(successor);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (attempts, failures) = loopers.join();
    let mut after = Client::connect(old.ws, "/echo");
    after.send_text("still here");
    assert_eq!(after.recv().payload, b"still here");
    drop(after);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "{attempts} connects, {} failed: {failures:?}",
        failures.len()
    );
    assert!(attempts > 100, "the loops ran: {attempts}");
    assert!(
        failures.is_empty(),
        "{} of {attempts} connects failed: {failures:?}",
        failures.len()
    );
}

/// Stops a process that is not our child (the successor) by pid, even if the test fails.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}
