//! fwgate — a firmware-update gateway for large device fleets.
//!
//! # Layout
//! Arrows point down this list, never up (DESIGN.md §1):
//! - [`protocol`]: DFU wire types and codecs (both CBOR forms), topic grammar. Pure.
//! - [`engine`]: the DFU session step — (Status, operation, image) → commands. Pure; time
//!   is a parameter.
//! - [`store`]: RocksDB column families and write batches; the only module naming `rocksdb`.
//! - [`firmware`]: image ingest, chunked storage, the byte-bounded hot-image cache.
//! - [`fleet`]: the device registry, device credentials, and the compact index rollouts
//!   select from.
//! - [`planner`]: the per-device operation queue (assignments, outcome accounting,
//!   time-outs) and the plans that feed it: Foundries-style [`planner::waves`],
//!   hawkBit-style [`planner::rollouts`] and FAS-style [`planner::actions`], which the queue
//!   tells of every outcome.
//! - [`tuf`]: the production and CI TUF repositories (fwgate's own client workflow, on
//!   `tough`'s key schema), and which images are admissible for which class of device.
//! - [`transport`]: the MQTT (fwgate's own listener) and CoAP (UDP) shells around one shared DFU
//!   exchange.
//! - [`cluster`]: scale-out behind the fleet's broker — a planner publishing each device's
//!   view and applying data-plane nodes' reports, and a node's replica of those views, which
//!   its transports' DFU step runs against.
//! - [`admin`]: the axum admin API and its OpenAPI document, `/metrics`, probes.
//! - [`cli`]: the `fwgate` command line; operator commands are HTTP calls to `admin`.
//! - [`loadgen`]: simulated devices (DFU device logic, a CoAP client) for tests, load runs and
//!   benchmarks; it knows the gateway only through the wire.
//! - [`sim`]: the deterministic simulator of the planner — seeded, a simulated clock, crashes
//!   between any two writes — and the invariants it checks after every step.
//! - [`config`], [`telemetry`]: configuration and metrics, used by all of the above.
//!
//! [`start`] runs a gateway until its shutdown token is cancelled; `fwgate serve` and the
//! integration tests both use it.

#![deny(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod firmware;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod loadgen;
pub mod planner;
pub mod protocol;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod tuf;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, MqttMode, Role};
use crate::firmware::Firmware;
use crate::fleet::Fleet;
use crate::planner::rollouts::Rollouts;
use crate::planner::waves::Waves;
use crate::planner::Planner;
use crate::store::Store;
use crate::telemetry::Telemetry;
use crate::transport::mqtt::MqttListeners;
use crate::transport::Dfu;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data dir {path}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot open the store in {path} (is another fwgate using it?)")]
    Store { path: std::path::PathBuf, source: store::StoreError },
    #[error("loading state: {0}")]
    Load(String),
    #[error("admin token file {path}")]
    Token { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot bind admin listener {addr}")]
    AdminBind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error(transparent)]
    Dtls(#[from] transport::coap::DtlsError),
}

/// Text from outside (a device's id or version, a name, an error from the server) made safe
/// for a terminal: control characters are written as escapes (`\x1b`), never sent to it.
pub fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !c.is_control() => out.push(c),
            c if (c as u32) < 0x100 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    out.into()
}

/// Seconds since the Unix epoch: the one place the gateway reads the wall clock.
pub fn now_secs() -> u64 {
    now_millis() / 1000
}

