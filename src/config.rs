//! Configuration: command-line flags, an optional TOML file, and the defaults.
//!
//! Every option exists once, in [`ServeArgs`], as an `Option` so that a flag that was not given
//! can fall back to the TOML file and then to the default. [`ServeArgs::resolve`] turns the merged
//! options into a [`Config`] with concrete values and checks them, so that the rest of the server
//! never sees an unparsed or out-of-range value. Errors name the option and say what is accepted.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

/// What to do with a connection whose queued output passes `--max-backpressure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlowConsumerPolicy {
    /// Send close 1008 and drop the connection after a short bounded wait.
    Close,
    /// Keep the connection and drop the messages that do not fit, counting each.
    Drop,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// `[time LEVEL target] message`, for people.
    Human,
    /// One JSON object per line (`ts`, `level`, `target`, `msg`), for log collectors.
    Json,
}

/// Options of `megasock serve`; also the keys of the TOML file (same names, kebab-case).
#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of these options (same names); flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address to listen on; repeat for several. With --tls-cert and no --tls-listen these
    /// serve wss:// instead of ws://. [default: 0.0.0.0:8080 unless --tls-listen is given]
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,

    /// Address serving wss:// (TLS) beside the plain --listen ones; repeat for several.
    /// Needs --tls-cert and --tls-key. [default: none]
    #[arg(long, value_name = "ADDR")]
    pub tls_listen: Vec<SocketAddr>,

    /// Certificate chain for wss:// (PEM: the server's certificate first, then its
    /// intermediates). Read at start; SIGHUP (with --takeover) starts a process that reads it
    /// again. [default: none, plain ws:// only]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1). [default: none]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Worker threads, each with its own event loop and SO_REUSEPORT listener.
    /// [default: one per available core]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// Pin worker i to core i (core_affinity). [default: off]
    #[arg(long)]
    #[serde(default)]
    pub pin: bool,

    /// Listen backlog passed to listen(2); the kernel caps it at net.core.somaxconn.
    /// [default: 4096]
    #[arg(long, value_name = "N")]
    pub backlog: Option<u32>,

    /// Open connections across all workers; past it new clients get HTTP 503.
    /// [default: RLIMIT_NOFILE (raised to the hard limit) minus a reserve]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Largest message a client may send (after reassembly), in bytes (KiB/MiB suffixes
    /// accepted); a bigger one is closed with 1009. [default: 64KiB]
    #[arg(long, value_name = "SIZE")]
    pub max_message_size: Option<ByteSize>,

    /// Output queued for one connection beyond what the kernel took, in bytes; past it the
    /// slow-consumer policy applies. [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    pub max_backpressure: Option<ByteSize>,

    /// What to do with a connection over --max-backpressure: `close` sends 1008 and drops it,
    /// `drop` drops the messages that do not fit. [default: close]
    #[arg(long, value_name = "POLICY")]
    pub slow_consumer: Option<SlowConsumerPolicy>,

    /// Time a client has to complete the HTTP upgrade (e.g. 10s, 500ms). [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub handshake_timeout: Option<HumanDuration>,

    /// The server pings a connection that has sent nothing for this long. [default: 30s]
    #[arg(long, value_name = "DURATION")]
    pub ping_interval: Option<HumanDuration>,

    /// A connection that sends nothing (pongs count) for this long is closed with 1001.
    /// [default: 75s]
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<HumanDuration>,

    /// After the server sends a close frame, how long it waits for the client's close before
    /// dropping the socket. [default: 2s]
    #[arg(long, value_name = "DURATION")]
    pub close_timeout: Option<HumanDuration>,

    /// On SIGINT/SIGTERM, how long to wait for clients to acknowledge close 1001 before exiting.
    /// [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<HumanDuration>,

    /// Bytes queued in each cross-core ring (a worker's inbox from the others); a full ring
    /// pauses only the publishers whose rooms need it (no message is lost). [default: 4MiB]
    #[arg(long, value_name = "SIZE")]
    pub ring_capacity: Option<ByteSize>,

    /// The admin listener: /metrics (Prometheus), /healthz, /readyz, /stats, and the publish
    /// API (POST /publish/{room}, POST /publish); put it on a private address.
    /// `--metrics-listen` is an alias. [default: off]
    #[arg(long, value_name = "ADDR", alias = "metrics-listen")]
    #[serde(alias = "metrics-listen")]
    pub admin: Option<SocketAddr>,

    /// Every admin route but /healthz and /readyz then needs `Authorization: Bearer TOKEN`.
    /// [default: none]
    #[arg(long, value_name = "TOKEN")]
    pub admin_token: Option<String>,

    /// Do not serve the browser demo page at GET / on the WebSocket listener. [default: served]
    #[arg(long)]
    #[serde(default)]
    pub no_demo: bool,

    /// Do not negotiate permessage-deflate (RFC 7692): every connection is uncompressed and
    /// `Sec-WebSocket-Extensions` offers are ignored. [default: negotiated when offered]
    #[arg(long)]
    #[serde(default)]
    pub no_deflate: bool,

    /// With permessage-deflate, messages shorter than this (bytes; KiB suffixes accepted) go
    /// uncompressed: compressing one costs about 2 µs and a short message rarely shrinks.
    /// [default: 128]
    #[arg(long, value_name = "SIZE")]
    pub deflate_min_size: Option<ByteSize>,

    /// zlib level for permessage-deflate, 1-9. Level 1 uses fixed Huffman codes only
    /// (JSON comes out about 25 % larger); each message is compressed once per room, not per
    /// member, so a middle level is cheap. [default: 3]
    #[arg(long, value_name = "N")]
    pub deflate_level: Option<u32>,

    /// Let clients compress each message with the previous ones as context (client context
    /// takeover): their messages shrink more, but each such connection then holds a 47 KiB
    /// inflate state while idle. Off: clients are told `client_no_context_takeover`.
    /// [default: off]
    #[arg(long)]
    #[serde(default)]
    pub deflate_client_context_takeover: bool,

    /// Log line format: `human` (default) or `json` (one object per line, for collectors).
    /// [default: human]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Share rooms with other megasock processes through Redis pub/sub (redis://HOST:PORT[/DB]).
    /// [default: off]
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,

    /// Prefix of every Redis key and channel megasock uses. [default: megasock:]
    #[arg(long, value_name = "PREFIX")]
    pub redis_prefix: Option<String>,

    /// /readyz answers 503 while the Redis link is down (take the node out of the load
    /// balancer rather than serve rooms that stop at this node). [default: off]
    #[arg(long)]
    #[serde(default)]
    pub redis_required: bool,

    /// --redis names a node of a Redis Cluster: use sharded pub/sub (SSUBSCRIBE/SPUBLISH), so
    /// a room's traffic touches only the shard that owns its channel. [default: off]
    #[arg(long)]
    #[serde(default)]
    pub redis_sharded: bool,

    /// Also append every client message to this Redis Stream (XADD), for processing workers
    /// reading it with a consumer group. Needs --redis. [default: off]
    #[arg(long, value_name = "KEY")]
    pub redis_stream: Option<String>,

    /// Approximate length the stream is trimmed to (XADD MAXLEN ~). [default: 1000000]
    #[arg(long, value_name = "N")]
    pub redis_stream_maxlen: Option<u64>,

    /// Bytes queued for the Redis publisher; past it, messages are not published to Redis
    /// (counted; local delivery is unaffected). [default: 16MiB]
    #[arg(long, value_name = "SIZE")]
    pub redis_queue: Option<ByteSize>,

    /// Every connection starts with a PROXY protocol header (v1 or v2, as HAProxy's
    /// `send-proxy-v2` sends), which gives the client's real address; without one: HTTP 400.
    /// [default: off]
    #[arg(long)]
    #[serde(default)]
    pub proxy_protocol: bool,

    /// Require a JWT signed with this HS256 secret (its bytes as given; at least 32) to upgrade:
    /// from `Authorization: Bearer`, the access_token query parameter, or a
    /// Sec-WebSocket-Protocol entry `bearer.TOKEN`. Put it in the --config file (mode 0600)
    /// rather than on the command line, which other local users can read. [default: no token]
    #[arg(long, value_name = "SECRET")]
    pub auth_jwt_secret: Option<String>,

    /// Require a JWT signed by the key in this PEM file: RSA means RS256, P-256 ES256, Ed25519
    /// EdDSA (the key's type decides; no other alg is accepted). [default: no token]
    #[arg(long, value_name = "FILE")]
    pub auth_jwt_public_key: Option<PathBuf>,

    /// Tokens must name this audience in `aud`. [default: tokens with an aud are refused]
    #[arg(long, value_name = "AUD")]
    pub auth_audience: Option<String>,

    /// Tokens must have this `iss`. [default: not checked]
    #[arg(long, value_name = "ISS")]
    pub auth_issuer: Option<String>,

    /// Only pages from this origin may connect from a browser: exact (https://app.example.com)
    /// or https://*.example.com for its subdomains; repeat for several. Requests without
    /// Origin (not browsers) pass; other Origins get 403. [default: any origin]
    #[arg(long, value_name = "ORIGIN")]
    #[serde(alias = "allowed-origins")]
    pub allowed_origin: Vec<String>,

    /// A subprotocol this server speaks; repeat for several. The 101 names the first of the
    /// client's Sec-WebSocket-Protocol entries listed here, or none (not an error).
    /// [default: none]
    #[arg(long, value_name = "NAME")]
    #[serde(alias = "subprotocols")]
    pub subprotocol: Vec<String>,

    /// Open connections per client address (an IPv6 client: per /64) across all workers;
    /// past it HTTP 503. With --proxy-protocol, the address from the PROXY header.
    /// [default: unlimited]
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<u32>,

    /// New connections per client address per second (a fixed one-second window); past it
    /// HTTP 429 with Retry-After. [default: unlimited]
    #[arg(long, value_name = "N/s")]
    pub max_handshakes_per_ip: Option<PerSecond>,

    /// Messages (and pings) per second one connection may send, on average; past it and
    /// --max-message-burst, close 1008 "message rate". [default: unlimited]
    #[arg(long, value_name = "N/s")]
    pub max_message_rate: Option<PerSecond>,

    /// Messages one connection may send at once above --max-message-rate.
    /// [default: one second's worth]
    #[arg(long, value_name = "B")]
    pub max_message_burst: Option<u32>,

    /// Restart without refusing a connect: take the listening sockets of the megasock serving
    /// this Unix socket path (it then drains and exits), and serve the path for the next
    /// restart. The first process with the path just binds --listen. [default: off]
    #[arg(long, value_name = "PATH")]
    pub takeover: Option<PathBuf>,

    /// Once listening, write the bound addresses to this file (`ws=IP:PORT` lines, then
    /// `metrics=IP:PORT`), for scripts that start the server on port 0. [default: none]
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Plain (ws://) addresses.
    pub listen: Vec<SocketAddr>,
    /// TLS (wss://) addresses; non-empty exactly when `tls` is set.
    pub tls_listen: Vec<SocketAddr>,
    /// `--tls-cert` and `--tls-key`.
    pub tls: Option<TlsFiles>,
    pub workers: usize,
    pub pin: bool,
    pub backlog: u32,
    /// `None` means "derive from RLIMIT_NOFILE at start".
    pub max_connections: Option<usize>,
    pub max_message_size: usize,
    pub max_backpressure: usize,
    pub slow_consumer: SlowConsumerPolicy,
    pub handshake_timeout: Duration,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub close_timeout: Duration,
    pub drain_timeout: Duration,
    /// Bytes per cross-core ring.
    pub ring_capacity: usize,
    pub admin: Option<SocketAddr>,
    pub admin_token: Option<String>,
    pub demo: bool,
    /// permessage-deflate: what the handshake agrees to (`enabled` false with --no-deflate).
    pub deflate: crate::deflate::DeflateConfig,
    /// Payloads shorter than this go uncompressed.
    pub deflate_min_size: usize,
    /// zlib level, 1..=9.
    pub deflate_level: u32,
    pub log_format: LogFormat,
    pub takeover: Option<PathBuf>,
    pub proxy_protocol: bool,
    /// The token, Origin and subprotocol checks; None when none is configured.
    pub gate: Option<std::sync::Arc<crate::access::Gate>>,
    pub max_connections_per_ip: Option<u32>,
    pub max_handshakes_per_ip: Option<u32>,
    pub message_rate: Option<crate::abuse::message_rate::MessageRate>,
    pub redis: Option<String>,
    pub redis_prefix: String,
    pub redis_required: bool,
    pub redis_sharded: bool,
    pub redis_stream: Option<String>,
    pub redis_stream_maxlen: u64,
    pub redis_queue: usize,
    pub ready_file: Option<PathBuf>,
}

