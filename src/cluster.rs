//! Scale-out behind the fleet's broker: one planner, any number of data-plane nodes, and the
//! broker as the only bus between them (`cluster.role`).
//!
//! The planner is the one writer: it owns the store, the plans and the admin API, and serves
//! no device. For each registered device it publishes a *view* — every component's answer,
//! as its own DFU step would compute it, without the image's bytes — as a retained message on
//! `{prefix}fwgate/view/{device}` whenever the device's operations or registration change
//! ([`feed`]). A data-plane node subscribes to all views (retained: a node that starts or
//! reconnects catches up at once), answers the Statuses the shared subscription gives it
//! from them with the same DFU step as a single node, fetches each image by digest from the
//! planner's admin API into a bounded cache on first use, and reports what devices did on
//! `{prefix}fwgate/report/{node}` ([`replica`], [`node`]). Reports only ever move an
//! operation forward and a node repeats what the planner has not confirmed in a view, so a
//! report lost, repeated or late (a broker or planner restart) changes nothing twice.
//! Nodes say they are alive, with how far behind they are, on `{prefix}fwgate/node/{node}`.

pub mod feed;
pub mod node;
pub mod replica;

use serde::{Deserialize, Serialize};

use crate::engine::OpState;
use crate::firmware::ImageMeta;
use crate::planner::Lookup;
use crate::protocol::topic::valid_device_id;

/// The cluster's topics under the deployment's prefix.
#[derive(Debug, Clone)]
pub struct ClusterTopics {
    prefix: String,
}

impl ClusterTopics {
    pub fn new(prefix: &str) -> ClusterTopics {
        ClusterTopics { prefix: prefix.to_owned() }
    }

    pub fn view(&self, device: &str) -> String {
        format!("{}fwgate/view/{device}", self.prefix)
    }

    pub fn views(&self) -> String {
        format!("{}fwgate/view/+", self.prefix)
    }

    pub fn report(&self, node: &str) -> String {
        format!("{}fwgate/report/{node}", self.prefix)
    }

    pub fn reports(&self) -> String {
        format!("{}fwgate/report/+", self.prefix)
    }

    pub fn node(&self, node: &str) -> String {
        format!("{}fwgate/node/{node}", self.prefix)
    }

    pub fn nodes(&self) -> String {
        format!("{}fwgate/node/+", self.prefix)
    }

    /// The last level of one of this prefix's `fwgate/{kind}/…` topics.
    pub fn name<'a>(&self, kind: &str, topic: &'a [u8]) -> Option<&'a str> {
        let t = std::str::from_utf8(topic).ok()?.strip_prefix(self.prefix.as_str())?.strip_prefix("fwgate/")?;
        let name = t.strip_prefix(kind)?.strip_prefix('/')?;
        valid_device_id(name).then_some(name)
    }
}

/// The `cluster_events` name of an event of a cluster connection (see
/// [`crate::transport::external::drive`]).
fn bus_event(event: &'static str) -> &'static str {
    match event {
        "connected" => "bus_connected",
        "subscribed" => "bus_subscribed",
        "subscribe_refused" => "bus_subscribe_refused",
        "disconnected" => "bus_disconnected",
        _ => "bus_connection_failed",
    }
}

/// A device's view: what each of its components gets now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// When the change this view carries was made on the planner (ms since the epoch).
    pub at_ms: u64,
    pub components: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub component: String,
    #[serde(flatten)]
    pub answer: Answer,
}

/// [`Lookup`] without bytes, as it travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Answer {
    Nothing,
    Wait {
        poll: Option<u32>,
    },
    Held {
        why: String,
    },
    Refused {
        why: String,
    },
    Active {
        seq: u64,
        state: OpState,
        image: ImageMeta,
        resume: bool,
        /// Bytes of another image were the last served to the component.
        #[serde(default)]
        foreign: bool,
        version: String,
        /// Unix seconds from which TUF admits nothing for the device's class (the verified
        /// metadata expires): from then the node answers WAIT, whether or not it hears from
        /// the planner.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trusted_until: Option<u64>,
        /// Downgrades are refused: a pending operation to a version below what the device
        /// reports is not started by the node (WAIT until the planner's view refuses it).
        #[serde(default)]
        no_downgrade: bool,
    },
}