/// A moment an operator wrote: Unix seconds, or an RFC 3339 time (`2026-12-24T06:00:00Z`).
/// `None` when it is neither.
pub fn parse_moment(text: &str) -> Option<i64> {
    let text = text.trim();
    text.parse::<i64>().ok().or_else(|| text.parse::<jiff::Timestamp>().ok().map(|t| t.as_second()))
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A running gateway: where it listens, and handles on its parts.
pub struct Gateway {
    pub admin: SocketAddr,
    pub mqtt: Option<MqttListeners>,
    pub coap: Option<SocketAddr>,
    pub coap_dtls: Option<SocketAddr>,
    pub admin_token: String,
    pub telemetry: Arc<Telemetry>,
    pub fleet: Arc<Fleet>,
    pub planner: Arc<Planner>,
    pub waves: Arc<Waves>,
    pub rollouts: Arc<Rollouts>,
    pub actions: Arc<planner::actions::Actions>,
    pub firmware: Arc<Firmware>,
    pub dfu: Arc<Dfu>,
    store: Store,
    tasks: JoinSet<()>,
    /// The plans' worker threads (rollouts, actions), joined on shutdown.
    workers: Vec<std::thread::JoinHandle<()>>,
    shutdown: CancellationToken,
}

/// The admin token: configured, or generated once into `<data_dir>/admin.token` (mode 0600).
fn admin_token(config: &Config) -> Result<String, StartError> {
    if !config.admin.token.is_empty() {
        return Ok(config.admin.token.clone());
    }
    let path = config.store.data_dir.join("admin.token");
    let err = |source| StartError::Token { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut raw = [0u8; 24];
    use std::io::Read;
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw)).map_err(err)?;
    let token = hex::encode(raw);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    use std::io::Write;
    opts.open(&path).and_then(|mut f| f.write_all(token.as_bytes())).map_err(err)?;
    info!(path = %path.display(), "generated the admin token");
    Ok(token)
}

