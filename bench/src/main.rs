//! megasock-bench: a load generator for megasock and any WebSocket server speaking its routes.
//! See `megasock-bench --help` and bench/README.md.

mod cli;
mod driver;
mod engine;
mod hist;
mod payload;
mod plot;
mod report;
mod result;
mod runner;
mod seqtrack;
mod srcip;
mod summary;
mod util;
mod worker;
mod ws;

use clap::Parser;
use cli::{Cli, Scenario};
use report::{PlotSpec, Report};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use worker::Plan;

/// fds a client process keeps for itself (epoll, wakers, pipes, stdio, files).
const FD_RESERVE: u64 = 64;

fn main() {
    let sc = match Cli::parse().command {
        cli::Command::Run(sc) => sc,
        cli::Command::Summarize(a) => std::process::exit(summary::run(&a)),
    };
    let plan = match make_plan(&sc) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("megasock-bench: {e}");
            std::process::exit(2);
        }
    };
    if sc.common().child_index.is_some() {
        driver::child_main(sc, plan);
        return;
    }
    let capacity = check_capacity(&sc, &plan);
    if sc.common().dry_run {
        print_plan(&sc, &plan);
    }
    if let Err(e) = capacity {
        eprintln!("megasock-bench: {e}");
        std::process::exit(2);
    }
    if sc.common().dry_run {
        return;
    }
    std::process::exit(run(&sc, &plan));
}

fn run(sc: &Scenario, plan: &Plan) -> i32 {
    let steps: Vec<u64> = match sc {
        Scenario::Ladder(a) => a.steps.clone(),
        _ => vec![max_connections(sc)],
    };
    let want = |stage: u64| -> u64 {
        let per = steps.get(stage as usize).copied().unwrap_or(0);
        per
    };
    let mut next = |stage: u64, r: &result::StageResult| -> bool {
        match sc {
            Scenario::Ladder(a) => {
                let v = report::ladder_step(r, a.bound);
                (v.pass || a.keep_going) && (stage as usize + 1) < a.steps.len()
            }
            _ => false,
        }
    };
    let out = match driver::drive(sc, plan, &want, &mut next) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("megasock-bench: {e}");
            return 2;
        }
    };
    let rep = match sc {
        Scenario::Connect(a) => report::connect(sc, a, plan, &out),
        Scenario::Echo(a) => report::echo(sc, a, plan, &out),
        Scenario::Broadcast(a) => report::broadcast(sc, a, plan, &out),
        Scenario::Ladder(a) => report::ladder(sc, a, plan, &out),
    };
    finish(sc, &out, rep)
}

fn finish(sc: &Scenario, out: &driver::RunOutcome, mut rep: Report) -> i32 {
    let c = sc.common();
    let ok = rep.problems.is_empty();
    rep.json.insert("ok".into(), serde_json::json!(ok));
    rep.json
        .insert("problems".into(), serde_json::json!(rep.problems));
    let mut status = if ok { 0 } else { 1 };
    if let Some(json_path) = &c.json {
        let stem = json_stem(json_path);
        if let Some(dir) = Path::new(json_path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            if let Err(e) = std::fs::create_dir_all(dir) {
                eprintln!("megasock-bench: cannot create {}: {e}", dir.display());
            }
        }
        let mut files = serde_json::Map::new();
        let mut hgrm = serde_json::Map::new();
        for (name, h) in &rep.hists {
            if h.is_empty() {
                continue;
            }
            let p = format!("{stem}.{name}.hgrm");
            match std::fs::File::create(&p).and_then(|mut f| h.write_hgrm(&mut f)) {
                Ok(()) => {
                    hgrm.insert(name.clone(), serde_json::json!(p));
                }
                Err(e) => eprintln!("megasock-bench: cannot write {p}: {e}"),
            }
        }
        files.insert("hgrm".into(), serde_json::Value::Object(hgrm));
        let mut plots = Vec::new();
        if !c.no_plots {
            for spec in &rep.plots {
                let (name, res) = draw(spec, &stem, &rep, out);
                match res {
                    Ok(true) => plots.push(serde_json::json!(format!("{stem}.{name}.svg"))),
                    Ok(false) => {}
                    Err(e) => eprintln!("megasock-bench: {e}"),
                }
            }
        }
        files.insert("plots".into(), serde_json::json!(plots));
        rep.json
            .insert("files".into(), serde_json::Value::Object(files));
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(rep.json.clone()))
            .expect("serializable report");
        if let Err(e) = std::fs::write(json_path, text + "\n") {
            eprintln!("megasock-bench: cannot write {json_path}: {e}");
            status = 2;
        }
    }
    print!("{}", rep.summary);
    if ok {
        println!("  result: ok");
    } else {
        for p in &rep.problems {
            println!("  FAILED: {p}");
        }
    }
    if let Some(p) = &c.json {
        println!("  report: {p}");
    }
    status
}

