//! Command line: one subcommand per scenario, sharing the connection options.

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    name = "megasock-bench",
    version,
    about = "Load generator for megasock and any server speaking its routes (/echo, /ws/{room})",
    long_about = "Load generator for megasock and any WebSocket server speaking its routes: \
GET /echo (every message comes back) and GET /ws/{room} (every message goes to every member, \
the sender included). mio event loops, one thread per core by default, optionally several \
processes (--procs) and many source addresses (--source-ips) to get past per-process and \
per-address limits. Every latency is recorded in an HdrHistogram.\n\n\
Exit status: 0 = ran and every check passed, 1 = ran but a check failed (lost, duplicated, \
reordered or corrupt messages, failed connections...), 2 = could not run (bad options, limits)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug, Clone, Serialize)]
#[allow(clippy::large_enum_variant)] // one value, parsed once
pub enum Command {
    #[command(flatten)]
    Run(Scenario),
    /// Median, minimum, maximum and spread of the headline figures of several JSON reports of
    /// one scenario (e.g. repeated runs of scripts/bench.sh)
    Summarize(SummarizeArgs),
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct SummarizeArgs {
    /// JSON reports written by --json (all of the same scenario)
    #[arg(required = true)]
    pub reports: Vec<String>,
    /// Also write the summary as JSON to FILE
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
}

#[derive(Subcommand, Debug, Clone, Serialize)]
#[serde(tag = "scenario", rename_all = "lowercase")]
pub enum Scenario {
    /// Open N connections (at --rate per second), hold them for --hold seconds, close them.
    Connect(ConnectArgs),
    /// C connections with W messages in flight each for S seconds; every echo checked byte for byte.
    Echo(EchoArgs),
    /// N members of one room, P of them publishing M messages of B bytes; checks loss, duplicates, order.
    Broadcast(BroadcastArgs),
    /// Grow one room step by step, broadcasting every --interval; finds the largest room under a latency bound.
    Ladder(LadderArgs),
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Connect(_) => "connect",
            Scenario::Echo(_) => "echo",
            Scenario::Broadcast(_) => "broadcast",
            Scenario::Ladder(_) => "ladder",
        }
    }
    pub fn common(&self) -> &Common {
        match self {
            Scenario::Connect(a) => &a.common,
            Scenario::Echo(a) => &a.common,
            Scenario::Broadcast(a) => &a.common,
            Scenario::Ladder(a) => &a.common,
        }
    }
}

/// Options every scenario has.
#[derive(Args, Debug, Clone, Serialize)]
pub struct Common {
    /// Target, ws://HOST:PORT/PATH (no TLS)
    #[arg(long)]
    pub url: String,

    /// Write every figure and the full configuration to FILE (JSON); .hgrm files and SVG plots
    /// are written next to it (FILE without .json, plus .NAME.hgrm / .NAME.svg)
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,

    /// Event-loop threads per process [default: available cores / --procs, at least 1]
    #[arg(long)]
    pub threads: Option<usize>,

    /// Client processes (each under its own fd limit); results are merged exactly
    #[arg(long, default_value_t = 1)]
    pub procs: usize,

    /// Local source addresses to spread connections over, bound before connect
    /// (IP_BIND_ADDRESS_NO_PORT): e.g. 127.0.0.2-127.0.0.50, 10.0.0.0/24, 127.0.0.2,127.0.0.3
    #[arg(long, value_name = "SPEC")]
    pub source_ips: Option<String>,

    /// New connections per second over all threads and processes; 0 = as fast as possible
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,

    /// Most handshakes in progress at once, per thread
    #[arg(long, default_value_t = 1000)]
    pub max_pending: usize,

    /// Give up on a connection whose TCP connect + upgrade takes longer (e.g. 10s, 500ms)
    #[arg(long, default_value = "10s", value_parser = parse_duration_secs)]
    pub connect_timeout: f64,