/// Opens the store and starts every listener and background task. Returns once all of them
/// accept work; the gateway runs until `shutdown` is cancelled, then [`Gateway::wait`] ends.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Gateway, StartError> {
    let dir = &config.store.data_dir;
    std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir { path: dir.clone(), source })?;
    let store = Store::open(&dir.join("db"), config.store.sync_writes)
        .map_err(|source| StartError::Store { path: dir.clone(), source })?;
    let now = now_secs();
    let load = |e: &dyn std::fmt::Display| StartError::Load(e.to_string());
    let firmware = Arc::new(Firmware::open(store.clone(), config.firmware.clone()).map_err(|e| load(&e))?);
    let fleet = Arc::new(Fleet::open(store.clone(), config.fleet.max_devices).map_err(|e| load(&e))?);
    let trust = Arc::new(
        tuf::Trust::new(&config.tuf.production(), &config.tuf.ci(), dir)
            .with_fetch_timeout(Duration::from_secs(config.tuf.fetch_timeout_secs)),
    );
    // A repository that does not verify now leaves its devices without admissible images
    // until it does; the gateway still starts.
    refresh_tuf(&trust).await;
    let planner = Arc::new(
        Planner::open(store.clone(), fleet.clone(), firmware.clone(), config.dfu.op_timeout_secs, now)
            .map_err(|e| load(&e))?
            .with_trust(trust.clone(), config.tuf.allow_downgrade),
    );
    let waves = Arc::new(
        planner::waves::Waves::open(
            store.clone(),
            fleet.clone(),
            firmware.clone(),
            planner.clone(),
            config.fleet.online_secs,
            now,
        )
        .map_err(|e| load(&e))?,
    );
    let rollouts = Arc::new(
        Rollouts::open(
            store.clone(),
            fleet.clone(),
            firmware.clone(),
            planner.clone(),
            config.rollouts.approval_required,
            now,
        )
        .map_err(|e| load(&e))?,
    );
    let actions = Arc::new(
        planner::actions::Actions::open(store.clone(), fleet.clone(), firmware.clone(), planner.clone(), now)
            .map_err(|e| load(&e))?
            .keep_dry_runs(config.actions.dry_run_keep_secs),
    );
    // Tombstones of deletions older than a week (the cluster feed clears their views).
    fleet.prune_tombstones(now).map_err(|e| load(&e))?;
    // Registrations a crash cut short between the registry write and the plans' reaction.
    let finished = planner::finish_registrations(&fleet, &waves, Some(&rollouts), now).map_err(|e| load(&e))?;
    if finished > 0 {
        info!(registrations = finished, "finished registrations a crash interrupted");
    }
    // Outcomes are handled as they arrive, on each plan's own thread; they end with `shutdown`.
    let workers = vec![rollouts.spawn(shutdown.clone()), actions.spawn(shutdown.clone())];
    info!(
        data_dir = %dir.display(),
        images = firmware.list().len(),
        devices = fleet.len(),
        "store opened"
    );
    let telemetry = Arc::new(Telemetry::new());
    let role = config.cluster.role;
    let nodes = (role == Role::Planner).then(|| Arc::new(cluster::feed::Nodes::default()));
    let dfu = Arc::new(Dfu::new(planner.clone(), fleet.clone(), config.dfu.engine(), telemetry.clone()));
    let token = admin_token(&config)?;
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();

    let listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| StartError::AdminBind { addr: config.admin.listen, source })?;
    let admin = listener.local_addr().map_err(|source| StartError::AdminBind { addr: config.admin.listen, source })?;
    let state = admin::AppState {
        fleet: fleet.clone(),
        firmware: firmware.clone(),
        planner: planner.clone(),
        waves: waves.clone(),
        rollouts: rollouts.clone(),
        actions: actions.clone(),
        telemetry: telemetry.clone(),
        token: token.clone().into(),
        read_token: (!config.admin.read_token.is_empty()).then(|| config.admin.read_token.clone().into()),
        allowed_hosts: config.admin.hosts().into(),
        list_limit: config.admin.list_limit,
        max_image_bytes: config.firmware.max_image_bytes as usize,
        max_request_bytes: config.admin.max_request_bytes,
        ready: ready.clone(),
        device_secret: config.mqtt.auth.then(|| config.mqtt.device_secret.clone().into()),
        nodes: nodes.clone(),
    };
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let serve = axum::serve(listener, admin::app(state)).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serve.await {
            error!(error = %e, "admin listener failed");
        }
    });
    info!(%admin, "admin http listening");

    // A planner serves no device: its data-plane nodes do, from the views it publishes.
    let serves_devices = role == Role::All;
    if let Some(nodes) = &nodes {
        let changes = Arc::new(fleet::changes::Changes::default());
        fleet.report_changes(changes.clone());
        planner.report_changes(changes.clone());
        let node = config.cluster.node(&config.mqtt);
        let mut opts = transport::external::options(&config.mqtt, 1 << 20)?;
        opts.set_client_id(format!("{node}-planner"));
        let topics = cluster::ClusterTopics::new(&config.mqtt.topic_prefix);
        let (p, f, n, tel) = (planner.clone(), fleet.clone(), nodes.clone(), telemetry.clone());
        tasks.spawn(cluster::feed::run(opts, topics, p, f, changes, n, tel, shutdown.clone()));
        info!(node, "planner: feeding data-plane nodes through the broker");
    }
    let mqtt = match config.mqtt.mode {
        _ if !serves_devices => None,
        MqttMode::Embedded if config.mqtt.enabled => {
            let (dfu, fleet, tel, stop) = (dfu.clone(), fleet.clone(), telemetry.clone(), shutdown.clone());
            Some(transport::mqtt::start(&config.mqtt, &config.dfu, dfu, fleet, tel, stop, &mut tasks).await?)
        }
        MqttMode::External if config.mqtt.enabled => {
            let opts = transport::external::options(&config.mqtt, config.mqtt.payload_limit(&config.dfu))?;
            let topics = transport::external::Topics::new(&config.mqtt);
            let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
            let (dfu, tel, stop) = (dfu.clone(), telemetry.clone(), shutdown.clone());
            tasks.spawn(transport::external::run(opts, topics, dfu, tel, workers, stop));
            None
        }
        _ => None,
    };

    let coap_gateway = || transport::coap::Gateway {
        dfu: dfu.clone(),
        planner: planner.clone(),
        telemetry: telemetry.clone(),
        max_block: config.coap.max_block_size,
    };
    let coap = if config.coap.enabled && serves_devices {
        let (socket, addr) = transport::coap::bind(&config.coap).await?;
        let access = transport::coap::plain_access(&config.coap, config.mqtt.auth);
        if access == transport::coap::exchange::Access::Open {
            let why = if config.coap.plain { "coap.plain = true" } else { "coap.auth is off" };
            warn!(%addr, why, "coap: /dfu and /fw are served in the clear without authentication: any client can act as any device");
        }
        tasks.spawn(transport::coap::serve(socket, config.coap.clone(), access, coap_gateway(), shutdown.clone()));
        Some(addr)
    } else {
        None
    };
    let coap_dtls = match config.coap.dtls_listen().filter(|_| config.coap.enabled && serves_devices) {
        Some(listen) => {
            let secret: Arc<str> = config.mqtt.device_secret.clone().into();
            let l = transport::coap::bind_dtls(&config.coap, listen, fleet.clone(), secret).await?;
            let addr = l.addr;
            tasks.spawn(transport::coap::serve_dtls(l, config.coap.clone(), coap_gateway(), shutdown.clone()));
            Some(addr)
        }
        None => None,
    };

    let p = planner.clone();
    every(&mut tasks, &shutdown, config.dfu.timeout_sweep_secs, "timeout sweep", move || {
        let n = p.sweep_timeouts(now_secs())?;
        if n > 0 {
            warn!(operations = n, "operations timed out");
        }
        Ok(())
    });
    let f = fleet.clone();
    every(&mut tasks, &shutdown, config.fleet.last_seen_flush_secs, "last-seen flush", move || {
        f.flush_last_seen().map(drop).map_err(Into::into)
    });

    if !trust.configured().is_empty() {
        let (trust, stop, secs) = (trust.clone(), shutdown.clone(), config.tuf.refresh_secs);
        let waves = waves.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(secs));
            tick.tick().await; // the first tick is now: just refreshed above
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                refresh_tuf(&trust).await;
                // Complete waves reach devices that joined while their image was not admissible.
                let w = waves.clone();
                match tokio::task::spawn_blocking(move || w.after_refresh(now_secs())).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => info!(devices = n, "complete waves staged devices they had not reached"),
                    Ok(Err(e)) => error!(error = %e, "staging for complete waves failed"),
                    Err(e) => error!(error = %e, "staging for complete waves panicked"),
                }
            }
        });
    }

    ready.store(true, Ordering::Relaxed);
    Ok(Gateway {
        admin,
        mqtt,
        coap,
        coap_dtls,
        admin_token: token,
        telemetry,
        fleet,
        planner,
        waves,
        rollouts,
        actions,
        firmware,
        dfu,
        store,
        tasks,
        workers,
        shutdown,
    })
}