/// The certificate chain and key files for wss://.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        ServeArgs::default().resolve().expect("defaults are valid")
    }
}

/// A configuration error: names the option and says what would be accepted.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err(option: &str, msg: impl fmt::Display) -> ConfigError {
    ConfigError(format!("invalid value for --{option}: {msg}"))
}

impl ServeArgs {
    /// Reads `--config` (if given) and fills every option not given on the command line.
    pub fn merge_config_file(mut self) -> Result<Self, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            ConfigError(format!(
                "cannot read --config {}: {e} (check the path and permissions)",
                path.display()
            ))
        })?;
        let file: ServeArgs =
            toml::from_str(&text).map_err(|e| {
                let msg = e.to_string();
                let first = msg.lines().next().unwrap_or("").to_string();
                ConfigError(format!(
                "invalid --config {}: {} (keys are the flag names, e.g. max-connections = 1000)",
                path.display(),
                if first.is_empty() { msg } else { msg.replace('\n', " ") }
            ))
            })?;
        macro_rules! fill {
            ($($f:ident),*) => { $( if self.$f.is_none() { self.$f = file.$f; } )* };
        }
        fill!(
            workers,
            backlog,
            max_connections,
            max_message_size,
            max_backpressure,
            slow_consumer,
            handshake_timeout,
            ping_interval,
            idle_timeout,
            close_timeout,
            drain_timeout,
            ring_capacity,
            admin,
            admin_token,
            deflate_min_size,
            deflate_level,
            log_format,
            takeover,
            redis,
            redis_prefix,
            redis_stream,
            redis_stream_maxlen,
            redis_queue,
            auth_jwt_secret,
            auth_jwt_public_key,
            auth_audience,
            auth_issuer,
            max_connections_per_ip,
            max_handshakes_per_ip,
            max_message_rate,
            max_message_burst,
            ready_file,
            tls_cert,
            tls_key
        );
        if self.listen.is_empty() {
            self.listen = file.listen;
        }
        if self.tls_listen.is_empty() {
            self.tls_listen = file.tls_listen;
        }
        if self.allowed_origin.is_empty() {
            self.allowed_origin = file.allowed_origin;
        }
        if self.subprotocol.is_empty() {
            self.subprotocol = file.subprotocol;
        }
        self.pin |= file.pin;
        self.no_demo |= file.no_demo;
        self.no_deflate |= file.no_deflate;
        self.deflate_client_context_takeover |= file.deflate_client_context_takeover;
        self.redis_required |= file.redis_required;
        self.proxy_protocol |= file.proxy_protocol;
        self.redis_sharded |= file.redis_sharded;
        Ok(self)
    }

    /// Applies defaults and checks ranges.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let gate = self.gate()?;
        let mut listen = if self.listen.is_empty() && self.tls_listen.is_empty() {
            vec![SocketAddr::from(([0, 0, 0, 0], 8080))]
        } else {
            self.listen
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (cert, _) => {
                return Err(err(
                    if cert.is_some() {
                        "tls-cert"
                    } else {
                        "tls-key"
                    },
                    "--tls-cert and --tls-key go together: give the certificate chain and its \
                     private key",
                ))
            }
        };
        if tls.is_some() && self.proxy_protocol {
            return Err(err(
                "proxy-protocol",
                "the PROXY header before a TLS handshake is not read yet: with --tls-cert, \
                 terminate TLS at the proxy (HAProxy `bind ... ssl crt`) and send plain \
                 WebSocket with send-proxy-v2, or drop --proxy-protocol",
            ));
        }
        let tls_listen = match (&tls, self.tls_listen.is_empty()) {
            (None, false) => {
                return Err(err(
                    "tls-listen",
                    "wss:// needs a certificate: add --tls-cert FILE --tls-key FILE",
                ))
            }
            (None, true) => Vec::new(),
            // The certificate applies to --listen when no --tls-listen says where.
            (Some(_), true) => std::mem::take(&mut listen),
            (Some(_), false) => self.tls_listen,
        };
        let workers = match self.workers {
            Some(0) => return Err(err("workers", "must be at least 1")),
            Some(n) if n > 1024 => return Err(err("workers", "at most 1024 workers")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let backlog = self.backlog.unwrap_or(4096);
        if backlog == 0 || backlog > i32::MAX as u32 {
            return Err(err("backlog", "must be between 1 and 2147483647"));
        }
        if self.max_connections == Some(0) {
            return Err(err("max-connections", "must be at least 1"));
        }
        let max_message_size = self.max_message_size.map_or(64 * 1024, |b| b.0);
        if max_message_size == 0 || max_message_size > 1 << 30 {
            return Err(err("max-message-size", "must be between 1 byte and 1GiB"));
        }
        let max_backpressure = self.max_backpressure.map_or(1 << 20, |b| b.0);
        if !(1024..=1 << 30).contains(&max_backpressure) {
            return Err(err("max-backpressure", "must be between 1KiB and 1GiB"));
        }
        let handshake_timeout = positive("handshake-timeout", self.handshake_timeout, 10)?;
        let ping_interval = positive("ping-interval", self.ping_interval, 30)?;
        let idle_timeout = positive("idle-timeout", self.idle_timeout, 75)?;
        let close_timeout = positive("close-timeout", self.close_timeout, 2)?;
        let drain_timeout = self.drain_timeout.map_or(Duration::from_secs(10), |d| d.0);
        let ring_capacity = self.ring_capacity.map_or(4 << 20, |b| b.0);
        if !(4096..=1 << 30).contains(&ring_capacity) {
            return Err(err(
                "ring-capacity",
                "must be between 4KiB and 1GiB (it is a size in bytes since 0.2: try 4MiB)",
            ));
        }
        let deflate_level = self.deflate_level.unwrap_or(3);
        if !(1..=9).contains(&deflate_level) {
            return Err(err("deflate-level", "must be between 1 and 9"));
        }
        let deflate = crate::deflate::DeflateConfig {
            enabled: !self.no_deflate,
            allow_client_context_takeover: self.deflate_client_context_takeover,
            ..Default::default()
        };
        if self.redis.is_none() && (self.redis_stream.is_some() || self.redis_required) {
            return Err(err(
                "redis-stream",
                "--redis-stream and --redis-required need --redis URL",
            ));
        }
        let max_connections_per_ip = match self.max_connections_per_ip {
            Some(0) => return Err(err("max-connections-per-ip", "must be at least 1")),
            n => n,
        };
        let max_handshakes_per_ip = match self.max_handshakes_per_ip {
            Some(PerSecond(n)) if !(1..=65535).contains(&n) => {
                return Err(err(
                    "max-handshakes-per-ip",
                    "must be between 1/s and 65535/s",
                ))
            }
            n => n.map(|r| r.0),
        };
        let message_rate = match (self.max_message_rate, self.max_message_burst) {
            (None, Some(_)) => {
                return Err(err("max-message-burst", "needs --max-message-rate N/s"))
            }
            (None, None) => None,
            (Some(PerSecond(rate)), burst) => {
                let burst = burst.unwrap_or(rate);
                if !(1..=100_000_000).contains(&rate) {
                    return Err(err(
                        "max-message-rate",
                        "must be between 1/s and 100000000/s",
                    ));
                }
                if !(1..=100_000_000).contains(&burst) {
                    return Err(err("max-message-burst", "must be between 1 and 100000000"));
                }
                Some(crate::abuse::message_rate::MessageRate::new(rate, burst))
            }
        };
        Ok(Config {
            listen,
            tls_listen,
            tls,
            workers,
            pin: self.pin,
            backlog,
            max_connections: self.max_connections,
            max_message_size,
            max_backpressure,
            slow_consumer: self.slow_consumer.unwrap_or(SlowConsumerPolicy::Close),
            handshake_timeout,
            ping_interval,
            idle_timeout,
            close_timeout,
            drain_timeout,
            ring_capacity,
            admin: self.admin,
            admin_token: self.admin_token.filter(|t| !t.is_empty()),
            demo: !self.no_demo,
            deflate,
            deflate_min_size: self.deflate_min_size.map_or(128, |b| b.0),
            deflate_level,
            log_format: self.log_format.unwrap_or(LogFormat::Human),
            takeover: self.takeover,
            proxy_protocol: self.proxy_protocol,
            gate,
            max_connections_per_ip,
            max_handshakes_per_ip,
            message_rate,
            redis_required: self.redis_required,
            redis_sharded: self.redis_sharded,
            redis_prefix: self.redis_prefix.unwrap_or_else(|| "megasock:".into()),
            redis_stream_maxlen: self.redis_stream_maxlen.unwrap_or(1_000_000),
            redis_queue: self.redis_queue.map_or(16 << 20, |b| b.0),
            redis_stream: self.redis_stream,
            redis: self.redis,
            ready_file: self.ready_file,
        })
    }
}