    /// Sample these server processes (comma-separated; their RSS and CPU time are summed,
    /// from /proc/PID), and the kernel's socket memory (/proc/net/sockstat, /proc/meminfo Slab)
    #[arg(long, value_name = "PID[,PID...]", value_delimiter = ',')]
    pub server_pid: Vec<u32>,

    /// Send text frames instead of binary (payload stays ASCII; the server validates UTF-8)
    #[arg(long)]
    pub text: bool,

    /// Text frames whose padding is realistic chat JSON instead of a..z (for compression:
    /// a..z compresses a hundredfold, chat JSON about 3x)
    #[arg(long)]
    pub json_payload: bool,

    /// Offer permessage-deflate (RFC 7692) and inflate compressed messages before checking
    /// them; the report gains the bytes on the wire per message received
    #[arg(long)]
    pub deflate: bool,

    /// Progress display on stderr: auto (a bar on a terminal, lines otherwise), bar, lines, none
    #[arg(long, default_value = "auto", value_parser = ["auto", "bar", "lines", "none"])]
    pub progress: String,

    /// Do not draw the SVG plots
    #[arg(long)]
    pub no_plots: bool,

    /// Hard limit on the whole run; everything is stopped and the run fails past it
    #[arg(long, default_value = "600s", value_parser = parse_duration_secs)]
    pub deadline: f64,

    /// Check the options, the fd limit and the port range, print the plan as key=value lines
    /// and exit (0 = it fits, 2 = it does not); nothing is connected
    #[arg(long)]
    pub dry_run: bool,

    /// Internal: this process is child number N of --procs (set by the parent)
    #[arg(long, hide = true)]
    pub child_index: Option<usize>,

    /// Internal: run identifier embedded in every payload (set by the parent for its children)
    #[arg(long, hide = true)]
    pub run_id: Option<u32>,
}

impl Common {
    /// The payload style the flags ask for (`--json-payload` implies text frames).
    pub fn style(&self) -> crate::payload::Style {
        use crate::payload::Style;
        match (self.json_payload, self.text) {
            (true, _) => Style::Json,
            (false, true) => Style::Text,
            (false, false) => Style::Binary,
        }
    }
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct ConnectArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// Connections to open (over all threads and processes)
    #[arg(long)]
    pub conns: u64,
    /// Seconds to hold them open once all are up (e.g. 5, 30s, 500ms)
    #[arg(long, default_value = "5", value_parser = parse_duration_secs)]
    pub hold: f64,
    /// Exit 0 even if some connections failed (they are still reported)
    #[arg(long)]
    pub allow_failures: bool,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct EchoArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// Connections
    #[arg(long, default_value_t = 100)]
    pub conns: u64,
    /// Messages in flight per connection
    #[arg(long, default_value_t = 8)]
    pub inflight: u32,
    /// Seconds of sending (e.g. 5, 10s)
    #[arg(long, default_value = "5", value_parser = parse_duration_secs)]
    pub secs: f64,
    /// Payload bytes per message (at least 24, or 44 with --text)
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// After --secs, how long to wait for the echoes still in flight
    #[arg(long, default_value = "5s", value_parser = parse_duration_secs)]
    pub drain_timeout: f64,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct BroadcastArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// Members of the room (every one receives every message); the publishers are among them
    #[arg(long)]
    pub subs: u64,
    /// Members that publish
    #[arg(long, default_value_t = 1)]
    pub pubs: u64,
    /// Connect the members that do not publish to this server instead (ws://HOST:PORT/PATH):
    /// a room across two nodes (e.g. bridged by Redis), publishers on --url
    #[arg(long, value_name = "URL")]
    pub members_url: Option<String>,
    /// Wait this long once every member is connected, before publishing (time for servers to
    /// set up cross-node subscriptions, e.g. with --members-url)
    #[arg(long, default_value = "0s", value_parser = parse_duration_secs)]
    pub settle: f64,
    /// Messages per publisher
    #[arg(long, default_value_t = 100)]
    pub msgs: u64,
    /// Payload bytes per message (at least 24, or 44 with --text)
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Messages per second per publisher; 0 = as fast as the socket takes them
    #[arg(long, default_value_t = 0.0)]
    pub msg_rate: f64,
    /// Stop waiting for deliveries after this long without any (the missing ones count as lost)
    #[arg(long, default_value = "5s", value_parser = parse_duration_secs)]
    pub idle_timeout: f64,
    /// Hard bound on the publishing + delivery phase
    #[arg(long, default_value = "120s", value_parser = parse_duration_secs)]
    pub timeout: f64,
}

