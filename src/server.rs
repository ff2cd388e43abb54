//! Starting and stopping the server: limits, listeners, workers, the admin endpoint, and the
//! ready file that tells scripts which ports were bound.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::config::Config;
use crate::limits;
use crate::metrics::Metrics;
use crate::room_index::RoomDirectory;
use crate::worker::{self, Shared, Worker};

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    addrs: Vec<SocketAddr>,
    /// Those of `addrs` that serve wss://.
    tls_addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
}

impl Server {
    /// Raises the fd limit, binds every listener, and starts the workers.
    pub fn start(config: Config) -> io::Result<Server> {
        let fd = limits::raise_nofile();
        let workers = config.workers;
        let auto_max = limits::default_max_connections(fd.soft, workers);
        let requested = config.max_connections.unwrap_or(auto_max);
        for w in limits::kernel_warnings(Path::new("/"), requested, config.backlog, fd, workers) {
            log::warn!("{w}");
        }
        // Past the fd limit accept(2) would fail with EMFILE; a clear 503 is better.
        let max_connections = requested.min(auto_max);
        if max_connections < requested {
            log::warn!(
                "--max-connections {requested} lowered to {max_connections} to fit RLIMIT_NOFILE {}",
                fd.soft
            );
        }

        // Certificate problems stop the start here, before any socket is taken or bound.
        let tls_config = match &config.tls {
            Some(files) => Some(
                crate::tls::load(files)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            ),
            None => None,
        };
        let mut inherited = match &config.takeover {
            Some(path) => crate::takeover::take(path)?,
            None => None,
        };
        let (listeners, addrs, tls_addrs) = match inherited.as_mut() {
            Some(i) => {
                let taken = std::mem::take(&mut i.listeners);
                log::info!(
                    "took over {} listening sockets from the running megasock",
                    taken.len()
                );
                let (l, addrs) = crate::listener::adopt(taken, workers, config.backlog)?;
                // The predecessor says which of its sockets served TLS; without TLS
                // configured here they serve plain, as configured.
                let said = i.tls_addrs.take();
                let tls: Vec<SocketAddr> = addrs
                    .iter()
                    .copied()
                    .filter(|&a| match &said {
                        _ if config.tls.is_none() => false,
                        Some(list) => list.contains(&a),
                        None => crate::tls::is_tls_addr(&config.tls_listen, a),
                    })
                    .collect();
                (l, addrs, tls)
            }
            None => {
                let (mut l, mut addrs) =
                    crate::listener::bind_all(&config.listen, workers, config.backlog)?;
                let (tls_l, tls) =
                    crate::listener::bind_all(&config.tls_listen, workers, config.backlog)?;
                for (mine, more) in l.iter_mut().zip(tls_l) {
                    mine.extend(more);
                }
                addrs.extend(&tls);
                (l, addrs, tls)
            }
        };
        let tls = tls_config.map(|t| crate::tls::Listeners {
            config: t.config,
            certs: t.certs,
            addrs: tls_addrs.clone(),
        });
        let listener_fds: Vec<std::os::fd::RawFd> = listeners
            .iter()
            .flatten()
            .map(std::os::fd::AsRawFd::as_raw_fd)
            .collect();
        let (polls, wakeups) = worker::polls(workers)?;
        let rooms = RoomDirectory::new(workers);
        let (changes_tx, changes_rx) = crossbeam_channel::unbounded();
        let bridge = crate::bridge::link(&config, changes_rx);
        if bridge.is_some() {
            rooms.observe(changes_tx);
        }
        let (bridge_link, bridge_parts) = match bridge {
            Some((l, p)) => (Some(Arc::new(l)), Some(p)),
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            max_connections,
            reject_headroom: (limits::fd_reserve(fd.soft, workers) / 2) as usize,
            sockets: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            admin_released: AtomicBool::new(false),
            failure: Mutex::new(None),
            started: std::time::Instant::now(),
            metrics: Metrics::new(workers),
            rooms,
            guards: crate::abuse::Guards::new(
                config.max_connections_per_ip,
                config.max_handshakes_per_ip,
            ),
            bridge: bridge_link,
            wakeups,
            tls,
            config,
        });

