//! The access and abuse hooks of the session (`session/policy.rs`): the host's verdict on a
//! request, the token's expiry on an open connection, and the message-rate bucket.

use super::*;
use crate::abuse::message_rate::MessageRate;
use crate::access::Target;

fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    crate::codec::client_frame(first, payload, Some([1, 2, 3, 4]))
}

/// A host that answers `admit` like a worker with a gate would.
#[derive(Default)]
struct Gatekeeper {
    rec: Rec,
    verdict: Option<Result<Admission, handshake::Rejection>>,
    asked: Vec<String>,
}

impl Host for Gatekeeper {
    fn upgraded(&mut self, route: Route<'_>, deflate: Option<crate::deflate::Agreement>) {
        self.rec.upgraded(route, deflate)
    }
    fn inflating(&mut self) -> &mut Inflating {
        self.rec.inflating()
    }
    fn message(&mut self, kind: Kind, payload: &[u8]) {
        self.rec.message(kind, payload)
    }
    fn send(&mut self, bytes: Bytes) {
        self.rec.send(bytes)
    }
    fn before_close(&mut self) {
        self.rec.before_close()
    }
    fn ended(&mut self, why: Disconnect) {
        self.rec.ended(why)
    }
    fn http_status(&mut self, status: u16) {
        self.rec.http_status(status)
    }
    fn admit(
        &mut self,
        head: &[u8],
        target: Target<'_>,
    ) -> Result<Admission, handshake::Rejection> {
        assert!(
            head.ends_with(b"\r\n\r\n"),
            "the whole head, nothing after it"
        );
        self.asked.push(format!("{target:?}"));
        self.verdict.take().unwrap_or(Ok(Admission::default()))
    }
}

fn upgrade(s: &mut Session, h: &mut Gatekeeper, lim: &Limits) {
    let mut req = REQUEST.to_vec();
    s.receive(&mut req, lim, 0, h);
}

#[test]
fn a_refusal_is_the_http_answer() {
    let lim = limits();
    let mut h = Gatekeeper {
        verdict: Some(Err(handshake::Rejection {
            status: 401,
            reason: "no token",
        })),
        ..Default::default()
    };
    let mut s = Session::new(0);
    upgrade(&mut s, &mut h, &lim);
    assert_eq!(h.asked, ["Room(\"lobby\")"]);
    assert_eq!(s.phase(), Phase::Lingering);
    assert!(h.rec.0.contains(&Ev::Status(401)));
    assert!(h.rec.0.contains(&Ev::Ended(Disconnect::HttpRejected)));
    assert!(!h.rec.0.iter().any(|e| matches!(e, Ev::Upgraded(_))));
}

#[test]
fn a_grant_adds_its_header_and_the_token_expires_at_its_tick() {
    let lim = limits();
    let mut h = Gatekeeper {
        verdict: Some(Ok(Admission {
            header: Some(Bytes::from_static(b"Sec-WebSocket-Protocol: chat\r\n")),
            expires: Some(50),
        })),
        ..Default::default()
    };
    let mut s = Session::new(0);
    upgrade(&mut s, &mut h, &lim);
    let Some(Ev::Http(resp)) = h.rec.0.iter().find(|e| matches!(e, Ev::Http(_))) else {
        panic!("{:?}", h.rec.0)
    };
    let resp = String::from_utf8_lossy(resp).into_owned();
    assert!(
        resp.ends_with("\r\nSec-WebSocket-Protocol: chat\r\n\r\n"),
        "{resp}"
    );
    assert_eq!(s.deadline(&lim), 50, "the expiry comes before the ping");
    // Activity does not move it.
    s.receive(&mut frame(0x81, b"hi"), &lim, 40, &mut h);
    assert_eq!(s.deadline(&lim), 50);
    assert_eq!(s.on_timer(49, false, &lim, &mut h), Due::At(50));
    let before = h.rec.0.len();
    assert!(matches!(s.on_timer(50, false, &lim, &mut h), Due::At(_)));
    assert_eq!(s.phase(), Phase::Closing);
    assert_eq!(
        h.rec.0[before..],
        [
            Ev::BeforeClose,
            Ev::Ended(Disconnect::TokenExpired),
            Ev::Close(Some(codec::CLOSE_POLICY))
        ]
    );
}

#[test]
fn a_ping_never_schedules_past_the_expiry() {
    let lim = limits(); // ping 300, idle 750
    let mut h = Gatekeeper {
        verdict: Some(Ok(Admission {
            header: None,
            expires: Some(310),
        })),
        ..Default::default()
    };
    let mut s = Session::new(0);
    upgrade(&mut s, &mut h, &lim);
    assert_eq!(s.on_timer(300, false, &lim, &mut h), Due::At(310));
    assert!(h.rec.0.contains(&Ev::Ping));
    s.on_timer(310, false, &lim, &mut h);
    assert!(h.rec.0.contains(&Ev::Ended(Disconnect::TokenExpired)));
}

#[test]
fn message_rate_closes_1008_and_skips_the_excess() {
    let lim = Limits {
        message_rate: Some(MessageRate::new(10, 3)), // 1 per tick, burst 3
        ..limits()
    };
    let mut h = Gatekeeper::default();
    let mut s = Session::new(0);
    upgrade(&mut s, &mut h, &lim);
    let mut burst = Vec::new();
    for i in 0..3 {
        burst.extend(frame(0x81, format!("m{i}").as_bytes()));
    }
    s.receive(&mut burst, &lim, 1, &mut h);
    // Two ticks later two more fit (pongs and pings are heard too, refilling first).
    s.receive(&mut frame(0x8a, b""), &lim, 2, &mut h);
    let mut two = [frame(0x81, b"m3"), frame(0x81, b"m4")].concat();
    s.receive(&mut two, &lim, 3, &mut h);
    assert_eq!(s.phase(), Phase::Open);
    let mut over = [frame(0x81, b"m5"), frame(0x81, b"m6")].concat();
    s.receive(&mut over, &lim, 3, &mut h);
    assert_eq!(s.phase(), Phase::Closing);
    let messages: Vec<_> = h
        .rec
        .0
        .iter()
        .filter_map(|e| match e {
            Ev::Message(_, p) => Some(String::from_utf8_lossy(p).into_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(messages, ["m0", "m1", "m2", "m3", "m4"]);
    assert!(h.rec.0.ends_with(&[
        Ev::BeforeClose,
        Ev::Ended(Disconnect::MessageRate),
        Ev::Close(Some(codec::CLOSE_POLICY))
    ]));
}

#[test]
fn without_a_rate_nothing_is_counted() {
    let lim = limits();
    let mut h = Gatekeeper::default();
    let mut s = Session::new(0);
    upgrade(&mut s, &mut h, &lim);
    let mut many: Vec<u8> = (0..10_000).flat_map(|_| frame(0x81, b"x")).collect();
    s.receive(&mut many, &lim, 1, &mut h);
    assert_eq!(s.phase(), Phase::Open);
}
