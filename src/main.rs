//! The `megasock` command: `serve` (the default) runs the server.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use megasock::config::LogFormat;
use megasock::{ServeArgs, Server};

#[derive(Parser)]
#[command(
    name = "megasock",
    version,
    about = "A thread-per-core WebSocket server: /echo and /ws/{room} broadcast rooms",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default when no command is given).
    Serve(Box<ServeArgs>),
    /// Print the memory, fds and kernel settings N connections need on this machine, and
    /// whether it fits (exit status 1 if not).
    Plan(megasock::plan::PlanArgs),
}

/// Logging to stderr, filtered by `RUST_LOG` (default `info`): one line per event for people,
/// or one JSON object per line for collectors. Per-connection events are logged at debug
/// only; nothing is logged per message.
fn init_logging(format: LogFormat) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if format == LogFormat::Json {
        b.format(|buf, record| {
            use std::io::Write as _;
            let line = serde_json::json!({
                "ts": buf.timestamp_millis().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    b.init();
}

fn main() -> ExitCode {
    // A panic in a worker is caught by its thread, which drains the other workers and makes
    // the process exit non-zero (server.rs). Any other thread's panic ends the process now.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let worker = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("megasock-w"));
        if !worker {
            std::process::exit(101);
        }
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line that names the option; clap's full text adds a blank line and a hint.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "megasock: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    let args = match cli.command {
        Some(Command::Serve(a)) => *a,
        Some(Command::Plan(p)) => {
            init_logging(LogFormat::Human);
            let (text, fits) = megasock::plan::report(&p, std::path::Path::new("/"));
            print!("{text}");
            return if fits {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
        }
        None => cli.serve,
    };
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("megasock: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = args.merge_config_file()?.resolve()?;
    init_logging(config.log_format);
    let server = Server::start(config)?;
    let shared = server.shared().clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::Builder::new()
        .name("megasock-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen == 1 {
                    log::info!(
                        "signal {sig}: draining (close 1001 to every client, up to {:?}); send again to exit now",
                        shared.config.drain_timeout
                    );
                    shared.begin_shutdown();
                } else {
                    log::warn!("second signal: exiting without draining");
                    std::process::exit(130);
                }
            }
        })?;
    server.join()?;
    log::info!("drained; exiting");
    Ok(())
}
