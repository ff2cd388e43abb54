//! The admin routes: what each answers, and who may ask.
//!
//! | route | auth | answer |
//! |---|---|---|
//! | `GET /healthz` | none | 200 while every worker turned its loop in the last 2 s; 503 if one is stuck or died |
//! | `GET /readyz` | none | 200 while accepting clients; 503 once a drain started |
//! | `GET /metrics` | token | Prometheus text |
//! | `GET /stats` | token | the same figures as JSON, plus the top rooms by members |
//! | `POST /publish/{room}` | token | the body as one message to every member (`text/*` → text frame); 202 |
//! | `POST /publish` | token | newline-delimited `{"room":..,"text":..}` or `{"room":..,"base64":..}`; 202 |
//!
//! With `--admin-token`, routes marked "token" need `Authorization: Bearer TOKEN` (401
//! otherwise). Published messages take the path of a member's: encoded once, into every
//! worker's ring that has members, in order, never dropped once accepted (202); while more
//! than a ring's worth waits for room, new publishes get 503 with `Retry-After`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use super::http::{token_matches, Request, Response};
use crate::bus::{Delivery, Injector};
use crate::codec::OutKind;
use crate::handshake::valid_room;
use crate::metrics::{Disconnect, DropReason};
use crate::outbox::FrameBatch;
use crate::worker::Shared;

/// A worker that has not finished a loop turn for this long is stuck.
const STUCK_AFTER: Duration = Duration::from_secs(2);
/// Largest batch body for `POST /publish`.
const MAX_BATCH_BODY: usize = 16 << 20;
/// Rooms listed by `/stats`.
const TOP_ROOMS: usize = 20;

pub(super) struct Ctx {
    shared: Arc<Shared>,
    pub(super) injector: Injector,
    /// Responses by status (`megasock_admin_requests_total{code}`).
    responses: BTreeMap<u16, u64>,
    /// Messages accepted by the publish API.
    api_published: u64,
}

impl Ctx {
    pub(super) fn new(shared: Arc<Shared>, injector: Injector) -> Ctx {
        Ctx {
            shared,
            injector,
            responses: BTreeMap::new(),
            api_published: 0,
        }
    }

    /// This process handed its listeners to a successor (`takeover`).
    pub(super) fn handed_over(&self) -> bool {
        self.shared.handed_over.load(Relaxed)
    }

    /// Tells the takeover thread that this process stopped accepting admin connections.
    pub(super) fn release_admin(&self) {
        self.shared.admin_released.store(true, Relaxed);
    }

    pub(super) fn count(&mut self, status: u16) {
        *self.responses.entry(status).or_default() += 1;
    }

    /// The largest body any route takes.
    pub(super) fn max_body(&self) -> usize {
        MAX_BATCH_BODY.max(self.shared.config.max_message_size)
    }

    /// The largest body `path` takes.
    pub(super) fn body_limit(&self, path: &str) -> usize {
        match path {
            "/publish" => self.max_body(),
            p if p.starts_with("/publish/") => self.shared.config.max_message_size,
            _ => 0,
        }
    }

    pub(super) fn handle(&mut self, req: &Request<'_>) -> Response {
        let open = matches!(req.path, "/healthz" | "/readyz");
        if !open {
            if let Some(token) = &self.shared.config.admin_token {
                if !req
                    .bearer
                    .is_some_and(|b| token_matches(b, token.as_bytes()))
                {
                    let mut r =
                        Response::text(401, "missing or wrong Authorization: Bearer token\n");
                    r.extra = "WWW-Authenticate: Bearer\r\n";
                    return r;
                }
            }
        }
        match (req.method, req.path) {
            ("GET", "/healthz") => self.health(),
            ("GET", "/readyz") => self.ready(),
            ("GET", "/metrics") => Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: self.metrics().into_bytes(),
                extra: "",
            },
            ("GET", "/stats") => self.stats(),
            ("POST", "/publish") => self.publish_batch(req.body),
            ("POST", p) if p.starts_with("/publish/") => {
                let room = &p["/publish/".len()..];
                let text = req.content_type.starts_with(b"text/");
                self.publish_one(room, text, req.body)
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/stats") => method_not_allowed("GET"),
            (_, p) if p == "/publish" || p.starts_with("/publish/") => method_not_allowed("POST"),
            _ => Response::text(
                404,
                "unknown path; try /metrics, /healthz, /readyz, /stats, POST /publish/{room}\n",
            ),
        }
    }

    fn health(&self) -> Response {
        if let Some(cause) = self.shared.failed() {
            return Response::text(503, &format!("failing: {cause}\n"));
        }
        let ages = self.turn_ages();
        match ages.iter().position(|a| *a > STUCK_AFTER) {
            Some(w) => Response::text(
                503,
                &format!("worker {w} has not turned its loop for {:?}\n", ages[w]),
            ),
            None => Response::text(200, "ok\n"),
        }
    }