/// Draw one plot; Ok(false) if there was nothing to draw.
fn draw(
    spec: &PlotSpec,
    stem: &str,
    rep: &Report,
    out: &driver::RunOutcome,
) -> (String, Result<bool, String>) {
    match spec {
        PlotSpec::Latency {
            name,
            title,
            series,
        } => {
            let data: Vec<(String, Vec<(f64, f64)>)> = series
                .iter()
                .filter_map(|s| rep.hists.iter().find(|h| &h.0 == s))
                .map(|(n, h)| (n.clone(), h.percentile_curve()))
                .filter(|(_, pts)| !pts.is_empty())
                .collect();
            if data.is_empty() {
                return (name.clone(), Ok(false));
            }
            let path = format!("{stem}.{name}.svg");
            (
                name.clone(),
                plot::latency(&path, title, &data).map(|()| true),
            )
        }
        PlotSpec::Timeline { name } => {
            let t: Vec<f64> = out.timeline.iter().map(|s| s.t_s).collect();
            let path = format!("{stem}.{name}.svg");
            let title = "connections, server memory and CPU, kernel memory over time";
            let panels = timeline_panels(&out.timeline);
            (
                name.clone(),
                plot::timeline(&path, title, &t, &panels).map(|()| !t.is_empty()),
            )
        }
        PlotSpec::Ladder {
            name,
            points,
            bound_ms,
        } => {
            let path = format!("{stem}.{name}.svg");
            let title = "ladder: time until the last member has the message";
            (
                name.clone(),
                plot::ladder(&path, title, points, *bound_ms).map(|()| !points.is_empty()),
            )
        }
    }
}

/// The timeline's charts: connections always; server RSS and CPU with `--server-pid`;
/// kernel slab and TCP buffer memory (system-wide) always.
fn timeline_panels(tl: &[driver::Sample]) -> Vec<plot::Panel> {
    use plotters::style::{BLUE, GREEN, MAGENTA, RED};
    let mib = |b: u64| b as f64 / 1048576.0;
    let mut panels = vec![plot::Panel {
        label: "open connections",
        values: tl.iter().map(|s| s.open as f64).collect(),
        color: BLUE,
    }];
    if let Some(rss) = tl
        .iter()
        .map(|s| s.server_rss_bytes)
        .collect::<Option<Vec<u64>>>()
    {
        panels.push(plot::Panel {
            label: "server RSS, all processes (MiB)",
            values: rss.into_iter().map(mib).collect(),
            color: RED,
        });
    }
    panels.push(plot::Panel {
        label: "kernel slab, whole box (MiB)",
        values: tl.iter().map(|s| mib(s.kernel_slab_bytes)).collect(),
        color: GREEN,
    });
    if let Some(cpu) = tl
        .iter()
        .map(|s| s.server_cpu_ns)
        .collect::<Option<Vec<u64>>>()
    {
        // CPU cores busy over the second before each sample: CPU time is counted in clock
        // ticks, so a 100 ms difference is mostly tick noise.
        let cores: Vec<f64> = (0..tl.len())
            .map(|i| {
                let j = i.saturating_sub(10);
                let dt = (tl[i].t_s - tl[j].t_s).max(1e-3);
                cpu[i].saturating_sub(cpu[j]) as f64 / 1e9 / dt
            })
            .collect();
        panels.push(plot::Panel {
            label: "server CPU (cores)",
            values: cores,
            color: MAGENTA,
        });
    }
    panels
}

