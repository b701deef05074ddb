//! One planner and data-plane nodes (`fwgate serve --role …`) behind a real Mosquitto: how the
//! cluster tests start them and read their metrics.

use std::time::{Duration, Instant};

use super::mosquitto::Mosquitto;
use super::serve::Serve;

/// A value from a node's /metrics (0 when the series is not there yet).
pub async fn metric(admin: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{admin}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Waits (up to `secs`) until a metric reaches `at_least`.
pub async fn wait_metric(admin: &str, series: &str, at_least: f64, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = metric(admin, series).await;
        if v >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{admin}: {series} is {v}, not {at_least}, after {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub const BLOCKS: &str = "fwgate_blocks_served_total{transport=\"mqtt\"}";
pub const SUCCEEDED: &str = "fwgate_operations{state=\"succeeded\"}";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn broker_env(broker: &Mosquitto, id: &str, role: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FWGATE_MQTT__MODE", "external".into()),
        ("FWGATE_MQTT__BROKER_URL", broker.url()),
        ("FWGATE_MQTT__CLIENT_ID", id.into()),
        ("FWGATE_CLUSTER__ROLE", role.into()),
    ]
}

/// The planner, on a fixed admin port so a restart keeps its address.
pub async fn planner(dir: &std::path::Path, broker: &Mosquitto, admin_port: u16) -> Serve {
    planner_with(dir, broker, admin_port, &[]).await
}

/// The planner with more `FWGATE_*` overrides (a TUF repository, say).
pub async fn planner_with(
    dir: &std::path::Path,
    broker: &Mosquitto,
    admin_port: u16,
    extra: &[(&'static str, String)],
) -> Serve {
    let mut env = broker_env(broker, "planner", "planner");
    env.push(("FWGATE_ADMIN__LISTEN", format!("127.0.0.1:{admin_port}")));
    env.extend(extra.iter().cloned());
    let p = Serve::start_with(dir, &env).await;
    assert_eq!((p.mqtt, p.coap), (0, 0), "a planner serves no device");
    wait_metric(&p.admin, "fwgate_cluster_events_total{event=\"bus_subscribed\"}", 1.0, 20).await;
    p
}

pub async fn dataplane(dir: &std::path::Path, broker: &Mosquitto, id: &str, planner: &str) -> Serve {
    dataplane_wrapped(dir, broker, id, planner, &[]).await
}

/// A data-plane node run through `wrapper` (see [`Serve::start_wrapped`]).
pub async fn dataplane_wrapped(
    dir: &std::path::Path,
    broker: &Mosquitto,
    id: &str,
    planner: &str,
    wrapper: &[&str],
) -> Serve {
    let mut env = broker_env(broker, id, "dataplane");
    env.push(("FWGATE_CLUSTER__PLANNER_URL", planner.into()));
    env.push(("FWGATE_CLUSTER__PLANNER_TOKEN", "test-token".into()));
    env.push(("FWGATE_DFU__WAIT_POLL_SECS", "1".into()));
    let n = Serve::start_wrapped(dir, &env, wrapper).await;
    wait_metric(&n.admin, "fwgate_broker_events_total{event=\"subscribed\"}", 1.0, 20).await;
    wait_metric(&n.admin, "fwgate_cluster_events_total{event=\"bus_subscribed\"}", 1.0, 20).await;
    n
}

/// Waits until every view the planner has published reached the node: the planner has nothing
/// left to publish, and the node took at least as many views as were published.
pub async fn settled(planner: &str, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let published = metric(planner, "fwgate_cluster_events_total{event=\"view_published\"}").await
            + metric(planner, "fwgate_cluster_events_total{event=\"view_removed\"}").await;
        let taken = metric(node, "fwgate_cluster_events_total{event=\"view\"}").await
            + metric(node, "fwgate_cluster_events_total{event=\"view_removed\"}").await;
        if metric(planner, "fwgate_cluster_backlog").await == 0.0 && published > 0.0 && taken >= published {
            return;
        }
        assert!(Instant::now() < deadline, "the node took {taken} of {published} views in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
