//! The `fwgate` command line. `serve` and `config check` run locally; every operator command
//! is an HTTP call to the admin API (`--server`, `FWGATE_SERVER`; token from `--token`,
//! `FWGATE_TOKEN`, or the gateway's generated `<data_dir>/admin.token`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::fleet::DeviceSpec;

mod actions;
mod devices;
mod images;
mod load;
mod nodes;
mod rollouts;
mod sim;
mod snapshots;
mod tags;
mod tuf;
mod waves;

pub use devices::{read_devices_csv, DevicesCommand};
pub use images::ImagesCommand;
pub use rollouts::RolloutsCommand;
pub use waves::WavesCommand;

const DEFAULT_CONFIG: &str = "config/fwgate.toml";

#[derive(Parser)]
#[command(name = "fwgate", version, about = "Firmware-update gateway for large device fleets")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Remote {
    /// Admin API address.
    #[arg(long, env = "FWGATE_SERVER", default_value = "http://127.0.0.1:8080", global = true)]
    pub server: String,
    /// Admin bearer token (default: read <data_dir>/admin.token of --config).
    #[arg(long, env = "FWGATE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Config file, used to find the generated admin token.
    #[arg(long, env = "FWGATE_CONFIG", default_value = DEFAULT_CONFIG, global = true)]
    pub config: PathBuf,
    /// Print the server's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway: MQTT broker, admin API, planner.
    Serve {
        #[arg(long, env = "FWGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Once every listener is up, write the addresses they are bound to as JSON
        /// (`{"admin", "mqtt", "mqtt_tls", "coap"}`) to this file: how a script that starts the
        /// gateway on port 0 learns its ports.
        #[arg(long)]
        ports_file: Option<PathBuf>,
        /// What this node does (overrides `cluster.role`): `all` (one node), `planner` (the
        /// store, plans and admin API; feeds data-plane nodes through the broker) or
        /// `dataplane` (answers devices from what the planner publishes).
        #[arg(long, value_enum)]
        role: Option<crate::config::Role>,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Firmware images.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Devices and their assignments.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Foundries-style waves: promote a version to the devices of a tag, in rollouts, then
    /// to all of them.
    Waves {
        #[command(subcommand)]
        command: WavesCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// hawkBit-style rollouts: the devices a filter matches, in groups that start one after
    /// another while their success condition holds; too many failures pause the rollout.
    Rollouts {
        #[command(subcommand)]
        command: RolloutsCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// FAS-style firmware actions over devices with several targets: filter → plan → execute
    /// (a dry run unless the action says otherwise).
    Actions {
        #[command(subcommand)]
        command: actions::ActionsCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// FAS snapshots: what every target runs, to restore later.
    Snapshots {
        #[command(subcommand)]
        command: snapshots::SnapshotsCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Tags: which version a tag's devices get by default, and from which wave.
    Tags {
        #[command(subcommand)]
        command: tags::TagsCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// TUF: refresh the gateway's repositories, or run a standalone TUF client.
    Tuf {
        #[command(subcommand)]
        command: tuf::TufCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// A planner's data-plane nodes: when each was last heard from, its share of the
    /// traffic, and how far behind the planner's changes it is.
    Nodes {
        #[command(flatten)]
        remote: Remote,
    },
    /// Simulate devices against a running gateway and report how fast and how correctly they
    /// update (MQTT, CoAP DFU or CoAP Block2).
    Load(Box<load::LoadArgs>),
    /// Run the planner's deterministic simulator: seeded operators, devices and crashes
    /// against the real store and plans, invariants checked after every step. Runs locally.
    Sim(sim::SimArgs),
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file (with FWGATE_* overrides applied); reports the first invalid key.
    Check {
        #[arg(long, env = "FWGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    fn new(remote: &Remote) -> Client {
        let token = remote.token.clone().or_else(|| {
            let dir = crate::load_config(&remote.config)
                .map(|c| c.store.data_dir)
                .unwrap_or_else(|_| PathBuf::from("./data"));
            std::fs::read_to_string(dir.join("admin.token")).ok().map(|t| t.trim().to_owned())
        });
        Client { http: reqwest::Client::new(), base: remote.server.trim_end_matches('/').to_owned(), token }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.with_context(|| format!("cannot reach the gateway at {}", self.base))?;
        let status = resp.status();
        let body = resp.text().await?;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        if !status.is_success() {
            let msg = v.get("error").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| v.to_string());
            if status == reqwest::StatusCode::UNAUTHORIZED {
                bail!("{msg} (set FWGATE_TOKEN or --token; the gateway writes one to <data_dir>/admin.token)");
            }
            bail!("{msg} (HTTP {status})");
        }
        Ok(v)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// A field of the server's JSON for a table: `-` when absent, control characters escaped.
fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(x)) => crate::shown(x).into_owned(),
        Some(x) => x.to_string(),
    }
}

fn ago(v: &Value) -> String {
    match v.as_u64() {
        None => "never".into(),
        Some(t) => format!("{} s ago", crate::now_secs().saturating_sub(t)),
    }
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

async fn tuf_remote(cmd: tuf::TufCommand, remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    match cmd {
        tuf::TufCommand::Refresh { repo } => {
            let repos = match repo {
                Some(r) => vec![r],
                None => {
                    let v = c.send(c.http.get(c.url("/api/v1/tuf"))).await?;
                    v["repositories"].as_array().into_iter().flatten().map(|r| s(r, "repo")).collect()
                }
            };
            if repos.is_empty() {
                bail!("the gateway has no TUF repository configured ([tuf] in its config)");
            }
            for r in repos {
                let v = c.send(c.http.post(c.url(&format!("/api/v1/tuf/{r}/refresh")))).await?;
                if remote.json {
                    println!("{v:#}");
                } else {
                    println!(
                        "{r}: verified — root v{}, timestamp v{}, snapshot v{}, targets v{}; {} targets",
                        n(&v, "root_version"),
                        n(&v, "timestamp_version"),
                        n(&v, "snapshot_version"),
                        n(&v, "targets_version"),
                        v["targets"].as_array().map_or(0, Vec::len)
                    );
                }
            }
        }
        tuf::TufCommand::Status => {
            let v = c.send(c.http.get(c.url("/api/v1/tuf"))).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            for r in v["repositories"].as_array().into_iter().flatten() {
                let ver = &r["verified"];
                if ver.is_null() {
                    println!("{}: not verified (see the gateway log; `fwgate tuf refresh`)", s(r, "repo"));
                    continue;
                }
                println!(
                    "{}: targets v{}, expires in {} s",
                    s(r, "repo"),
                    n(ver, "targets_version"),
                    n(ver, "expires").saturating_sub(crate::now_secs())
                );
                for t in ver["targets"].as_array().into_iter().flatten() {
                    let tags = t["tags"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    println!("  {:<32} {:>10} {}  tags {}", s(t, "name"), n(t, "length"), &s(t, "sha256")[..16], tags);
                }
            }
        }
        tuf::TufCommand::Client(args) => tuf::client_command(args).await?,
    }
    Ok(())
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

/// Raises the open-file limit to its hard maximum: every device connection is a socket, and
/// the default soft limit (often 1024) would cap a gateway or a load run far below its
/// configured size.
pub fn raise_fd_limit() {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            if soft < hard {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            }
        }
    }
}

async fn serve(path: &Path, ports_file: Option<&Path>, role: Option<crate::config::Role>) -> Result<()> {
    let config = match role {
        None => crate::load_config(path),
        Some(r) => {
            let env = std::env::vars().chain([("FWGATE_CLUSTER__ROLE".to_owned(), r.as_str().to_owned())]);
            crate::config::Config::load(path, env)
        }
    }
    .with_context(|| format!("config {}", path.display()))?;
    init_logging(&config.log.level);
    raise_fd_limit();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        stop.cancel();
    });
    if config.cluster.role == crate::config::Role::Dataplane {
        let node = crate::cluster::node::start(config, shutdown).await?;
        tracing::info!(admin = %node.admin, node = %node.node, "fwgate data-plane node ready");
        if let Some(file) = ports_file {
            let ports = serde_json::json!({"admin": node.admin, "node": node.node});
            write_json(&ports, file).with_context(|| format!("--ports-file {}", file.display()))?;
        }
        node.wait().await;
        return Ok(());
    }
    let gateway = crate::start(config, shutdown.clone()).await?;
    tracing::info!(admin = %gateway.admin, "fwgate ready");
    if let Some(file) = ports_file {
        write_ports(&gateway, file).with_context(|| format!("--ports-file {}", file.display()))?;
    }
    gateway.wait().await;
    Ok(())
}

/// Writes where the gateway listens, atomically (a reader sees the whole file or none).
fn write_ports(gateway: &crate::Gateway, file: &Path) -> Result<()> {
    let ports = serde_json::json!({
        "admin": gateway.admin,
        "mqtt": gateway.mqtt.map(|m| m.tcp),
        "mqtt_tls": gateway.mqtt.and_then(|m| m.tls),
        "coap": gateway.coap,
        "coap_dtls": gateway.coap_dtls,
    });
    write_json(&ports, file)
}

/// Writes JSON to a file atomically (a reader sees the whole file or none).
fn write_json(value: &Value, file: &Path) -> Result<()> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}

/// Runs the command line; the binary's `main` is this.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config, ports_file, role } => serve(&config, ports_file.as_deref(), role).await,
        Command::Nodes { remote } => nodes::nodes(&remote).await,
        Command::Config { command: ConfigCommand::Check { config } } => {
            crate::load_config(&config).with_context(|| config.display().to_string())?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Images { command, remote } => images::images(command, &remote).await,
        Command::Devices { command, remote } => devices::devices(command, &remote).await,
        Command::Waves { command, remote } => waves::waves(command, &remote).await,
        Command::Rollouts { command, remote } => rollouts::rollouts(command, &remote).await,
        Command::Actions { command, remote } => actions::actions(command, &remote).await,
        Command::Snapshots { command, remote } => snapshots::snapshots(command, &remote).await,
        Command::Tags { command, remote } => tags::tags(command, &remote).await,
        Command::Tuf { command, remote } => tuf_remote(command, &remote).await,
        Command::Load(args) => load::load(*args).await,
        Command::Sim(args) => sim::sim(args),
    }
}
