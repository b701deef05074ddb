//! Configuration: `config/fwgate.toml`, overridden key by key by `FWGATE_<SECTION>__<KEY>`
//! environment variables, validated once at start-up into a typed error naming the key.
//!
//! Every bound the gateway enforces lives here, with its default and meaning documented in
//! `config/fwgate.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;

mod cluster;
pub use cluster::{ClusterConfig, Role};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid toml: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_owned(), message: message.into() }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub store: StoreConfig,
    pub firmware: FirmwareConfig,
    pub dfu: DfuConfig,
    pub mqtt: MqttConfig,
    pub coap: CoapConfig,
    pub admin: AdminConfig,
    pub fleet: FleetConfig,
    pub tuf: TufConfig,
    pub rollouts: RolloutsConfig,
    pub actions: ActionsConfig,
    pub cluster: ClusterConfig,
    pub log: LogConfig,
}

/// hawkBit-style rollouts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutsConfig {
    /// A new rollout waits for `rollouts approve` (or `deny`) before it may start.
    pub approval_required: bool,
}

/// FAS-style actions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionsConfig {
    /// A dry run is deleted this long after it was made; 0 keeps dry runs until deleted.
    pub dry_run_keep_secs: u64,
}

impl Default for ActionsConfig {
    fn default() -> Self {
        ActionsConfig { dry_run_keep_secs: crate::planner::actions::DRY_RUN_KEEP_SECS }
    }
}

/// The TUF repositories whose targets production and CI devices may receive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TufConfig {
    /// The production repository's trusted root.json; empty: none (production devices then
    /// receive nothing).
    pub production_root: PathBuf,
    pub production_metadata_url: String,
    pub production_targets_url: String,
    /// The CI repository's trusted root.json; empty: CI devices take any uploaded image.
    pub ci_root: PathBuf,
    pub ci_metadata_url: String,
    pub ci_targets_url: String,
    /// How often both repositories are refreshed.
    pub refresh_secs: u64,
    /// Serve an image older than the version a device runs.
    pub allow_downgrade: bool,
    /// Each HTTP fetch from a repository must connect, and finish, within this.
    pub fetch_timeout_secs: u64,
}

impl Default for TufConfig {
    fn default() -> Self {
        TufConfig {
            production_root: PathBuf::new(),
            production_metadata_url: String::new(),
            production_targets_url: String::new(),
            ci_root: PathBuf::new(),
            ci_metadata_url: String::new(),
            ci_targets_url: String::new(),
            refresh_secs: 300,
            allow_downgrade: false,
            fetch_timeout_secs: 30,
        }
    }
}

impl TufConfig {
    pub fn production(&self) -> crate::tuf::RepoConfig {
        crate::tuf::RepoConfig {
            root: self.production_root.clone(),
            metadata_url: self.production_metadata_url.clone(),
            targets_url: self.production_targets_url.clone(),
        }
    }

