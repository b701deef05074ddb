//! Multi-target devices for load runs: an xname with several firmware targets (BIOS, BMC,
//! NIC…), each running its own version and updated through the DFU `component`, as a FAS
//! action drives them. One connection per device; the targets are asked in turn, and a
//! target the gateway holds back (WAIT, or SYNC while a sibling is in flight) is asked again
//! after a growing pause.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::coap::CoapClient;
use super::device::{DfuDevice, Ended};
use super::mqtt::{MqttDevice, MqttError};
use super::run::{coap_config, connect, new_device, tally, Expected, Failure, Shared, MAX_LOST};
use super::stats::Stats;
use crate::loadgen::run::Transport;

/// One firmware target of every simulated device: what it runs first and what it must end
/// up running.
#[derive(Debug, Clone, Serialize)]
pub struct TargetPlan {
    pub name: String,
    pub running: String,
    pub expected: Expected,
}

/// Pauses between passes over targets that were all held back.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LONGEST_PAUSE: Duration = Duration::from_secs(2);

/// A device's one connection to the gateway, shared by its targets.
enum Link {
    /// The device's index, for reconnecting, and connections lost so far.
    Mqtt(MqttDevice, usize, u32),
    Coap(CoapClient),
}

impl Link {
    async fn open(s: &Shared, i: usize, first: &DfuDevice) -> Result<Link, Failure> {
        let p = &s.plan;
        Ok(match p.transport {
            Transport::Mqtt => Link::Mqtt(connect(s, i, first.clone()).await?, i, 0),
            Transport::Coap => Link::Coap(CoapClient::connect(p.target, coap_config(p, i, 0)).await?),
            Transport::CoapBlock2 => {
                return Err("Block2 has no firmware targets; use --transport coap or mqtt".to_string().into())
            }
        })
    }

    /// One DFU exchange of one target, until it ends. A lost MQTT connection (the broker
    /// restarted, say) is made again and the exchange goes on from where the target is.
    async fn exchange(&mut self, s: &Shared, target: &mut DfuDevice) -> Result<Ended, Failure> {
        match self {
            Link::Mqtt(m, i, lost) => loop {
                std::mem::swap(&mut m.dev, target);
                let r = m.run(None, &s.stats).await;
                std::mem::swap(&mut m.dev, target);
                match r {
                    Err(MqttError::Lost(_)) if *lost < MAX_LOST => {
                        *lost += 1;
                        Stats::add(&s.stats.reconnects, 1);
                        // The dead connection is dropped, not closed: closing it would poll its
                        // event loop, which connects again under the same client id and so
                        // takes the session over from the fresh one.
                        *m = connect(s, *i, target.clone()).await?;
                    }
                    r => return Ok(r?),
                }
            },
            Link::Coap(c) => Ok(c.run_dfu(target, None, &s.stats).await?),
        }
    }

    async fn close(self, s: &Shared) {
        match self {
            Link::Mqtt(m, ..) => m.disconnect().await,
            Link::Coap(c) => tally(s, &c),
        }
    }
}

/// Simulated device `i` with every target of the plan: reports what each runs, waits for
/// the whole fleet (the load run starts the action then), and asks for each target until all
/// are updated and verified.
pub(super) async fn device(s: &Shared, i: usize) -> Result<(), Failure> {
    let p = &s.plan;
    let mut targets: Vec<DfuDevice> = p
        .targets
        .iter()
        .map(|t| {
            let mut d = new_device(p, i);
            d.running = t.running.clone();
            d.component = Some(t.name.clone());
            d
        })
        .collect();
    let mut link = match Link::open(s, i, &targets[0]).await {
        Ok(l) => l,
        Err(e) => {
            s.wait_for_fleet().await;
            return Err(e);
        }
    };
    let r = update(s, &mut link, &mut targets).await;
    link.close(s).await;
    r
}

async fn update(s: &Shared, link: &mut Link, targets: &mut [DfuDevice]) -> Result<(), Failure> {
    let mut done = vec![false; targets.len()];
    // The first pass reports every target's running version (the gateway answers SYNC until
    // an action has planned them).
    let first = pass(s, link, targets, &mut done).await;
    s.wait_for_fleet().await;
    first?;
    let mut pause = FIRST_PAUSE;
    let mut last_progress = Instant::now();
    while done.contains(&false) {
        if pass(s, link, targets, &mut done).await? {
            (pause, last_progress) = (FIRST_PAUSE, Instant::now());
            continue;
        }
        if last_progress.elapsed() >= s.plan.patience {
            let waiting: Vec<&str> =
                targets.iter().zip(&done).filter(|(_, d)| !**d).filter_map(|(t, _)| t.component.as_deref()).collect();
            return Err(format!(
                "no target updated in {:.0} s (still waiting: {})",
                s.plan.patience.as_secs_f64(),
                waiting.join(", ")
            )
            .into());
        }
        s.stats.retry();
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
    Ok(())
}

/// Asks once for each target not yet done; whether any finished its update.
async fn pass(s: &Shared, link: &mut Link, targets: &mut [DfuDevice], done: &mut [bool]) -> Result<bool, Failure> {
    let mut progressed = false;
    for (k, t) in targets.iter_mut().enumerate() {
        if done[k] {
            continue;
        }
        match link.exchange(s, t).await? {
            Ended::Updated => {
                verify(&s.plan.targets[k], t)?;
                done[k] = true;
                progressed = true;
            }
            // Held back (a sibling is in flight, or nothing is planned yet); exchanges here
            // never pause.
            Ended::Waited | Ended::Synced | Ended::Paused(_) => {}
        }
    }
    Ok(progressed)
}

fn verify(want: &TargetPlan, t: &DfuDevice) -> Result<(), Failure> {
    let sha = t.last_sha256.map(hex::encode).unwrap_or_default();
    if t.running != want.expected.version {
        return Err(format!("{}: updated to {}, not {}", want.name, t.running, want.expected.version).into());
    }
    if sha != want.expected.sha256 {
        let message = format!("{}: ended on an image with sha256 {sha}, not the target's", want.name);
        return Err(Failure { message, checksum: true });
    }
    Ok(())
}