    fn ready(&self) -> Response {
        if self.shared.shutdown.load(Relaxed) {
            return Response::text(503, "draining\n");
        }
        let redis_down = self.shared.config.redis_required
            && self
                .shared
                .bridge
                .as_ref()
                .is_some_and(|b| !b.stats.link_up());
        if redis_down {
            return Response::text(503, "redis link down (--redis-required)\n");
        }
        Response::text(200, "ready\n")
    }

    /// How long ago each worker finished a loop turn.
    fn turn_ages(&self) -> Vec<Duration> {
        let now = self.shared.started.elapsed();
        self.shared
            .metrics
            .workers
            .iter()
            .map(|w| now.saturating_sub(Duration::from_millis(w.last_turn_ms.load(Relaxed))))
            .collect()
    }

    fn refuse_while_backed_up(&self) -> Option<Response> {
        (self.injector.overflow_bytes() > self.injector.capacity()).then(|| {
            let mut r = Response::text(
                503,
                "published messages are waiting for the workers; retry shortly\n",
            );
            r.extra = "Retry-After: 1\r\n";
            r
        })
    }

    fn publish_one(&mut self, room: &str, text: bool, body: &[u8]) -> Response {
        if !valid_room(room) {
            return Response::text(
                400,
                "room names are 1-128 bytes of A-Za-z0-9._:- and not . or ..\n",
            );
        }
        if text && std::str::from_utf8(body).is_err() {
            return Response::text(
                400,
                "a text/* body must be UTF-8 (send other bytes as binary)\n",
            );
        }
        if let Some(r) = self.refuse_while_backed_up() {
            return r;
        }
        let mut batch = FrameBatch::default();
        batch.push(if text { OutKind::Text } else { OutKind::Binary }, body);
        let members = self.deliver(room, &mut batch);
        self.api_published += 1;
        Response::json(
            202,
            format!("{{\"room\":\"{room}\",\"local_members\":{members}}}\n"),
        )
    }

    fn publish_batch(&mut self, body: &[u8]) -> Response {
        #[derive(Deserialize)]
        struct Line {
            room: String,
            text: Option<String>,
            base64: Option<String>,
        }
        if let Some(r) = self.refuse_while_backed_up() {
            return r;
        }
        let max = self.shared.config.max_message_size;
        // Checked whole before anything is sent: a bad line sends nothing.
        let mut rooms: Vec<(String, FrameBatch)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut messages = 0u64;
        for (n, raw) in body.split(|&b| b == b'\n').enumerate() {
            let raw = raw.trim_ascii();
            if raw.is_empty() {
                continue;
            }
            let bad = |why: String| Response::text(400, &format!("line {}: {why}\n", n + 1));
            let line: Line = match serde_json::from_slice(raw) {
                Ok(l) => l,
                Err(e) => {
                    return bad(format!(
                        "not a JSON object with room and text or base64 ({e})"
                    ))
                }
            };
            if !valid_room(&line.room) {
                return bad("bad room name".into());
            }
            let (kind, payload) = match (line.text, line.base64) {
                (Some(t), None) => (OutKind::Text, t.into_bytes()),
                (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b) {
                    Ok(bytes) => (OutKind::Binary, bytes),
                    Err(e) => return bad(format!("bad base64 ({e})")),
                },
                _ => return bad("give exactly one of text and base64".into()),
            };
            if payload.len() > max {
                return Response::text(
                    413,
                    &format!(
                        "line {}: message over --max-message-size ({max} bytes)\n",
                        n + 1
                    ),
                );
            }
            let i = *index.entry(line.room.clone()).or_insert_with(|| {
                rooms.push((line.room, FrameBatch::default()));
                rooms.len() - 1
            });
            rooms[i].1.push(kind, &payload);
            messages += 1;
        }
        let mut deliveries = 0;
        for (room, batch) in &mut rooms {
            let n = batch.messages() as u64;
            deliveries += self.deliver(room, batch) * n;
        }
        self.api_published += messages;
        Response::json(
            202,
            format!(
                "{{\"messages\":{messages},\"rooms\":{},\"local_deliveries\":{deliveries}}}\n",
                rooms.len()
            ),
        )
    }

    /// Sends a batch to every worker with members of `room` (and through the Redis bridge to
    /// the other nodes). Returns the members here.
    fn deliver(&mut self, room: &str, batch: &mut FrameBatch) -> u64 {
        let Some(chunk) = batch.take() else {
            return 0;
        };
        if let Some(bridge) = &self.shared.bridge {
            bridge.publish(room, &chunk.bytes, chunk.messages);
        }
        let Some(shared_room) = self.shared.rooms.find(room) else {
            return 0; // nobody here
        };
        let born = Instant::now();
        let injector = &mut self.injector;
        shared_room.for_each_worker(|w| {
            injector.send(
                w,
                Delivery {
                    room: shared_room.clone(),
                    frames: chunk.bytes.clone(),
                    messages: chunk.messages,
                    born,
                },
            )
        });
        shared_room.members()
    }