/// Refreshes every configured TUF repository. A failure is logged and changes nothing: the
/// last verified targets stay admissible until their metadata expires.
async fn refresh_tuf(trust: &tuf::Trust) {
    for repo in trust.configured() {
        match trust.refresh(repo).await {
            Ok(v) => {
                info!(repo, targets = v.targets.len(), targets_version = v.targets_version, "TUF repository verified")
            }
            Err(e) => error!(repo, error = %e, "TUF repository does not verify"),
        }
    }
}

/// Runs blocking `work` on tokio's blocking pool every `secs` seconds until `stop`.
fn every<F>(tasks: &mut JoinSet<()>, stop: &CancellationToken, secs: u64, what: &'static str, work: F)
where
    F: Fn() -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + Sync + 'static,
{
    let (stop, work) = (stop.clone(), Arc::new(work));
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(secs.max(1)));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let work = work.clone();
            match tokio::task::spawn_blocking(move || work()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "{what} failed"),
                Err(e) => error!(error = %e, "{what} panicked"),
            }
        }
    });
}

impl Gateway {
    /// Waits for shutdown, then stops background work and flushes the store.
    pub async fn wait(mut self) {
        self.shutdown.cancelled().await;
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain).await.is_err() {
            warn!("background tasks did not stop within 10 s");
        }
        // The plans' workers notice the shutdown within their poll interval.
        for worker in std::mem::take(&mut self.workers) {
            if !matches!(tokio::task::spawn_blocking(move || worker.join()).await, Ok(Ok(()))) {
                error!("a plan's worker panicked");
            }
        }
        if let Err(e) = self.fleet.flush_last_seen() {
            error!(error = %e, "final last-seen flush failed");
        }
        if let Err(e) = self.store.flush() {
            error!(error = %e, "final store flush failed");
        }
        info!("stopped");
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Loads a config file with the process's environment applied.
pub fn load_config(path: &Path) -> Result<Config, config::ConfigError> {
    Config::load(path, std::env::vars())
}
