//! What checking one token costs a worker, per algorithm: the JWT alone
//! (`access::Verifier::verify`: base64, JSON, signature, claims) and the whole handshake gate
//! (`access::Gate::check`: the request head parsed again, Origin, token, room grant,
//! subprotocol).
//!
//! ```sh
//! cargo run --release --example jwt_cost
//! ```
//!
//! Each figure is the best of 5 rounds (a noisy shared machine only ever adds time).

#[path = "../tests/common/jwt.rs"]
#[allow(dead_code)]
mod jwt;

use std::time::Instant;

use megasock::access::{keys, Gate, OriginPattern, Target, Verifier};

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

fn best_of_5(rounds: u32, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..rounds {
                f();
            }
            t.elapsed().as_secs_f64() / rounds as f64
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let now = jwt::now() as f64;
    let claims = format!(
        "{{\"sub\":\"user-4711\",\"exp\":{},\"iat\":{},\"aud\":\"megasock\",\"iss\":\"https://idp.example.com\",\"rooms\":[\"lobby\",\"team:red:*\"]}}",
        now + 3600.0,
        now
    );
    let public = |f: &str| {
        let text = std::fs::read_to_string(jwt::key_path(f)).unwrap();
        keys::from_pem(&text).unwrap()
    };
    let aud = || Some("megasock".to_string());
    let iss = || Some("https://idp.example.com".to_string());
    let cases = [
        (
            jwt::Signer::hs256(SECRET),
            Verifier::secret(SECRET, aud(), iss()),
        ),
        (
            jwt::Signer::rs256(),
            Verifier::public(public("rs256.pub.pem"), aud(), iss()),
        ),
        (
            jwt::Signer::es256(),
            Verifier::public(public("es256.pub.pem"), aud(), iss()),
        ),
        (
            jwt::Signer::eddsa(),
            Verifier::public(public("ed25519.pub.pem"), aud(), iss()),
        ),
    ];
    println!(
        "{:<6} {:>10} {:>12} {:>14}",
        "alg", "token B", "verify us", "gate check us"
    );
    for (signer, verifier) in cases {
        let token = signer.token(&claims);
        assert!(verifier.verify(&token, now).is_ok());
        let rounds = if signer.alg() == "HS256" {
            20_000
        } else {
            1_000
        };
        let verify = best_of_5(rounds, || {
            std::hint::black_box(verifier.verify(std::hint::black_box(&token), now).is_ok());
        });
        let gate = Gate::new(
            Some(verifier),
            vec![OriginPattern::parse("https://*.example.com").unwrap()],
            &["chat.v1".to_string()],
        )
        .unwrap();
        let head = format!(
            "GET /ws/team:red:7 HTTP/1.1\r\nHost: ws.example.com\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://app.example.com\r\n\
             User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/131.0\r\n\
             Sec-WebSocket-Protocol: chat.v1, bearer.{token}\r\n\r\n"
        );
        let target = Target::Room("team:red:7");
        assert!(gate.check(head.as_bytes(), target, now).is_ok());
        let check = best_of_5(rounds, || {
            std::hint::black_box(gate.check(head.as_bytes(), target, now).is_ok());
        });
        println!(
            "{:<6} {:>10} {:>12.1} {:>14.1}",
            signer.alg(),
            token.len(),
            verify * 1e6,
            check * 1e6
        );
    }
}