impl Answer {
    /// Adds the trust facts of [`Planner::trust_facts`] to an active answer.
    pub fn with_trust(mut self, facts: (Option<u64>, bool)) -> Answer {
        if let Answer::Active { trusted_until, no_downgrade, .. } = &mut self {
            (*trusted_until, *no_downgrade) = facts;
        }
        self
    }
}

impl From<Lookup<()>> for Answer {
    fn from(l: Lookup<()>) -> Answer {
        match l {
            Lookup::Nothing => Answer::Nothing,
            Lookup::Wait(poll) => Answer::Wait { poll },
            Lookup::Held(why) => Answer::Held { why },
            Lookup::Refused(why) => Answer::Refused { why },
            Lookup::Active(a) => Answer::Active {
                seq: a.seq,
                state: a.state,
                image: (*a.meta).clone(),
                resume: a.resume,
                foreign: a.foreign,
                version: a.version,
                trusted_until: None,
                no_downgrade: false,
            },
        }
    }
}

/// What a node saw a device do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Report {
    /// Operation `seq` reached `to` (or only got further, `progress`).
    Step {
        device: String,
        seq: u64,
        to: Option<OpState>,
        progress: Option<u32>,
        served: Option<String>,
        reported: Option<String>,
        at: u64,
    },
    /// The device sent a Status running `version` on `component`.
    Seen { device: String, component: String, version: String, at: u64 },
}

/// One message of reports from a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reports {
    pub node: String,
    pub reports: Vec<Report>,
}

/// A node's heartbeat (retained; its last will says it is gone).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Heartbeat {
    pub node: String,
    pub role: String,
    /// Unix ms of this heartbeat and of the node's start.
    pub at_ms: u64,
    pub started_ms: u64,
    /// How many times the node's bus connection was made: a new value tells the planner the
    /// node reconnected and may have missed the clearing of deleted devices' views.
    #[serde(default)]
    pub connections: u64,
    /// The node went away (its last will, or a clean stop).
    pub gone: bool,
    /// Devices whose views the node holds.
    pub views: u64,
    pub statuses: u64,
    pub blocks: u64,
    /// The planner's time of the newest change the node holds.
    pub newest_change_ms: u64,
    /// From a change on the planner to the node holding it, over the node's life (ms).
    pub delay_p50_ms: u64,
    pub delay_p99_ms: u64,
    pub delay_samples: u64,
    pub images_cached: u64,
    pub cache_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_only_their_own_kind_under_the_prefix() {
        let t = ClusterTopics::new("t/");
        assert_eq!(t.view("d1"), "t/fwgate/view/d1");
        assert_eq!(t.name("view", b"t/fwgate/view/d1"), Some("d1"));
        assert_eq!(t.name("report", b"t/fwgate/view/d1"), None);
        assert_eq!(t.name("view", b"fwgate/view/d1"), None);
        assert_eq!(t.name("view", b"t/fwgate/view/a/b"), None);
        assert_eq!(t.name("view", b"t/fwgate/view/"), None);
    }

    #[test]
    fn views_travel_as_json_and_come_back_equal() {
        let v = View {
            at_ms: 5,
            components: vec![
                Entry { component: "main".into(), answer: Answer::Wait { poll: Some(3) } },
                Entry { component: "bmc".into(), answer: Answer::Refused { why: "downgrade".into() } },
            ],
        };
        let text = serde_json::to_vec(&v).unwrap();
        assert_eq!(serde_json::from_slice::<View>(&text).unwrap(), v);
        assert!(serde_json::from_slice::<View>(br#"{"at_ms":1,"components":[{"component":"m","kind":"x"}]}"#).is_err());
    }
}