    pub fn ci(&self) -> crate::tuf::RepoConfig {
        crate::tuf::RepoConfig {
            root: self.ci_root.clone(),
            metadata_url: self.ci_metadata_url.clone(),
            targets_url: self.ci_targets_url.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub sync_writes: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { data_dir: PathBuf::from("./data"), sync_writes: false }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirmwareConfig {
    pub max_image_bytes: u64,
    pub hot_cache_bytes: u64,
    pub chunk_bytes: u32,
}

impl Default for FirmwareConfig {
    fn default() -> Self {
        FirmwareConfig { max_image_bytes: 64 << 20, hot_cache_bytes: 256 << 20, chunk_bytes: 64 << 10 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DfuConfig {
    pub max_block_size: u32,
    pub default_mtu: u32,
    pub max_window: u32,
    pub sync_poll_secs: u32,
    pub wait_poll_secs: u32,
    pub op_timeout_secs: u64,
    pub timeout_sweep_secs: u64,
}

impl Default for DfuConfig {
    fn default() -> Self {
        DfuConfig {
            max_block_size: 4096,
            default_mtu: 512,
            max_window: 8,
            sync_poll_secs: 300,
            wait_poll_secs: 30,
            op_timeout_secs: 3600,
            timeout_sweep_secs: 10,
        }
    }
}

impl DfuConfig {
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            max_block: self.max_block_size,
            default_mtu: self.default_mtu.min(self.max_block_size),
            max_window: self.max_window,
            sync_poll: self.sync_poll_secs,
            wait_poll: self.wait_poll_secs,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// MQTT over TLS; empty: none.
    pub tls_listen: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// CA of device certificates; empty: devices show none.
    pub tls_client_ca: PathBuf,
    pub max_connections: usize,
    pub max_payload_bytes: usize,
    pub connection_timeout_ms: u16,
    pub write_timeout_ms: u64,
    pub max_inflight: usize,
    pub auth: bool,
    pub device_secret: String,
    /// Benchmarking aid: answer `echo/{id}/ping` with a payload of the asked size on
    /// `echo/{id}/pong`, without any DFU logic.
    pub echo: bool,
    /// fwgate's own listener, or a client of the fleet's broker.
    pub mode: MqttMode,
    /// External mode: `mqtt://host:port` or `mqtts://host:port`.
    pub broker_url: String,
    /// External mode: this node's client id at the broker (empty: `fwgate-` and a random
    /// suffix); each node needs its own.
    pub client_id: String,
    pub username: String,
    pub password: String,
    /// External mode over `mqtts://`: the CA (PEM) the broker's certificate must chain to
    /// (empty: the system's roots), and this node's certificate and key (PEM), if the broker
    /// asks for one.
    pub broker_ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// External mode: the shared-subscription group every node of one fleet joins, so each
    /// Status reaches exactly one of them.
    pub share_group: String,
    /// External mode: put in front of every DFU topic, for brokers that namespace tenants
    /// (`tenant-a/` makes `tenant-a/dfu/{id}/status`).
    pub topic_prefix: String,
}

/// Where devices' MQTT traffic arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttMode {
    /// fwgate's own DFU-native listener.
    Embedded,
    /// fwgate is an MQTT 5 client of an existing broker.
    External,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            tls_listen: String::new(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_client_ca: PathBuf::new(),
            max_connections: 20_000,
            max_payload_bytes: 0,
            connection_timeout_ms: 5000,
            write_timeout_ms: 10_000,
            max_inflight: 100,
            auth: false,
            device_secret: String::new(),
            echo: false,
            mode: MqttMode::Embedded,
            broker_url: "mqtt://127.0.0.1:1883".into(),
            client_id: String::new(),
            username: String::new(),
            password: String::new(),
            broker_ca: PathBuf::new(),
            client_cert: PathBuf::new(),
            client_key: PathBuf::new(),
            share_group: "fwgate".into(),
            topic_prefix: String::new(),
        }
    }
}

/// Room for a Command's CBOR framing (op, version, offset, size) around a block.
const COMMAND_OVERHEAD: usize = 1024;

impl MqttConfig {
    /// The largest MQTT payload accepted: explicit, or derived from the block size so that a
    /// WRITE always fits and nothing much larger is ever buffered.
    pub fn payload_limit(&self, dfu: &DfuConfig) -> usize {
        if self.max_payload_bytes > 0 {
            self.max_payload_bytes
        } else {
            dfu.max_block_size as usize + COMMAND_OVERHEAD
        }
    }

    pub fn tls_listen(&self) -> Option<SocketAddr> {
        self.tls_listen.parse().ok()
    }

    /// External mode: the broker's host and port, and whether it speaks TLS.
    pub fn broker(&self) -> Result<(String, u16, bool), ConfigError> {
        let bad = |why: &str| invalid("mqtt.broker_url", format!("{:?}: {why}", self.broker_url));
        let url = url::Url::parse(&self.broker_url).map_err(|e| bad(&e.to_string()))?;
        let tls = match url.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            _ => return Err(bad("the scheme must be mqtt:// or mqtts://")),
        };
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("names no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if !url.path().trim_matches('/').is_empty() || url.query().is_some() {
            return Err(bad("only a scheme, host and port (put credentials in mqtt.username/password)"));
        }
        Ok((host, url.port().unwrap_or(if tls { 8883 } else { 1883 }), tls))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoapConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub max_block_size: u32,
    pub max_request_bytes: usize,
    pub dedup_per_peer: usize,
    pub dedup_lifetime_secs: u64,
    pub max_peers: usize,
    /// Kernel receive and send buffer asked for the UDP socket (capped by net.core.rmem_max
    /// and wmem_max).
    pub socket_buffer_bytes: usize,
    /// CoAP over DTLS 1.2 with pre-shared keys (5684 is the convention); empty: off. The PSK
    /// identity is the device id, the key its token (`fwgate devices token ID`).
    pub dtls_listen: String,
    /// Devices must prove who they are: `/dfu` and `/fw` only over DTLS, for the session's own
    /// device. Unset: on whenever `mqtt.auth` is.
    pub auth: Option<bool>,
    /// With auth on, serve `/dfu` and `/fw` on the plain listener anyway (any client can then
    /// act as any device).
    pub plain: bool,
    /// How long an address that answered an Echo challenge may get answers larger than 3× its
    /// request (RFC 9175 §2.4).
    pub echo_lifetime_secs: u64,
    /// DTLS sessions (established or in handshake) kept at once; a new peer beyond is dropped.
    pub dtls_max_sessions: usize,
    /// Of those, handshakes in progress at once.
    pub dtls_max_handshakes: usize,
    pub dtls_handshake_timeout_secs: u64,
    /// A session that carried nothing for this long is forgotten (the device handshakes again).
    pub dtls_idle_secs: u64,
}

impl CoapConfig {
    pub fn dtls_listen(&self) -> Option<SocketAddr> {
        self.dtls_listen.parse().ok()
    }

    /// Whether devices must authenticate, given `mqtt.auth`.
    pub fn auth(&self, mqtt_auth: bool) -> bool {
        self.auth.unwrap_or(mqtt_auth)
    }
}

impl Default for CoapConfig {
    fn default() -> Self {
        CoapConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 5683)),
            max_block_size: 1024,
            max_request_bytes: 1024,
            dedup_per_peer: 4,
            dedup_lifetime_secs: 247,
            max_peers: 10_000,
            socket_buffer_bytes: 4 << 20,
            dtls_listen: String::new(),
            auth: None,
            plain: false,
            echo_lifetime_secs: 600,
            dtls_max_sessions: 20_000,
            dtls_max_handshakes: 1_000,
            dtls_handshake_timeout_secs: 10,
            dtls_idle_secs: 600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Empty: a token is generated once into `<data_dir>/admin.token`.
    pub token: String,
    /// A token that may read (`GET` under `/api/v1`) but change nothing; empty: none.
    pub read_token: String,
    /// Names the API answers to in the Host header (DNS-rebinding defence); any other gets
    /// 421. Empty: the listen address, `localhost`, `127.0.0.1` and `::1`.
    pub allowed_hosts: Vec<String>,
    pub list_limit: usize,
    pub max_request_bytes: usize,
}

impl AdminConfig {
    /// The Host names accepted, lower-case, without ports.
    pub fn hosts(&self) -> Vec<String> {
        if !self.allowed_hosts.is_empty() {
            return self.allowed_hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        }
        let mut hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "[::1]".to_owned()];
        let ip = match self.listen.ip() {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        if !hosts.contains(&ip) {
            hosts.push(ip);
        }
        hosts
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: String::new(),
            read_token: String::new(),
            allowed_hosts: Vec::new(),
            list_limit: 1000,
            max_request_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    pub max_devices: usize,
    pub last_seen_flush_secs: u64,
    /// A device that sent a Status within this many seconds counts as online.
    pub online_secs: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig { max_devices: 1_000_000, last_seen_flush_secs: 5, online_secs: 900 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into() }
    }
}

/// Environment variables that configure the CLI, not the gateway.
const CLI_VARS: &[&str] = &["FWGATE_SERVER", "FWGATE_TOKEN", "FWGATE_CONFIG"];

impl Config {
    /// Reads `path`, applies `FWGATE_*` overrides from `env`, and validates.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::from_toml(&text, path, env)
    }

    pub fn from_toml(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut tree: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax { path: path.into(), message: e.message().to_owned() })?;
        // Which keys are strings: an override of one stays a string even when it reads as a
        // number or boolean (a password `12345`, a token `true`).
        let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
        for (var, value) in env {
            apply_env(&mut tree, &defaults, &var, &value)?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(tree)).map_err(|e| {
            let key = e.path().to_string();
            invalid(&key, e.into_inner().message().to_owned())
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.dfu;
        if !(16..=crate::protocol::MAX_DATA_LEN as u32).contains(&d.max_block_size) {
            return Err(invalid("dfu.max_block_size", format!("must be 16..={}", crate::protocol::MAX_DATA_LEN)));
        }
        if d.default_mtu == 0 {
            return Err(invalid("dfu.default_mtu", "must be at least 1"));
        }
        if !(1..=64).contains(&d.max_window) {
            return Err(invalid("dfu.max_window", "must be 1..=64"));
        }
        if d.op_timeout_secs == 0 || d.timeout_sweep_secs == 0 {
            return Err(invalid("dfu.op_timeout_secs", "timeouts must be at least 1 second"));
        }
        let f = &self.firmware;
        if f.max_image_bytes == 0 || f.max_image_bytes > u32::MAX as u64 {
            return Err(invalid("firmware.max_image_bytes", "must be 1..=4294967295 (offsets are 32-bit)"));
        }
        if f.hot_cache_bytes < f.max_image_bytes {
            return Err(invalid("firmware.hot_cache_bytes", "must be at least firmware.max_image_bytes"));
        }
        if f.chunk_bytes < 1024 {
            return Err(invalid("firmware.chunk_bytes", "must be at least 1024"));
        }
        let m = &self.mqtt;
        if m.enabled {
            if m.max_connections == 0 {
                return Err(invalid("mqtt.max_connections", "must be at least 1"));
            }
            if m.max_payload_bytes != 0 && m.max_payload_bytes < d.max_block_size as usize + COMMAND_OVERHEAD {
                return Err(invalid(
                    "mqtt.max_payload_bytes",
                    "must fit a WRITE of dfu.max_block_size (or be 0 to derive)",
                ));
            }
            if !m.tls_listen.is_empty() {
                if m.tls_listen().is_none() {
                    return Err(invalid("mqtt.tls_listen", "must be an address like 0.0.0.0:8883, or empty"));
                }
                if m.tls_cert.as_os_str().is_empty() || m.tls_key.as_os_str().is_empty() {
                    return Err(invalid(
                        "mqtt.tls_cert",
                        "mqtt.tls_cert and mqtt.tls_key are needed with mqtt.tls_listen",
                    ));
                }
            } else if !m.tls_client_ca.as_os_str().is_empty() {
                return Err(invalid("mqtt.tls_client_ca", "device certificates need mqtt.tls_listen"));
            }
            if m.write_timeout_ms == 0 {
                return Err(invalid("mqtt.write_timeout_ms", "must be at least 1"));
            }
            if m.max_inflight == 0 || m.max_inflight > u16::MAX as usize {
                return Err(invalid("mqtt.max_inflight", "must be between 1 and 65535"));
            }
            if m.auth && m.device_secret.len() < 16 {
                return Err(invalid("mqtt.device_secret", "must be at least 16 characters when mqtt.auth = true"));
            }
            if m.mode == MqttMode::External {
                let (_, _, tls) = m.broker()?;
                let plain = |s: &str| !s.is_empty() && !s.bytes().any(|b| b"/+#".contains(&b) || b.is_ascii_control());
                if !plain(&m.share_group) {
                    return Err(invalid("mqtt.share_group", "must be a non-empty name without / + or #"));
                }
                if m.topic_prefix.bytes().any(|b| b"+#".contains(&b)) || m.topic_prefix.starts_with('$') {
                    return Err(invalid("mqtt.topic_prefix", "may not hold a wildcard (+ #) or start with $"));
                }
                if m.client_id.len() > 64 || m.client_id.bytes().any(|b| b.is_ascii_control()) {
                    return Err(invalid("mqtt.client_id", "at most 64 printable characters"));
                }
                let tls_files = [&m.broker_ca, &m.client_cert, &m.client_key];
                if !tls && tls_files.iter().any(|f| !f.as_os_str().is_empty()) {
                    return Err(invalid("mqtt.broker_ca", "TLS files need an mqtts:// broker_url"));
                }
                if m.client_cert.as_os_str().is_empty() != m.client_key.as_os_str().is_empty() {
                    return Err(invalid("mqtt.client_cert", "mqtt.client_cert and mqtt.client_key go together"));
                }
            }
        }
        self.cluster.validate(m, f.max_image_bytes)?;
        let c = &self.coap;
        if c.enabled {
            if !(16..=1024).contains(&c.max_block_size) || !c.max_block_size.is_power_of_two() {
                return Err(invalid("coap.max_block_size", "must be a power of two from 16 to 1024 (RFC 7959)"));
            }
            if !(64..=60_000).contains(&c.max_request_bytes) {
                return Err(invalid("coap.max_request_bytes", "must be 64..=60000"));
            }
            if c.dedup_per_peer == 0 || c.max_peers == 0 || c.dedup_lifetime_secs == 0 {
                return Err(invalid(
                    "coap.dedup_per_peer",
                    "dedup_per_peer, max_peers and dedup_lifetime_secs must be at least 1",
                ));
            }
            if !(4096..=1 << 30).contains(&c.socket_buffer_bytes) {
                return Err(invalid("coap.socket_buffer_bytes", "must be 4096..=1073741824"));
            }
            if !c.dtls_listen.is_empty() {
                if c.dtls_listen().is_none() {
                    return Err(invalid("coap.dtls_listen", "must be an address like 0.0.0.0:5684, or empty"));
                }
                if self.mqtt.device_secret.len() < 16 {
                    return Err(invalid(
                        "coap.dtls_listen",
                        "needs mqtt.device_secret (at least 16 characters): device tokens are the DTLS keys",
                    ));
                }
            }
            if c.echo_lifetime_secs == 0 {
                return Err(invalid("coap.echo_lifetime_secs", "must be at least 1"));
            }
            if c.dtls_max_sessions == 0 || c.dtls_max_handshakes == 0 {
                return Err(invalid(
                    "coap.dtls_max_sessions",
                    "dtls_max_sessions and dtls_max_handshakes must be at least 1",
                ));
            }
            if c.dtls_handshake_timeout_secs == 0 || c.dtls_idle_secs == 0 {
                return Err(invalid(
                    "coap.dtls_idle_secs",
                    "dtls_idle_secs and dtls_handshake_timeout_secs must be at least 1",
                ));
            }
        }
        let a = &self.admin;
        if !a.read_token.is_empty() && (a.read_token.len() < 16 || a.read_token == a.token) {
            return Err(invalid("admin.read_token", "must be at least 16 characters and differ from admin.token"));
        }
        if let Some(h) = a
            .allowed_hosts
            .iter()
            .find(|h| h.is_empty() || h.contains(['/', ' ', '@']) || (!h.starts_with('[') && h.contains(':')))
        {
            return Err(invalid(
                "admin.allowed_hosts",
                format!("{h:?} is not a host name or address (no scheme, path or port)"),
            ));
        }
        if self.fleet.max_devices == 0 {
            return Err(invalid("fleet.max_devices", "must be at least 1"));
        }
        for (name, repo) in [("production", self.tuf.production()), ("ci", self.tuf.ci())] {
            for (what, url) in [("metadata_url", &repo.metadata_url), ("targets_url", &repo.targets_url)] {
                if repo.configured() && url.is_empty() {
                    return Err(invalid(
                        &format!("tuf.{name}_{what}"),
                        format!("needed because tuf.{name}_root is set (file:///dir/ or http://host/dir/)"),
                    ));
                }
            }
        }
        if self.tuf.fetch_timeout_secs == 0 {
            return Err(invalid("tuf.fetch_timeout_secs", "must be at least 1"));
        }
        if self.tuf.refresh_secs == 0 {
            return Err(invalid("tuf.refresh_secs", "must be at least 1"));
        }
        if self.fleet.online_secs == 0 {
            return Err(invalid("fleet.online_secs", "must be at least 1"));
        }
        if self.admin.max_request_bytes < 1024 {
            return Err(invalid("admin.max_request_bytes", "must be at least 1024"));
        }
        if self.admin.list_limit == 0 {
            return Err(invalid("admin.list_limit", "must be at least 1"));
        }
        if self.log.level.parse::<tracing_subscriber::EnvFilter>().is_err() {
            return Err(invalid("log.level", "not a tracing filter such as info or fwgate=debug"));
        }
        Ok(())
    }
}

/// `FWGATE_MQTT__LISTEN=0.0.0.0:1883` sets `mqtt.listen`. The value is read as a TOML value
/// when it parses as one (numbers, booleans), else as a string — and always as a string for
/// a key whose default is one.
fn apply_env(tree: &mut toml::Table, defaults: &toml::Table, var: &str, value: &str) -> Result<(), ConfigError> {
    let Some(rest) = var.strip_prefix("FWGATE_") else { return Ok(()) };
    if CLI_VARS.contains(&var) || !rest.contains("__") {
        return Ok(());
    }
    let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    let env_err = |message: &str| ConfigError::Env { var: var.to_owned(), message: message.to_owned() };
    if path.len() != 2 || path.iter().any(String::is_empty) {
        return Err(env_err("expected FWGATE_<SECTION>__<KEY>"));
    }
    let string_key = defaults.get(&path[0]).and_then(|s| s.get(&path[1])).is_some_and(toml::Value::is_str);
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !string_key || v.is_str())
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let section = tree
        .entry(path[0].clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| env_err("the section is not a table"))?;
    section.insert(path[1].clone(), parsed);
    Ok(())
}

#[cfg(test)]
mod tests;