#[derive(Args, Debug, Clone, Serialize)]
pub struct LadderArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: Common,
    /// Room sizes to try, in increasing order
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000,10000")]
    pub steps: Vec<u64>,
    /// Broadcasts per step (at most 64)
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// Time between broadcasts
    #[arg(long, default_value = "100ms", value_parser = parse_duration_secs)]
    pub interval: f64,
    /// Latency bound for "the last member has the message", at p95 over the rounds
    #[arg(long, default_value = "250ms", value_parser = parse_duration_secs)]
    pub bound: f64,
    /// Payload bytes per message (at least 24, or 44 with --text)
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Keep climbing after a step exceeds the bound
    #[arg(long)]
    pub keep_going: bool,
}

/// `10s`, `500ms`, `2m`, `1.5` (seconds) -> seconds.
pub fn parse_duration_secs(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 10s, 500ms, 2m, 1.5)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("invalid duration {s:?}: must be >= 0"));
    }
    Ok(v * mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn scenario(c: Cli) -> Scenario {
        match c.command {
            Command::Run(s) => s,
            Command::Summarize(_) => panic!("not a scenario"),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("10s").unwrap(), 10.0);
        assert_eq!(parse_duration_secs("500ms").unwrap(), 0.5);
        assert_eq!(parse_duration_secs("2m").unwrap(), 120.0);
        assert_eq!(parse_duration_secs("1.5").unwrap(), 1.5);
        assert!(parse_duration_secs("-1").is_err());
        assert!(parse_duration_secs("abc").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn contract_command_lines_parse() {
        let c = Cli::try_parse_from([
            "megasock-bench",
            "broadcast",
            "--url",
            "ws://127.0.0.1:1/ws/r",
            "--subs",
            "10",
            "--pubs",
            "2",
            "--msgs",
            "5",
            "--size",
            "64",
            "--json",
            "x.json",
        ])
        .unwrap();
        assert_eq!(scenario(c).name(), "broadcast");
        Cli::try_parse_from([
            "megasock-bench",
            "echo",
            "--url",
            "ws://127.0.0.1:1/echo",
            "--conns",
            "3",
            "--inflight",
            "2",
            "--secs",
            "1",
            "--size",
            "64",
            "--json",
            "x.json",
        ])
        .unwrap();
        Cli::try_parse_from([
            "megasock-bench",
            "connect",
            "--url",
            "ws://127.0.0.1:1/echo",
            "--conns",
            "3",
            "--hold",
            "1",
            "--server-pid",
            "1",
            "--json",
            "x.json",
        ])
        .unwrap();
        let l = Cli::try_parse_from([
            "megasock-bench",
            "ladder",
            "--url",
            "ws://127.0.0.1:1/ws/r",
            "--steps",
            "1000,2000,5000",
            "--json",
            "x.json",
        ])
        .unwrap();
        match scenario(l) {
            Scenario::Ladder(a) => assert_eq!(a.steps, vec![1000, 2000, 5000]),
            _ => unreachable!(),
        }
        let s = Cli::try_parse_from(["megasock-bench", "summarize", "a.json", "b.json"]).unwrap();
        assert!(matches!(s.command, Command::Summarize(a) if a.reports.len() == 2));
    }
}