/// `results/x.json` -> `results/x` (the prefix of the .hgrm and .svg files).
fn json_stem(p: &str) -> String {
    let path = PathBuf::from(p);
    match path.extension() {
        Some(e) if e == "json" => path.with_extension("").to_string_lossy().into_owned(),
        _ => p.to_string(),
    }
}

/// Connections open at once at the peak of the run.
fn max_connections(sc: &Scenario) -> u64 {
    match sc {
        Scenario::Connect(a) => a.conns,
        Scenario::Echo(a) => a.conns,
        Scenario::Broadcast(a) => a.subs,
        Scenario::Ladder(a) => a.steps.iter().copied().max().unwrap_or(0),
    }
}

fn make_plan(sc: &Scenario) -> Result<Plan, String> {
    validate(sc)?;
    let c = sc.common();
    let target = ws::parse_url(&c.url)?;
    let members_target = match sc {
        Scenario::Broadcast(a) => a.members_url.as_deref().map(ws::parse_url).transpose()?,
        _ => None,
    };
    let source_ips = match &c.source_ips {
        Some(spec) => srcip::parse(spec)?,
        None => Vec::new(),
    };
    if let Some(ip) = source_ips
        .iter()
        .find(|ip| ip.is_ipv4() != target.addr.is_ipv4())
    {
        return Err(format!(
            "--source-ips: {ip} is not of the same family as the target {}",
            target.addr
        ));
    }
    let procs = c.procs.max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = c.threads.unwrap_or_else(|| (cores / procs).max(1));
    if threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    let run_id = c.run_id.unwrap_or_else(|| {
        let x = util::Rng::seeded(u64::from(std::process::id())).next_u64() as u32;
        x.max(1)
    });
    let proc_index = c.child_index.unwrap_or(0);
    if proc_index >= procs {
        return Err("--child-index out of range".into());
    }
    let _ = util::raise_nofile_limit();
    Ok(Plan {
        target,
        members_target,
        source_ips: Arc::new(source_ips),
        procs,
        threads,
        workers: procs * threads,
        proc_index,
        run_id,
    })
}

fn validate(sc: &Scenario) -> Result<(), String> {
    let c = sc.common();
    if c.procs == 0 {
        return Err("--procs must be at least 1".into());
    }
    if c.procs > 256 {
        return Err("--procs is at most 256".into());
    }
    if !(c.rate.is_finite() && c.rate >= 0.0) {
        return Err("--rate must be >= 0".into());
    }
    let min = payload::header_len(c.style());
    let size_ok = |size: usize| -> Result<(), String> {
        if size < min {
            Err(format!(
                "--size must be at least {min} bytes{}",
                if c.text { " with --text" } else { "" }
            ))
        } else if size > 16 * 1024 * 1024 {
            Err("--size is at most 16 MiB".into())
        } else {
            Ok(())
        }
    };
    match sc {
        Scenario::Connect(a) => {
            if a.conns == 0 {
                return Err("--conns must be at least 1".into());
            }
        }
        Scenario::Echo(a) => {
            size_ok(a.size)?;
            if a.conns == 0 || a.inflight == 0 {
                return Err("--conns and --inflight must be at least 1".into());
            }
        }
        Scenario::Broadcast(a) => {
            size_ok(a.size)?;
            if a.subs == 0 || a.pubs == 0 || a.msgs == 0 {
                return Err("--subs, --pubs and --msgs must be at least 1".into());
            }
            if a.pubs > a.subs {
                return Err(
                    "--pubs cannot exceed --subs (the publishers are members of the room)".into(),
                );
            }
            if a.msgs > u64::from(u32::MAX) || a.pubs > u64::from(u32::MAX) {
                return Err("--msgs and --pubs must fit in 32 bits".into());
            }
            if !(a.msg_rate.is_finite() && a.msg_rate >= 0.0) {
                return Err("--msg-rate must be >= 0".into());
            }
            let workers = c.procs.max(1)
                * c.threads.unwrap_or_else(|| {
                    (std::thread::available_parallelism().map_or(1, |n| n.get()) / c.procs.max(1))
                        .max(1)
                });
            // Publisher p is local connection p / workers of worker p % workers.
            if let Some(p) = (0..a.pubs).find(|&p| {
                util::share(a.subs, (p % workers as u64) as usize, workers) <= p / workers as u64
            }) {
                return Err(format!(
                    "publisher {p} has no connection: with {workers} workers, --subs must be larger for --pubs {}",
                    a.pubs
                ));
            }
        }
        Scenario::Ladder(a) => {
            size_ok(a.size)?;
            if a.steps.is_empty() || a.steps[0] == 0 {
                return Err("--steps must list room sizes >= 1".into());
            }
            if a.steps.windows(2).any(|w| w[1] <= w[0]) {
                return Err("--steps must be strictly increasing".into());
            }
            if a.rounds == 0 || a.rounds > 64 {
                return Err("--rounds must be between 1 and 64".into());
            }
            if a.interval <= 0.0 {
                return Err("--interval must be > 0".into());
            }
        }
    }
    Ok(())
}

