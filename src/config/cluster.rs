//! `[cluster]`: which part of a fwgate cluster this node is (see `crate::cluster`).

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, MqttConfig, MqttMode};

/// What one `fwgate serve` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Planner and data plane in one process: a single node.
    #[default]
    All,
    /// Owns the store, the plans and the admin API; feeds data-plane nodes through the broker
    /// and serves no device itself.
    Planner,
    /// Answers devices' Statuses from what the planner publishes; keeps no store.
    Dataplane,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Planner => "planner",
            Role::Dataplane => "dataplane",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub role: Role,
    /// This node's name in `fwgate nodes` and in its topics (empty: the MQTT client id, else
    /// `node-` and a random suffix).
    pub node_id: String,
    /// Data-plane nodes: the planner's admin API (`http://planner:8080`), where images are
    /// fetched by digest.
    pub planner_url: String,
    /// Data-plane nodes: a token for the planner's admin API (its read token is enough).
    pub planner_token: String,
    /// Data-plane nodes: bytes of images kept in memory; least recently used go first.
    pub image_cache_bytes: u64,
    /// How often a data-plane node says it is alive (and how far behind it is).
    pub heartbeat_secs: u64,
    /// How often a data-plane node sends the planner the progress of transfers under way;
    /// transitions go at once.
    pub report_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            role: Role::All,
            node_id: String::new(),
            planner_url: String::new(),
            planner_token: String::new(),
            image_cache_bytes: 256 << 20,
            heartbeat_secs: 2,
            report_ms: 500,
        }
    }
}

impl ClusterConfig {
    pub(super) fn validate(&self, mqtt: &MqttConfig, max_image_bytes: u64) -> Result<(), ConfigError> {
        if !self.node_id.is_empty() && !crate::protocol::topic::valid_device_id(&self.node_id) {
            return Err(invalid("cluster.node_id", "letters, digits, - _ . : (as a device id)"));
        }
        if self.role == Role::All {
            return Ok(());
        }
        if !mqtt.enabled || mqtt.mode != MqttMode::External {
            return Err(invalid(
                "cluster.role",
                "planner and dataplane nodes talk through the fleet's broker: set mqtt.mode = \"external\"",
            ));
        }
        if self.heartbeat_secs == 0 || self.report_ms == 0 {
            return Err(invalid("cluster.heartbeat_secs", "heartbeat_secs and report_ms must be at least 1"));
        }
        if self.role == Role::Dataplane {
            let url = url::Url::parse(&self.planner_url).map_err(|e| {
                invalid("cluster.planner_url", format!("the planner's admin URL (http://host:port): {e}"))
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid("cluster.planner_url", "must be http:// or https:// with a host"));
            }
            if self.image_cache_bytes < max_image_bytes {
                return Err(invalid("cluster.image_cache_bytes", "must be at least firmware.max_image_bytes"));
            }
        }
        Ok(())
    }

    /// This node's name: configured, else the MQTT client id, else a random one.
    pub fn node(&self, mqtt: &MqttConfig) -> String {
        if !self.node_id.is_empty() {
            self.node_id.clone()
        } else if crate::protocol::topic::valid_device_id(&mqtt.client_id) {
            mqtt.client_id.clone()
        } else {
            format!("node-{:08x}", fastrand::u32(..))
        }
    }
}
