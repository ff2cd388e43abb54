//! Who may connect, and to which room: the checks between a well-formed upgrade request and
//! its 101. The [`Gate`] is built once from the configuration (`--allowed-origin`, the JWT
//! key, `--subprotocol`); the session asks it through `Host::admit` once per handshake, after
//! the head is parsed and before anything is answered. It keeps nothing per connection: what
//! outlives the handshake is the token's expiry, which the session holds as one tick.
//!
//! Order: cheapest first. The `Origin` (a string compare), then the token (found in one of
//! three places, see [`Gate::check`]), its signature and claims, the room grant, and last the
//! subprotocol the 101 names. Every refusal is an HTTP error with a reason that says what to
//! change, counted under `megasock_auth_rejections_total{reason}`.

pub mod jwt;
pub mod keys;
pub mod origin;

/// The tests' token signer (megasock itself only verifies).
#[cfg(test)]
#[path = "../../tests/common/jwt.rs"]
#[allow(dead_code)]
mod test_signer;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;

use crate::handshake::Rejection;
pub use jwt::Verifier;
pub use origin::OriginPattern;

/// The prefix of a `Sec-WebSocket-Protocol` entry that carries a token (browsers cannot set
/// `Authorization` on a WebSocket): `new WebSocket(url, ["chat", "bearer." + jwt])`. Such an
/// entry is never chosen as the subprotocol.
pub const PROTOCOL_TOKEN_PREFIX: &str = "bearer.";

/// What a request asks for, as the checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// `GET /echo` upgrade: needs a valid token (no room grant).
    Echo,
    /// `GET /ws/{room}` upgrade: needs a token that grants the room.
    Room(&'a str),
    /// `GET /rooms/{room}` (member count): the same token rule as joining it; no Origin or
    /// subprotocol (a plain GET).
    RoomInfo(&'a str),
}

/// What a passed request gets.
#[derive(Debug, Default)]
pub struct Admitted {
    /// Header lines to add to the 101 (`Sec-WebSocket-Protocol: NAME\r\n`).
    pub header: Option<Bytes>,
    /// The token's `exp` (seconds since the Unix epoch), if a token was checked.
    pub expires: Option<f64>,
}

/// Why a request was refused: one `reason` label of `megasock_auth_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    MissingToken,
    InvalidToken,
    ExpiredToken,
    TokenNotYetValid,
    WrongAudience,
    WrongIssuer,
    ForbiddenRoom,
    Origin,
    /// Ambiguous: a token or Origin given twice.
    BadRequest,
}

impl Denied {
    pub const ALL: [Denied; 9] = [
        Denied::MissingToken,
        Denied::InvalidToken,
        Denied::ExpiredToken,
        Denied::TokenNotYetValid,
        Denied::WrongAudience,
        Denied::WrongIssuer,
        Denied::ForbiddenRoom,
        Denied::Origin,
        Denied::BadRequest,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Denied::MissingToken => "missing",
            Denied::InvalidToken => "invalid",
            Denied::ExpiredToken => "expired",
            Denied::TokenNotYetValid => "not_yet_valid",
            Denied::WrongAudience => "wrong_audience",
            Denied::WrongIssuer => "wrong_issuer",
            Denied::ForbiddenRoom => "forbidden_room",
            Denied::Origin => "origin",
            Denied::BadRequest => "bad_request",
        }
    }
}

/// A refusal: the HTTP answer, and the reason counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denial {
    pub why: Denied,
    pub rejection: Rejection,
}

fn deny(why: Denied, status: u16, reason: &'static str) -> Denial {
    Denial {
        why,
        rejection: Rejection { status, reason },
    }
}

const MISSING: &str = "no token: send `Authorization: Bearer TOKEN`, the access_token query \
                       parameter, or a Sec-WebSocket-Protocol entry `bearer.TOKEN`";

/// The checks configured at start.
#[derive(Debug)]
pub struct Gate {
    jwt: Option<Verifier>,
    origins: Vec<OriginPattern>,
    /// `--subprotocol` names, each with the header line that answers it.
    protocols: Vec<(String, Bytes)>,
}