    fn metrics(&self) -> String {
        let s = &self.shared;
        let mut out = s.metrics.render();
        let gauge = |out: &mut String, name: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "megasock_rooms",
            "Rooms with members.",
            s.rooms.len().to_string(),
        );
        gauge(
            &mut out,
            "megasock_room_memberships",
            "Room memberships across all rooms.",
            s.rooms.memberships().to_string(),
        );
        let ready = !s.shutdown.load(Relaxed);
        gauge(
            &mut out,
            "megasock_ready",
            "1 while accepting clients, 0 once draining.",
            (ready as u8).to_string(),
        );
        out.push_str("# HELP megasock_worker_last_turn_age_seconds Time since each worker last finished a loop turn.\n");
        out.push_str("# TYPE megasock_worker_last_turn_age_seconds gauge\n");
        for (i, age) in self.turn_ages().iter().enumerate() {
            let _ = writeln!(
                out,
                "megasock_worker_last_turn_age_seconds{{worker=\"{i}\"}} {}",
                age.as_secs_f64()
            );
        }
        out.push_str("# HELP megasock_api_published_total Messages accepted by the publish API.\n");
        out.push_str("# TYPE megasock_api_published_total counter\n");
        let _ = writeln!(out, "megasock_api_published_total {}", self.api_published);
        out.push_str("# HELP megasock_admin_requests_total Admin responses, by status code.\n");
        out.push_str("# TYPE megasock_admin_requests_total counter\n");
        for code in [200u16, 202, 400, 401, 404, 405, 408, 411, 413, 431, 503] {
            let n = self.responses.get(&code).copied().unwrap_or(0);
            let _ = writeln!(out, "megasock_admin_requests_total{{code=\"{code}\"}} {n}");
        }
        if let Some(bridge) = &s.bridge {
            bridge.render(&mut out);
        }
        crate::access::render(m_workers(s).map(|w| &w.access), &mut out);
        s.guards.render(m_workers(s).map(|w| &w.limits), &mut out);
        crate::limits::process_metrics(&mut out);
        out
    }

    fn stats(&self) -> Response {
        let s = &self.shared;
        let m = &s.metrics;
        let sum = |f: fn(&crate::metrics::WorkerStats) -> u64| -> u64 {
            m.workers.iter().map(|w| f(w)).sum()
        };
        let mut j = String::with_capacity(2048);
        let _ = write!(
            j,
            "{{\"connections\":{},\"rooms\":{},\"memberships\":{},\"ready\":{},",
            m.open_connections(),
            s.rooms.len(),
            s.rooms.memberships(),
            !s.shutdown.load(Relaxed)
        );
        let _ = write!(
            j,
            "\"messages_received\":{},\"messages_sent\":{},\"published\":{},\"api_published\":{},\"bus_overflowed\":{},",
            sum(|w| w.messages_in.load(Relaxed)),
            sum(|w| w.frames_out.load(Relaxed)),
            sum(|w| w.published.load(Relaxed)),
            self.api_published,
            sum(|w| w.bus_overflowed.load(Relaxed)),
        );
        j.push_str("\"disconnects\":{");
        for (i, r) in Disconnect::ALL.iter().enumerate() {
            let n: u64 = m
                .workers
                .iter()
                .map(|w| w.disconnects[*r as usize].load(Relaxed))
                .sum();
            let _ = write!(j, "{}\"{}\":{n}", if i > 0 { "," } else { "" }, r.label());
        }
        j.push_str("},\"dropped\":{");
        for (i, r) in DropReason::ALL.iter().enumerate() {
            let n: u64 = m
                .workers
                .iter()
                .map(|w| w.dropped[*r as usize].load(Relaxed))
                .sum();
            let _ = write!(j, "{}\"{}\":{n}", if i > 0 { "," } else { "" }, r.label());
        }
        j.push_str("},\"workers\":[");
        for (i, (w, age)) in m.workers.iter().zip(self.turn_ages()).enumerate() {
            let _ = write!(
                j,
                "{}{{\"connections\":{},\"turn_p99_seconds\":{},\"delivery_p99_seconds\":{},\"last_turn_age_seconds\":{},\"ring_bytes\":{}}}",
                if i > 0 { "," } else { "" },
                w.connections.load(Relaxed),
                w.turn_p99_us.load(Relaxed) as f64 / 1e6,
                w.latency_p99_us.load(Relaxed) as f64 / 1e6,
                age.as_secs_f64(),
                m.rings[i].queued()
            );
        }
        j.push_str("],\"top_rooms\":[");
        for (i, (name, members)) in s.rooms.top(TOP_ROOMS).iter().enumerate() {
            // Room names need no JSON escaping (A-Za-z0-9._:-).
            let _ = write!(
                j,
                "{}{{\"room\":\"{name}\",\"members\":{members}}}",
                if i > 0 { "," } else { "" }
            );
        }
        j.push_str("]}\n");
        Response::json(200, j)
    }
}

/// Every worker's counters.
fn m_workers(s: &Shared) -> impl Iterator<Item = &crate::metrics::WorkerStats> + Clone {
    s.metrics.workers.iter().map(|w| &**w)
}

fn method_not_allowed(allow: &'static str) -> Response {
    let mut r = Response::text(405, &format!("use {allow}\n"));
    r.extra = if allow == "GET" {
        "Allow: GET\r\n"
    } else {
        "Allow: POST\r\n"
    };
    r
}
