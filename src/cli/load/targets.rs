//! `fwgate load --targets`: the images, devices and FAS action a multi-target run drives,
//! all through the admin API as an operator would make them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::super::Client;
use crate::loadgen::run::{Expected, Ready};
use crate::loadgen::targets::TargetPlan;

/// The inventory every simulated xname has, and every load image is made for.
const DEVICE_TYPE: &str = "load";
const MANUFACTURER: &str = "fwgate";
const MODEL: &str = "sim";

/// At most this many targets per device.
const MAX_TARGETS: usize = 16;

/// `NAME[=RUNNING]` items: each target's name and the version it runs first.
pub fn parse(items: &[String]) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in items {
        let (name, running) = item.split_once('=').unwrap_or((item, "1.0.0"));
        let (name, running) = (name.trim(), running.trim());
        if !crate::planner::valid_name(name) {
            bail!("--targets: {name:?} is not a target name (1 to 64 letters, digits and -_.)");
        }
        if running.is_empty() {
            bail!("--targets: {name}= names no running version");
        }
        if out.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            bail!("--targets: {name} is named twice");
        }
        out.push((name.to_owned(), running.to_owned()));
    }
    if out.len() > MAX_TARGETS {
        bail!("--targets: at most {MAX_TARGETS} targets per device");
    }
    Ok(out)
}

/// Uploads one image per target (seeded bytes, so a rerun makes the same ones; versioned
/// `MAJOR.0.0-<sha256 prefix>`, MAJOR above every first version and at least 2) with a FAS
/// identity tagged for these images, and registers the devices with the matching inventory in
/// a group of their own (named for the tag, the prefix and the count, so an action over it
/// touches this run's devices only). Returns each target's plan, the tag and the group.
pub async fn register(
    c: &Client,
    ids: &[String],
    targets: &[(String, String)],
    len: usize,
    seed: u64,
) -> Result<(Vec<TargetPlan>, String, String)> {
    // Newer than every first version, or the gateway would refuse a downgrade.
    let major = targets.iter().filter_map(|(_, r)| crate::firmware::version_order(r)).map(|v| v.major + 1).max();
    let major = major.unwrap_or(0).max(2);
    let mut plans = Vec::new();
    let mut images = Vec::new();
    for (k, (name, running)) in targets.iter().enumerate() {
        let mut rng = fastrand::Rng::with_seed(seed ^ (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let sha256 = hex::encode(Sha256::digest(&data));
        let version = format!("{major}.0.0-{}", &sha256[..12]);
        let expected = Expected { version, sha256, length: data.len() as u64 };
        images.push((format!("load-{}", name.to_ascii_lowercase()), data));
        plans.push(TargetPlan { name: name.clone(), running: running.clone(), expected });
    }
    // The tag names this set of images: a later run with other images never picks these.
    let versions: Vec<&str> = plans.iter().map(|p| p.expected.version.as_str()).collect();
    let tag = format!("load-{}", &hex::encode(Sha256::digest(versions.join(",")))[..8]);
    let prefix = ids.first().map_or("", |id| id.trim_end_matches(|c: char| c.is_ascii_digit()));
    let group = format!("{tag}-{}", &hex::encode(Sha256::digest(format!("{prefix}\0{}", ids.len())))[..6]);
    for ((image, data), p) in images.into_iter().zip(&plans) {
        let version = p.expected.version.as_str();
        let q = [("name", image.as_str()), ("version", version)];
        c.send(c.http.post(c.url("/api/v1/images")).query(&q).body(data))
            .await
            .with_context(|| format!("uploading {image}@{version}"))?;
        let identity = json!({"deviceType": DEVICE_TYPE, "manufacturer": MANUFACTURER, "models": [MODEL],
            "target": p.name, "tags": [tag], "firmwareVersion": version, "semanticFirmwareVersion": format!("{major}.0.0")});
        c.send(c.http.put(c.url(&format!("/api/v1/images/{image}/{version}/identity"))).json(&identity))
            .await
            .with_context(|| format!("setting the identity of {image}@{version}"))?;
    }
    for chunk in ids.chunks(5000) {
        let inventory = json!({"deviceType": DEVICE_TYPE, "manufacturer": MANUFACTURER, "model": MODEL});
        let specs: Vec<Value> =
            chunk.iter().map(|id| json!({"id": id, "groups": [group], "inventory": inventory})).collect();
        c.send(c.http.post(c.url("/api/v1/devices")).json(&specs)).await.context("registering devices")?;
    }
    Ok((plans, tag, group))
}

/// The step the load run takes once every device has reported: one live FAS action over the
/// run's group and targets, to the images tagged for it. Its id goes into `slot`.
pub fn start_action(
    c: &Client,
    (tag, group): (&str, &str),
    targets: &[TargetPlan],
    devices: usize,
    slot: Arc<Mutex<Option<String>>>,
) -> Ready {
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let body = json!({
        "stateComponentFilter": {"groups": [group]},
        "targetFilter": {"targets": names},
        "command": {"version": "latest", "tag": tag, "overrideDryrun": true,
            // The simulated devices' first versions have no images to go back to.
            "restoreNotPossibleOverride": true,
            "description": format!("fwgate load: {devices} devices × {} targets", names.len())},
    });
    let c = c.clone();
    Box::new(move || {
        Box::pin(async move {
            let started = Instant::now();
            let a = c
                .send(c.http.post(c.url("/api/v1/actions")).json(&body))
                .await
                .map_err(|e| format!("starting the action: {e:#}"))?;
            let took = started.elapsed();
            let id = a["actionID"].as_str().unwrap_or_default().to_owned();
            let counts = a["operationCounts"].as_object().cloned().unwrap_or_default();
            let planned = counts.get("total").and_then(Value::as_u64).unwrap_or(0);
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(id.clone());
            let counts: Vec<String> = counts
                .iter()
                .filter(|(k, n)| *k != "total" && n.as_u64() != Some(0))
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            Ok(format!(
                "action {id} ({}): {planned} operations planned in {:.0} ms — {}",
                a["state"].as_str().unwrap_or("?"),
                took.as_secs_f64() * 1e3,
                counts.join(", ")
            ))
        })
    })
}

/// The action's status once it has ended (or after 30 s, as it is then).
pub async fn settled(c: &Client, id: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.send(c.http.get(c.url(&format!("/api/v1/actions/{id}/status")))).await?;
        let ended = matches!(s["state"].as_str(), Some("completed" | "aborted"));
        if ended || Instant::now() >= deadline {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