/// `--dry-run`: what would run, as key=value lines (read by scripts/bench.sh).
fn print_plan(sc: &Scenario, plan: &Plan) {
    let total = max_connections(sc);
    let (soft, hard) = util::raise_nofile_limit().unwrap_or((0, 0));
    let ports = util::local_port_range().map_or(0, |(lo, hi)| u64::from(hi - lo + 1));
    println!("scenario={}", sc.name());
    println!("target={}", plan.target.addr);
    println!("path={}", plan.target.path);
    println!("max_connections={total}");
    println!("procs={}", plan.procs);
    println!("threads_per_process={}", plan.threads);
    println!(
        "connections_per_process={}",
        total.div_ceil(plan.procs as u64)
    );
    println!(
        "fds_needed_per_process={}",
        total.div_ceil(plan.procs as u64) + FD_RESERVE
    );
    println!("nofile_soft={soft}");
    println!("nofile_hard={hard}");
    println!("source_addresses={}", plan.source_ips.len());
    println!(
        "connections_per_source_address={}",
        srcip::per_address(total, plan.source_ips.len())
    );
    println!("local_ports={ports}");
}

/// Refuse runs the fd limit or the port range cannot hold.
fn check_capacity(sc: &Scenario, plan: &Plan) -> Result<(), String> {
    let total = max_connections(sc);
    let (_, hard) = util::raise_nofile_limit().map_err(|e| format!("getrlimit: {e}"))?;
    let per_proc = total.div_ceil(plan.procs as u64);
    let fix = format!("scripts/tune.sh apply --role loadgen --connections {total}");
    if per_proc + FD_RESERVE > hard {
        let procs_needed = total.div_ceil(hard.saturating_sub(FD_RESERVE).max(1));
        return Err(format!(
            "{total} connections over {} process(es) = {per_proc} per process, but the fd limit \
             (RLIMIT_NOFILE hard) is {hard}. Use --procs {procs_needed} or more, or raise the limit: {fix}",
            plan.procs
        ));
    }
    if let Some((lo, hi)) = util::local_port_range() {
        let ports = u64::from(hi - lo + 1);
        let per_addr = srcip::per_address(total, plan.source_ips.len());
        if per_addr > ports {
            let addrs_needed = total.div_ceil(ports);
            return Err(format!(
                "{total} connections to one address:port need {per_addr} local ports per source \
                 address, but net.ipv4.ip_local_port_range ({lo}-{hi}) has {ports}. Spread them with \
                 --source-ips (at least {addrs_needed} addresses, e.g. 127.0.0.2-127.0.0.{}) or widen \
                 the range: {fix}",
                (addrs_needed + 1).min(254)
            ));
        }
    }
    Ok(())
}