impl ServeArgs {
    /// The token, Origin and subprotocol checks, with the key file read and checked now (a
    /// bad key stops the start with a message, not the first client).
    fn gate(&self) -> Result<Option<std::sync::Arc<crate::access::Gate>>, ConfigError> {
        use crate::access::{keys, OriginPattern, Verifier, PROTOCOL_TOKEN_PREFIX};
        let (aud, iss) = (self.auth_audience.clone(), self.auth_issuer.clone());
        let jwt = match (&self.auth_jwt_secret, &self.auth_jwt_public_key) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "auth-jwt-secret",
                    "give either --auth-jwt-secret (HS256) or --auth-jwt-public-key, not both",
                ))
            }
            (Some(secret), None) if secret.len() < 32 => {
                return Err(err(
                    "auth-jwt-secret",
                    "an HS256 secret needs at least 32 bytes (RFC 7518 3.2); make one with \
                     `openssl rand -base64 48`",
                ))
            }
            (Some(secret), None) => Some(Verifier::secret(secret.as_bytes(), aud, iss)),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    err(
                        "auth-jwt-public-key",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let key = keys::from_pem(&text)
                    .map_err(|e| err("auth-jwt-public-key", format!("{}: {e}", path.display())))?;
                Some(Verifier::public(key, aud, iss))
            }
            (None, None) if aud.is_some() || iss.is_some() => {
                return Err(err(
                    "auth-audience",
                    "--auth-audience and --auth-issuer need --auth-jwt-secret or \
                     --auth-jwt-public-key",
                ))
            }
            (None, None) => None,
        };
        let origins = self
            .allowed_origin
            .iter()
            .map(|o| OriginPattern::parse(o).map_err(|e| err("allowed-origin", e)))
            .collect::<Result<Vec<_>, _>>()?;
        for p in &self.subprotocol {
            let token = !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token {
                return Err(err(
                    "subprotocol",
                    format!("`{p}` is not an HTTP token (letters, digits, !#$%&'*+-.^_`|~)"),
                ));
            }
            if p.starts_with(PROTOCOL_TOKEN_PREFIX) {
                return Err(err(
                    "subprotocol",
                    format!("`{p}`: entries starting {PROTOCOL_TOKEN_PREFIX} carry tokens"),
                ));
            }
        }
        Ok(crate::access::Gate::new(jwt, origins, &self.subprotocol).map(std::sync::Arc::new))
    }
}

