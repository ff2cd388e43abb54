//! A sleeping worker must be woken for every cross-core delivery: single messages with pauses
//! between them (so the receiving worker is asleep each time) arrive in milliseconds, not at
//! the next timer tick (100 ms).

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn sleeping_workers_are_woken_for_each_message() {
    let srv = ServerProc::start(&["--workers", "2"]);
    // Enough receivers that both workers hold some (SO_REUSEPORT spreads by 4-tuple hash).
    let receivers: Vec<Client> = (0..16)
        .map(|_| Client::connect(srv.ws, "/ws/wake"))
        .collect();
    let mut publisher = Client::connect(srv.ws, "/ws/wake");
    let text = srv.metrics_text();
    let busy = text
        .lines()
        .filter(|l| l.starts_with("megasock_connections{") && !l.ends_with(" 0"))
        .count();
    assert_eq!(busy, 2, "both workers should hold members:\n{text}");
    let start = Instant::now();
    const N: usize = 400;
    let handles: Vec<_> = receivers
        .into_iter()
        .map(|mut r| {
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(N);
                for _ in 0..N {
                    let f = r.recv();
                    let sent: u64 = std::str::from_utf8(&f.payload).unwrap().parse().unwrap();
                    lat.push(start.elapsed().as_micros() as u64 - sent);
                }
                lat
            })
        })
        .collect();
    for _ in 0..N {
        publisher.send_text(&start.elapsed().as_micros().to_string());
        std::thread::sleep(Duration::from_millis(2));
        let _ = publisher.recv();
    }
    let mut all: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort_unstable();
    let p50 = all[all.len() / 2];
    let p99 = all[all.len() * 99 / 100];
    // A lost wake-up shows as a delay near the 100 ms tick.
    assert!(p50 < 10_000, "median delivery {p50} us");
    assert!(p99 < 60_000, "p99 delivery {p99} us");
    assert!(srv.metric("megasock_wakeups_total") > 0);
}