impl Gate {
    /// None when there is nothing to check (the handshake then skips the gate entirely).
    pub fn new(
        jwt: Option<Verifier>,
        origins: Vec<OriginPattern>,
        protocols: &[String],
    ) -> Option<Gate> {
        if jwt.is_none() && origins.is_empty() && protocols.is_empty() {
            return None;
        }
        let protocols = protocols
            .iter()
            .map(|p| {
                let line = format!("Sec-WebSocket-Protocol: {p}\r\n");
                (p.clone(), Bytes::from(line))
            })
            .collect();
        Some(Gate {
            jwt,
            origins,
            protocols,
        })
    }

    pub fn requires_token(&self) -> bool {
        self.jwt.is_some()
    }

    /// One line for the start log: what is checked.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(j) = &self.jwt {
            parts.push(j.describe());
        }
        if !self.origins.is_empty() {
            parts.push(format!("{} allowed origin(s)", self.origins.len()));
        }
        if !self.protocols.is_empty() {
            let names: Vec<&str> = self.protocols.iter().map(|(p, _)| p.as_str()).collect();
            parts.push(format!("subprotocols {}", names.join(", ")));
        }
        parts.join(" | ")
    }

    /// Checks one request head (already accepted by `handshake::parse`) at `now` (seconds
    /// since the Unix epoch). A token may come from `Authorization: Bearer`, the `access_token`
    /// query parameter, or a `Sec-WebSocket-Protocol` entry `bearer.TOKEN`; from exactly one
    /// of them (RFC 6750 §2).
    pub fn check(&self, head: &[u8], target: Target<'_>, now: f64) -> Result<Admitted, Denial> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            // handshake::parse accepted these bytes: this does not happen.
            return Err(deny(Denied::BadRequest, 400, "malformed HTTP request"));
        }
        let upgrade = !matches!(target, Target::RoomInfo(_));
        let mut origin = None;
        let mut bearer = None;
        let mut found = 0;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("origin") {
                if origin.replace(h.value).is_some() {
                    return Err(deny(Denied::BadRequest, 400, "Origin header given twice"));
                }
            } else if h.name.eq_ignore_ascii_case("authorization") {
                // Other schemes (a proxy's Basic, say) are not ours: not a token source.
                let v = h.value.trim_ascii();
                if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
                    bearer = Some(v[7..].trim_ascii());
                    found += 1;
                }
            }
        }
        if upgrade && !self.origins.is_empty() {
            if let Some(o) = origin {
                let o = std::str::from_utf8(o).unwrap_or("");
                if !self.origins.iter().any(|p| p.matches(o)) {
                    return Err(deny(
                        Denied::Origin,
                        403,
                        "this Origin may not connect here (see --allowed-origin)",
                    ));
                }
            }
        }
        let offered = || {
            req.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
                .flat_map(|h| h.value.split(|&b| b == b','))
                .map(|e| std::str::from_utf8(e.trim_ascii()).unwrap_or(""))
        };
        let mut expires = None;
        if let Some(jwt) = &self.jwt {
            let query = req.path.and_then(|p| p.split_once('?')).map(|(_, q)| q);
            let mut token = bearer.map(|b| std::str::from_utf8(b).unwrap_or(""));
            for t in query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .filter_map(|kv| kv.strip_prefix("access_token="))
                .chain(offered().filter_map(|e| e.strip_prefix(PROTOCOL_TOKEN_PREFIX)))
            {
                token = Some(t);
                found += 1;
            }
            let token = match (found, token) {
                (0, _) | (_, None) => return Err(deny(Denied::MissingToken, 401, MISSING)),
                (1, Some(t)) => t,
                _ => {
                    return Err(deny(
                        Denied::BadRequest,
                        400,
                        "token given more than once (header, query, subprotocol): send one",
                    ))
                }
            };
            let grant = jwt.verify(token, now).map_err(|e| {
                let why = match e {
                    jwt::TokenError::Malformed(_) | jwt::TokenError::BadSignature(_) => {
                        Denied::InvalidToken
                    }
                    jwt::TokenError::Expired => Denied::ExpiredToken,
                    jwt::TokenError::NotYetValid => Denied::TokenNotYetValid,
                    jwt::TokenError::Audience(_) => Denied::WrongAudience,
                    jwt::TokenError::Issuer(_) => Denied::WrongIssuer,
                };
                deny(why, 401, e.reason())
            })?;
            if let Target::Room(room) | Target::RoomInfo(room) = target {
                if !grant.allows(room) {
                    return Err(deny(
                        Denied::ForbiddenRoom,
                        403,
                        "the token's rooms claim does not grant this room",
                    ));
                }
            }
            expires = Some(grant.expires);
        }
        // RFC 6455 §4.2.2: the first of the client's entries the server speaks, else none.
        let header = if upgrade {
            offered()
                .filter(|e| !e.starts_with(PROTOCOL_TOKEN_PREFIX))
                .find_map(|e| self.protocols.iter().find(|(p, _)| p == e))
                .map(|(_, line)| line.clone())
        } else {
            None
        };
        Ok(Admitted { header, expires })
    }
}