fn positive(
    option: &str,
    value: Option<HumanDuration>,
    default_secs: u64,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(Duration::from_secs(default_secs)),
        Some(d) if d.0.is_zero() => Err(err(option, "must be greater than zero")),
        Some(d) => Ok(d.0),
    }
}

/// Splits `64KiB` into 64 and `KiB`; `what` completes the error "`s` is not ...".
fn number_and_unit<'a>(s: &'a str, what: &str) -> Result<(u64, &'a str), String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n = num.parse().map_err(|_| format!("`{s}` is not {what}"))?;
    Ok((n, unit.trim()))
}

/// A byte count written as `65536`, `64KiB`, `1MiB`, `1G` (binary multiples).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = number_and_unit(s, "a size (try 65536, 64KiB or 1MiB)")?;
        let mult: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            _ => {
                return Err(format!(
                    "`{s}` has an unknown unit (use B, KiB, MiB or GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .and_then(|v| usize::try_from(v).ok())
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_text(d, |n| ByteSize(n as usize))
    }
}

/// TOML values may be a bare number (bytes, seconds) or a string with a unit.
fn number_or_text<'de, D, T>(d: D, from_number: fn(u64) -> T) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(from_number(n)),
        Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// A rate written as `100`, `100/s` or `6000/m` (per second, rounded up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerSecond(pub u32);

impl std::str::FromStr for PerSecond {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (num, per) = t.split_once('/').unwrap_or((t, "s"));
        let n: u64 = num
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a rate (try 100/s)"))?;
        let n = match per.trim() {
            "s" | "sec" => n,
            "m" | "min" => n.div_ceil(60),
            _ => return Err(format!("`{s}` has an unknown unit (use /s or /m)")),
        };
        u32::try_from(n)
            .map(PerSecond)
            .map_err(|_| format!("`{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for PerSecond {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_text(d, |n| PerSecond(n.min(u32::MAX as u64) as u32))
    }
}

/// A duration written as `10s`, `500ms`, `2m`, `1h`, or a plain number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = number_and_unit(s, "a duration (try 10s, 500ms or 2m)")?;
        let d = match unit {
            "" | "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(format!("`{s}` has an unknown unit (use ms, s, m or h)")),
        };
        Ok(HumanDuration(d))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_text(d, |n| HumanDuration(Duration::from_secs(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65536);
        assert_eq!("1MiB".parse::<ByteSize>().unwrap().0, 1 << 20);
        assert_eq!("100".parse::<ByteSize>().unwrap().0, 100);
        assert!("1 parsec".parse::<ByteSize>().is_err());
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "2m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(120)
        );
        assert_eq!(
            "7".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(7)
        );
        assert!("7 fortnights".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn toml_fills_only_missing_flags() {
        let dir = std::env::temp_dir().join(format!("megasock-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.toml");
        std::fs::write(
            &path,
            "workers = 3\nmax-message-size = \"1MiB\"\nidle-timeout = 20\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            workers: Some(5),
            ..Default::default()
        };
        let cfg = args.merge_config_file().unwrap().resolve().unwrap();
        assert_eq!(cfg.workers, 5, "flag wins over file");
        assert_eq!(cfg.max_message_size, 1 << 20);
        assert_eq!(cfg.idle_timeout, Duration::from_secs(20));
        assert_eq!(cfg.backlog, 4096);
    }

    #[test]
    fn tls_applies_to_listen_unless_tls_listen_says_where() {
        let a: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let files = |args: ServeArgs| ServeArgs {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..args
        };
        let all = files(ServeArgs {
            listen: vec![a],
            ..Default::default()
        })
        .resolve()
        .unwrap();
        assert_eq!((all.listen.len(), all.tls_listen.clone()), (0, vec![a]));
        let both = files(ServeArgs {
            listen: vec![b],
            tls_listen: vec![a],
            ..Default::default()
        })
        .resolve()
        .unwrap();
        assert_eq!((both.listen, both.tls_listen), (vec![b], vec![a]));
        let only_tls = files(ServeArgs {
            tls_listen: vec![a],
            ..Default::default()
        })
        .resolve()
        .unwrap();
        assert!(
            only_tls.listen.is_empty(),
            "no default plain port beside --tls-listen"
        );
        let e = ServeArgs {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("--tls-cert and --tls-key go together"),
            "{e}"
        );
        let e = ServeArgs {
            tls_listen: vec![a],
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            e.to_string().contains("--tls-cert FILE --tls-key FILE"),
            "{e}"
        );
    }

    #[test]
    fn deflate_options() {
        let cfg = Config::default();
        assert!(cfg.deflate.enabled);
        assert!(!cfg.deflate.allow_client_context_takeover);
        assert_eq!((cfg.deflate_min_size, cfg.deflate_level), (128, 3));
        let dir = std::env::temp_dir().join(format!("megasock-cfg-d-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.toml");
        std::fs::write(
            &path,
            "no-deflate = true\ndeflate-min-size = \"1KiB\"\ndeflate-level = 6\n\
             deflate-client-context-takeover = true\n",
        )
        .unwrap();
        let cfg = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .merge_config_file()
        .unwrap()
        .resolve()
        .unwrap();
        assert!(!cfg.deflate.enabled);
        assert!(cfg.deflate.allow_client_context_takeover);
        assert_eq!((cfg.deflate_min_size, cfg.deflate_level), (1024, 6));
        for bad in [0, 10] {
            let e = ServeArgs {
                deflate_level: Some(bad),
                ..Default::default()
            }
            .resolve()
            .unwrap_err();
            assert!(e.to_string().contains("--deflate-level"), "{e}");
        }
    }

    #[test]
    fn invalid_values_name_the_option() {
        let e = ServeArgs {
            workers: Some(0),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("--workers"), "{e}");
    }

    #[test]
    fn access_and_abuse_options_from_the_file() {
        let dir = std::env::temp_dir().join(format!("megasock-cfg-a-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.toml");
        std::fs::write(
            &path,
            "auth-jwt-secret = \"0123456789abcdef0123456789abcdef\"\n\
             allowed-origin = [\"https://*.example.com\"]\nsubprotocol = [\"chat.v1\"]\n\
             max-connections-per-ip = 5\nmax-handshakes-per-ip = \"600/m\"\n\
             max-message-rate = 20\nmax-message-burst = 40\n",
        )
        .unwrap();
        let cfg = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .merge_config_file()
        .unwrap()
        .resolve()
        .unwrap();
        assert!(cfg.gate.as_ref().is_some_and(|g| g.requires_token()));
        assert_eq!(cfg.max_connections_per_ip, Some(5));
        assert_eq!(cfg.max_handshakes_per_ip, Some(10));
        assert_eq!(
            cfg.message_rate,
            Some(crate::abuse::message_rate::MessageRate::new(20, 40))
        );
        assert!(
            Config::default().gate.is_none(),
            "nothing to check by default"
        );
        let bad = |args: ServeArgs, option: &str| {
            let e = args.resolve().unwrap_err().to_string();
            assert!(e.contains(option), "{e}");
        };
        bad(
            ServeArgs {
                max_message_burst: Some(5),
                ..Default::default()
            },
            "--max-message-burst",
        );
        bad(
            ServeArgs {
                max_connections_per_ip: Some(0),
                ..Default::default()
            },
            "--max-connections-per-ip",
        );
        bad(
            ServeArgs {
                max_handshakes_per_ip: Some(PerSecond(70_000)),
                ..Default::default()
            },
            "--max-handshakes-per-ip",
        );
        bad(
            ServeArgs {
                subprotocol: vec!["two words".into()],
                ..Default::default()
            },
            "--subprotocol",
        );
        assert_eq!("100/s".parse::<PerSecond>(), Ok(PerSecond(100)));
        assert_eq!("61/m".parse::<PerSecond>(), Ok(PerSecond(2)));
        assert!("fast".parse::<PerSecond>().is_err());
    }
}