        let cores = if shared.config.pin {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        if shared.config.pin && cores.is_empty() {
            log::warn!("--pin: cannot read this process's CPU set; workers are not pinned");
        }
        let (buses, injector) = worker::buses(&shared);
        if let Some(parts) = bridge_parts {
            crate::bridge::start(parts, shared.clone(), injector.fork())?;
        }
        let inherited_admin = inherited.as_mut().and_then(|i| i.admin.take());
        let (metrics_addr, admin_fd) = match shared.config.admin {
            Some(a) => {
                let (addr, fd) = crate::admin::spawn(a, shared.clone(), injector, inherited_admin)?;
                (Some(addr), Some(fd))
            }
            None => (None, None),
        };
        let mut threads = Vec::with_capacity(workers);
        for (id, ((poll, lst), bus)) in polls.into_iter().zip(listeners).zip(buses).enumerate() {
            let w = Worker::new(id, poll, lst, bus, shared.clone())?;
            let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
            let worker_shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("megasock-w{id}"))
                .spawn(move || {
                    if let Some(c) = core {
                        if !core_affinity::set_for_current(c) {
                            log::warn!("worker {id}: could not pin to core {}", c.id);
                        }
                    }
                    // A worker that dies must not leave the process serving degraded: the
                    // others drain and the process exits non-zero (see `Server::join`).
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run()));
                    let cause = match outcome {
                        Ok(Ok(())) => return Ok(()),
                        Ok(Err(e)) => format!("event loop error: {e}"),
                        Err(panic) => format!("panicked: {}", panic_message(&panic)),
                    };
                    worker_shared.worker_failed(id, cause.clone());
                    Err(io::Error::other(cause))
                })?;
            threads.push(t);
        }

        log::info!(
            "megasock {} listening on {} | workers {}{} | max-connections {} | max-message-size {} B | \
             max-backpressure {} B ({:?}) | handshake {:?} ping {:?} idle {:?} drain {:?} | \
             RLIMIT_NOFILE {} (was {}, hard {}){}",
            env!("CARGO_PKG_VERSION"),
            addrs
                .iter()
                .map(|a| format!("{}://{a}", if tls_addrs.contains(a) { "wss" } else { "ws" }))
                .collect::<Vec<_>>()
                .join(", "),
            workers,
            if cores.is_empty() { "" } else { " pinned" },
            max_connections,
            shared.config.max_message_size,
            shared.config.max_backpressure,
            shared.config.slow_consumer,
            shared.config.handshake_timeout,
            shared.config.ping_interval,
            shared.config.idle_timeout,
            shared.config.drain_timeout,
            fd.soft,
            fd.soft_before,
            fd.hard,
            metrics_addr.map_or(String::new(), |a| format!(" | admin http://{a}/ (metrics, healthz, readyz, stats, publish)")),
        );
        let c = &shared.config;
        if let Some(gate) = &c.gate {
            log::info!("access: {}", gate.describe());
        }
        if c.max_connections_per_ip.is_some()
            || c.max_handshakes_per_ip.is_some()
            || c.message_rate.is_some()
        {
            let or_off = |v: Option<u32>| v.map_or("off".to_string(), |n| n.to_string());
            log::info!(
                "limits: max-connections-per-ip {} | max-handshakes-per-ip {} | \
                 max-message-rate {}",
                or_off(c.max_connections_per_ip),
                c.max_handshakes_per_ip
                    .map_or("off".to_string(), |n| format!("{n}/s")),
                c.message_rate.map_or("off".to_string(), |r| format!(
                    "{}/s, burst {}",
                    r.per_second(),
                    r.burst()
                )),
            );
        }
        // Our workers accept: the predecessor may drain, and we wait for our successor.
        if let Some(i) = inherited {
            i.release_predecessor()?;
        }
        if let Some(path) = shared.config.takeover.clone() {
            crate::takeover::serve(path, listener_fds, admin_fd, shared.clone())?;
        }
        let server = Server {
            shared,
            threads,
            addrs,
            tls_addrs,
            metrics_addr,
        };
        if let Some(path) = server.shared.config.ready_file.clone() {
            server.write_ready_file(&path)?;
        }
        Ok(server)
    }

    fn write_ready_file(&self, path: &Path) -> io::Result<()> {
        let mut text = format!("pid={}\n", std::process::id());
        for a in &self.addrs {
            let scheme = if self.tls_addrs.contains(a) {
                "wss"
            } else {
                "ws"
            };
            text.push_str(&format!("{scheme}={a}\n"));
        }
        if let Some(m) = self.metrics_addr {
            text.push_str(&format!("metrics={m}\nadmin={m}\n"));
        }
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    /// The WebSocket addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The addresses (of `local_addrs`) that serve wss://.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops accepting, closes every connection with 1001 and lets the workers exit.
    pub fn shutdown(&self) {
        self.shared.begin_shutdown();
    }

    /// Shared state, for callers that watch the metrics.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Waits for every worker to finish. An error if a worker failed (the others drained).
    pub fn join(self) -> io::Result<()> {
        for t in self.threads {
            let _ = t.join();
        }
        match self.shared.failed() {
            Some(cause) => Err(io::Error::other(cause)),
            None => Ok(()),
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into())
}
