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
    systemd_notify(&format!("READY=1\nMAINPID={}\n", std::process::id()));
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGUSR1,
    ])?;
    std::thread::Builder::new()
        .name("megasock-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGHUP {
                    reload(&shared);
                    continue;
                }
                if sig == signal_hook::consts::SIGUSR1 {
                    reload_certificate(&shared, "SIGUSR1");
                    continue;
                }
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

/// SIGHUP: first the TLS certificate and key are read again (new handshakes present the new
/// certificate; open connections keep theirs; bad files leave the current one in use). Then,
/// with `--takeover`, a new megasock starts (the same binary and arguments, so an upgraded
/// binary and a changed config file take effect) and takes over the listening sockets; this
/// process then drains and exits. Without `--takeover` there is no way to hand over without
/// refusing connects, so only the certificate is reloaded.
fn reload(shared: &megasock::worker::Shared) {
    let config = &shared.config;
    reload_certificate(shared, "SIGHUP");
    let Some(path) = &config.takeover else {
        if shared.tls.is_none() {
            log::warn!(
                "SIGHUP: restarting needs --takeover PATH (a Unix socket path, e.g. \
                 /run/megasock/takeover.sock); ignored"
            );
        }
        return;
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return log::error!("SIGHUP: cannot find this binary to restart it: {e}"),
    };
    match std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .stdin(std::process::Stdio::null())
        .spawn()
    {
        Ok(mut child) => {
            log::info!(
                "SIGHUP: started {} (pid {}); it takes over through {} and this process drains",
                exe.display(),
                child.id(),
                path.display()
            );
            // Reap it if it fails before taking over (this process then keeps serving).
            let _ = std::thread::Builder::new()
                .name("megasock-reload".into())
                .spawn(move || {
                    if let Ok(status) = child.wait() {
                        if !status.success() {
                            log::error!(
                                "SIGHUP: the new process exited with {status}; still serving"
                            );
                        }
                    }
                });
        }
        Err(e) => log::error!("SIGHUP: cannot start {}: {e}; still serving", exe.display()),
    }
}

/// Reads `--tls-cert` and `--tls-key` again (SIGHUP, and SIGUSR1 which does only this, so a
/// renewal never restarts a `--takeover` process): new handshakes present the new certificate,
/// open connections keep theirs, and bad files leave the current one in use.
fn reload_certificate(shared: &megasock::worker::Shared, signal: &str) {
    let Some(tls) = &shared.tls else {
        if signal == "SIGUSR1" {
            log::warn!("SIGUSR1 reloads the TLS certificate; there is none (--tls-cert); ignored");
        }
        return;
    };
    match tls.certs.reload() {
        Ok(what) => log::info!(
            "{signal}: TLS certificate reloaded: {what}; new handshakes use it, open \
             connections are untouched"
        ),
        Err(e) => log::error!("{signal}: {e}; still serving the previous certificate"),
    }
}

/// Tells systemd (Type=notify) about this process: READY=1 once serving, and MAINPID so that
/// after a SIGHUP reload the new process becomes the service's main process.
fn systemd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a)),
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        log::warn!("cannot notify systemd at {}: {e}", path.to_string_lossy());
    }
}
