//! Room fan-out across workers: every member receives every message exactly once, in
//! per-sender order, including when the cross-core rings are full.

mod common;
use common::*;
use std::collections::HashMap;
use std::time::Duration;

/// Connects `members` clients to `room`, lets `publishers` of them send `msgs` each (padded
/// with `pad` bytes) from their own threads, and checks what every member received.
fn fan_out(
    srv: &ServerProc,
    room: &str,
    members: usize,
    publishers: usize,
    msgs: usize,
    pad: usize,
) -> Vec<Client> {
    let path = format!("/ws/{room}");
    let mut clients: Vec<Client> = (0..members)
        .map(|_| Client::connect(srv.ws, &path))
        .collect();
    let pubs: Vec<Client> = clients.drain(..publishers).collect();
    let handles: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(p, mut c)| {
            std::thread::spawn(move || {
                for seq in 0..msgs {
                    // Mixed opcodes: text and binary keep their opcode through the room.
                    let body = format!("p{p}:{seq}:{}", "x".repeat(pad));
                    if seq % 2 == 0 {
                        c.send_text(&body);
                    } else {
                        c.send_binary(body.as_bytes());
                    }
                }
                c
            })
        })
        .collect();
    let pubs: Vec<Client> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    clients.extend(pubs); // publishers are members too and receive their own messages
    let expected = publishers * msgs;
    for (i, c) in clients.iter_mut().enumerate() {
        c.set_timeout(Duration::from_secs(20));
        let mut next: HashMap<usize, usize> = HashMap::new();
        for _ in 0..expected {
            let f = c.recv();
            let text = String::from_utf8(f.payload).unwrap();
            let mut fields = text[1..].split(':');
            let (p, seq) = (fields.next().unwrap(), fields.next().unwrap());
            let (p, seq): (usize, usize) = (p.parse().unwrap(), seq.parse().unwrap());
            let want = next.entry(p).or_insert(0);
            assert_eq!(
                seq, *want,
                "client {i}: publisher {p} out of order or duplicated"
            );
            assert_eq!(f.opcode, if seq % 2 == 0 { TEXT } else { BINARY });
            *want += 1;
        }
        assert_eq!(next.values().sum::<usize>(), expected, "client {i}");
    }
    // Nothing more: no duplicates trail behind.
    std::thread::sleep(Duration::from_millis(200));
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(c.nothing_pending(), "client {i} got an extra frame");
    }
    clients
}

#[test]
fn room_fan_out_across_four_workers() {
    let srv = ServerProc::start(&["--workers", "4"]);
    let _clients = fan_out(&srv, "lobby", 300, 4, 50, 0);
    let text = srv.metrics_text();
    let busy_workers = text
        .lines()
        .filter(|l| l.starts_with("megasock_connections{"))
        .filter(|l| l.rsplit(' ').next().unwrap() != "0")
        .count();
    assert!(
        busy_workers >= 2,
        "connections should spread over workers:\n{text}"
    );
    assert!(
        srv.metric("megasock_bus_sent_total") > 0,
        "cross-core path was used"
    );
    assert_eq!(srv.metric("megasock_messages_dropped_total"), 0);
}

#[test]
fn full_rings_hold_messages_back_instead_of_losing_them() {
    let srv = ServerProc::start(&["--workers", "4", "--ring-capacity", "4KiB"]);
    // 2 KB messages: a 4 KiB ring holds two deliveries.
    fan_out(&srv, "tiny-rings", 40, 4, 400, 2000);
    assert!(
        srv.metric("megasock_bus_overflowed_total") > 0,
        "the test should have filled a ring:\n{}",
        srv.metrics_text()
    );
    assert_eq!(srv.metric("megasock_messages_dropped_total"), 0);
}

#[test]
fn rooms_are_separate_and_a_member_leaving_is_clean() {
    let srv = ServerProc::start(&["--workers", "2"]);
    let mut a1 = Client::connect(srv.ws, "/ws/a");
    let mut a2 = Client::connect(srv.ws, "/ws/a");
    let mut b1 = Client::connect(srv.ws, "/ws/b");
    let leaver = Client::connect(srv.ws, "/ws/a");
    drop(leaver);
    srv.wait_metric(
        "megasock_disconnects_total{reason=\"peer_gone\"}",
        10,
        |v| v == 1,
    );
    a1.send_text("for a");
    assert_eq!(a1.recv().payload, b"for a");
    assert_eq!(a2.recv().payload, b"for a");
    b1.send_text("for b");
    assert_eq!(b1.recv().payload, b"for b");
    a2.set_timeout(Duration::from_millis(100));
    assert!(
        a2.try_recv().is_none(),
        "room b's message leaked into room a"
    );
}