/// `response` (a complete head ending in a blank line) with `lines` added before its end.
pub fn with_header_lines(response: &Bytes, lines: &[u8]) -> Bytes {
    let head = response.strip_suffix(b"\r\n").unwrap_or(response);
    let mut out = Vec::with_capacity(response.len() + lines.len());
    out.extend_from_slice(head);
    out.extend_from_slice(lines);
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

/// One worker's refusals by reason, written only by that worker.
#[derive(Default)]
pub struct AccessStats {
    denied: [AtomicU64; Denied::ALL.len()],
}

impl AccessStats {
    pub fn denied(&self, why: Denied) {
        self.denied[why as usize].fetch_add(1, Relaxed);
    }
}

/// `megasock_auth_rejections_total{reason}`, summed over the workers.
pub fn render<'a>(stats: impl Iterator<Item = &'a AccessStats> + Clone, out: &mut String) {
    out.push_str(
        "# HELP megasock_auth_rejections_total Upgrades (and /rooms/ pages) refused by the \
         token, room grant or Origin checks, by reason.\n",
    );
    out.push_str("# TYPE megasock_auth_rejections_total counter\n");
    for d in Denied::ALL {
        let n: u64 = stats
            .clone()
            .map(|s| s.denied[d as usize].load(Relaxed))
            .sum();
        let _ = writeln!(
            out,
            "megasock_auth_rejections_total{{reason=\"{}\"}} {n}",
            d.label()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_signer as signer;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: f64 = 1_800_000_000.0;

    fn gate(origins: &[&str], protocols: &[&str]) -> Gate {
        Gate::new(
            Some(Verifier::secret(SECRET, None, None)),
            origins
                .iter()
                .map(|o| OriginPattern::parse(o).unwrap())
                .collect(),
            &protocols.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        )
        .unwrap()
    }

    fn token(rooms: &str) -> String {
        signer::Signer::hs256(SECRET).token(&format!("{{\"exp\":{}{rooms}}}", NOW + 5.0))
    }

    fn head(path: &str, extra: &str) -> Vec<u8> {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    fn status(g: &Gate, path: &str, extra: &str, t: Target<'_>) -> Result<Admitted, (u16, Denied)> {
        g.check(&head(path, extra), t, NOW)
            .map_err(|d| (d.rejection.status, d.why))
    }

    #[test]
    fn token_from_each_place_and_only_one() {
        let g = gate(&[], &["chat"]);
        let t = token("");
        let room = Target::Room("lobby");
        let by_header = format!("Authorization: Bearer {t}\r\n");
        let by_protocol = format!("Sec-WebSocket-Protocol: chat, bearer.{t}\r\n");
        let by_query = format!("/ws/lobby?x=1&access_token={t}");
        for (path, extra) in [
            ("/ws/lobby", by_header.as_str()),
            (by_query.as_str(), ""),
            ("/ws/lobby", by_protocol.as_str()),
        ] {
            let a = status(&g, path, extra, room).unwrap();
            assert_eq!(a.expires, Some(NOW + 5.0));
        }
        assert_eq!(
            status(&g, "/ws/lobby", "", room).unwrap_err(),
            (401, Denied::MissingToken)
        );
        assert_eq!(
            status(&g, "/ws/lobby", "Authorization: Basic dTpw\r\n", room).unwrap_err(),
            (401, Denied::MissingToken)
        );
        assert_eq!(
            status(&g, &by_query, &by_header, room).unwrap_err(),
            (400, Denied::BadRequest)
        );
        let bad = format!("Authorization: Bearer {t}x\r\n");
        assert_eq!(
            status(&g, "/ws/lobby", &bad, room).unwrap_err(),
            (401, Denied::InvalidToken)
        );
    }

    #[test]
    fn subprotocol_is_the_clients_first_supported_and_never_the_token() {
        let g = gate(&[], &["v2", "v1"]);
        let t = token("");
        let line = |extra: &str| {
            let a = status(&g, "/echo", extra, Target::Echo).unwrap();
            a.header.map(|h| String::from_utf8(h.to_vec()).unwrap())
        };
        let auth = format!("Authorization: Bearer {t}\r\n");
        assert_eq!(
            line(&format!(
                "{auth}Sec-WebSocket-Protocol: x, v1\r\nSec-WebSocket-Protocol: v2\r\n"
            )),
            Some("Sec-WebSocket-Protocol: v1\r\n".into())
        );
        assert_eq!(line(&format!("{auth}Sec-WebSocket-Protocol: x\r\n")), None);
        assert_eq!(line(&auth), None);
        assert_eq!(
            line(&format!("Sec-WebSocket-Protocol: bearer.{t}, v2\r\n")),
            Some("Sec-WebSocket-Protocol: v2\r\n".into())
        );
        assert_eq!(
            line(&format!("Sec-WebSocket-Protocol: bearer.{t}\r\n")),
            None
        );
    }

    #[test]
    fn origin_and_room_grants() {
        let g = gate(&["https://*.example.com"], &[]);
        let t = format!(
            "Authorization: Bearer {}\r\n",
            token(",\"rooms\":[\"chat:*\"]")
        );
        let with_origin = |o: &str| format!("{t}Origin: {o}\r\n");
        let room = Target::Room("chat:1");
        assert!(status(
            &g,
            "/ws/chat:1",
            &with_origin("https://a.example.com"),
            room
        )
        .is_ok());
        assert!(
            status(&g, "/ws/chat:1", &t, room).is_ok(),
            "no Origin: not a browser"
        );
        assert_eq!(
            status(&g, "/ws/chat:1", &with_origin("https://evil.net"), room).unwrap_err(),
            (403, Denied::Origin)
        );
        assert_eq!(
            status(&g, "/ws/lobby", &t, Target::Room("lobby")).unwrap_err(),
            (403, Denied::ForbiddenRoom)
        );
        assert_eq!(
            status(&g, "/rooms/lobby", &t, Target::RoomInfo("lobby")).unwrap_err(),
            (403, Denied::ForbiddenRoom)
        );
        assert!(
            status(&g, "/echo", &t, Target::Echo).is_ok(),
            "/echo needs no grant"
        );
        // Origin alone, no token configured.
        let o = Gate::new(
            None,
            vec![OriginPattern::parse("http://localhost:3000").unwrap()],
            &[],
        )
        .unwrap();
        assert!(o
            .check(
                &head("/echo", "Origin: http://localhost:3000\r\n"),
                Target::Echo,
                NOW
            )
            .is_ok());
        assert!(o
            .check(
                &head("/echo", "Origin: http://localhost:3001\r\n"),
                Target::Echo,
                NOW
            )
            .is_err());
    }

    #[test]
    fn header_lines_go_before_the_blank_line() {
        let r = Bytes::from_static(b"HTTP/1.1 101 Switching Protocols\r\nA: b\r\n\r\n");
        let out = with_header_lines(&r, b"Sec-WebSocket-Protocol: chat\r\n");
        assert_eq!(
            &out[..],
            b"HTTP/1.1 101 Switching Protocols\r\nA: b\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
        );
    }
}
