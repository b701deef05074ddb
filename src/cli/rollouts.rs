//! `fwgate rollouts`: create, list, show, status, the operator actions, retry, delete.

use super::*;

#[derive(Subcommand)]
pub enum RolloutsCommand {
    /// Define a rollout over the devices a filter matches, split into groups (it then waits
    /// for approval or is ready to start).
    Create {
        name: String,
        /// RSQL over id, tag, group, production, hardware, version[.COMPONENT], lastseen,
        /// e.g. 'tag==release;hardware==nrf52'.
        #[arg(long)]
        filter: String,
        /// NAME@VERSION, or a VERSION whose image is picked per device hardware.
        #[arg(long)]
        image: String,
        /// Split the devices into N groups of sizes differing by at most one.
        #[arg(long, conflicts_with = "group")]
        groups: Option<usize>,
        /// An explicit group, in order, repeatable: `[PERCENT%][:FILTER]` — a percentage of the
        /// devices not in an earlier group, those a sub-filter matches, or both; the last group
        /// takes the rest.
        #[arg(long)]
        group: Vec<String>,
        /// Success threshold: percent of a group's devices updated (default 50).
        #[arg(long)]
        success: Option<u8>,
        /// What a met success condition does: nextgroup (default) or pause.
        #[arg(long)]
        success_action: Option<String>,
        /// Error threshold: more failed devices than this (5% or 5) pause the rollout
        /// (default 50%).
        #[arg(long)]
        error: Option<String>,
        /// 0–1000, the operations' weight in the device queues (default 1000).
        #[arg(long)]
        weight: Option<u16>,
        /// Start by itself at this time (RFC 3339, e.g. 2026-12-24T06:00:00Z) once ready.
        #[arg(long)]
        start_at: Option<String>,
        /// Devices that match the filter after creation join trailing groups of this size.
        #[arg(long)]
        dynamic_group_size: Option<u64>,
        /// At most N device operations started per minute in each group.
        #[arg(long)]
        rate: Option<u32>,
        /// Grow the rate: FACTOR:EVERY multiplies it by FACTOR after every EVERY successes.
        #[arg(long, requires = "rate")]
        rate_growth: Option<String>,
    },
    /// Rollouts, oldest first.
    List {
        /// Deleted rollouts too.
        #[arg(long)]
        deleted: bool,
    },
    /// A rollout and its groups.
    Show {
        name: String,
    },
    /// A row per group: state, devices by where they are, % toward each threshold.
    Status {
        name: String,
    },
    /// Start a ready rollout: its first group gets its operations.
    Start {
        name: String,
    },
    /// Start no further group until resumed (running operations go on).
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Cancel the rollout's queued operations; devices mid-transfer stop at their next Status.
    Stop {
        name: String,
    },
    Approve {
        name: String,
        #[arg(long)]
        remark: Option<String>,
    },
    Deny {
        name: String,
        #[arg(long)]
        remark: Option<String>,
    },
    /// Start the next group now, whatever the running group's success condition says.
    TriggerNextGroup {
        name: String,
    },
    /// A new rollout of the devices that failed in a finished or stopped one.
    Retry {
        name: String,
    },
    Delete {
        name: String,
    },
}

/// `--group [PERCENT%][:FILTER]`.
fn group_def(text: &str) -> Result<Value> {
    let (pct, filter) = match text.split_once(':') {
        Some((p, f)) => (p.trim(), Some(f.trim())),
        None if text.trim_end().ends_with('%') => (text.trim(), None),
        None => ("", Some(text.trim())),
    };
    let percent = match pct.strip_suffix('%') {
        Some(p) => {
            Some(p.trim().parse::<u8>().with_context(|| format!("--group {text:?}: {pct} is not a percentage"))?)
        }
        None if pct.is_empty() => None,
        None => bail!("--group {text:?}: expected [PERCENT%][:FILTER], e.g. 20% or 50%:hardware==nrf52"),
    };
    Ok(serde_json::json!({"percent": percent, "filter": filter.filter(|f| !f.is_empty())}))
}

fn start_at(text: &str) -> Result<u64> {
    let t = crate::parse_moment(text)
        .ok_or_else(|| anyhow!("--start-at {text:?}: an RFC 3339 time (2026-12-24T06:00:00Z) or Unix seconds"))?;
    u64::try_from(t).map_err(|_| anyhow!("--start-at {text:?} is before 1970"))
}

fn rate(per_minute: u32, growth: Option<&str>) -> Result<Value> {
    let mut v = serde_json::json!({"per_minute": per_minute});
    if let Some(g) = growth {
        let (f, m) = g.split_once(':').ok_or_else(|| anyhow!("--rate-growth {g:?}: FACTOR:EVERY, e.g. 2:10"))?;
        v["factor"] = f.parse::<f64>().with_context(|| format!("--rate-growth factor {f:?}"))?.into();
        v["every"] = m.parse::<u64>().with_context(|| format!("--rate-growth every {m:?}"))?.into();
    }
    Ok(v)
}

fn print_rollout(v: &Value) {
    println!("rollout     {}", s(v, "name"));
    println!("state       {}", s(v, "state"));
    if !v["filter"].as_str().unwrap_or("").is_empty() {
        println!("filter      {}", s(v, "filter"));
    }
    if let Some(of) = v["retry_of"].as_str() {
        println!("retries     {of}");
    }
    println!("image       {}", s(v, "image"));
    println!("weight      {}", n(v, "weight"));
    if let Some(r) = v.get("rate").filter(|r| !r.is_null()) {
        let growth = match (r["factor"].as_f64(), r["every"].as_u64()) {
            (Some(f), Some(m)) => format!(", ×{f} after every {m} successes"),
            _ => String::new(),
        };
        println!("rate        {} a minute per group{growth}", n(r, "per_minute"));
    }
    if let Some(size) = v["dynamic_group_size"].as_u64() {
        println!("dynamic     newcomers join groups of {size}");
    }
    if !v["start_at"].is_null() {
        println!("starts      {}", ago(&v["start_at"]));
    }
    if let Some(r) = v["remark"].as_str() {
        println!("remark      {r}");
    }
    println!("created     {}", ago(&v["created_at"]));
    println!();
    println!("{:<12} {:<10} {:>9} {:>8} {:<10} {:>8}", "GROUP", "STATE", "DEVICES", "SUCCESS", "ACTION", "ERROR");
    for g in v["groups"].as_array().into_iter().flatten() {
        let c = &g["conditions"];
        let error = match (&c["error"]["percent"], &c["error"]["count"]) {
            (p, _) if !p.is_null() => format!("{p}%"),
            (_, n) => n.to_string(),
        };
        println!(
            "{:<12} {:<10} {:>9} {:>7}% {:<10} {:>8}",
            format!("{}{}", s(g, "name"), if g["dynamic"] == true { "*" } else { "" }),
            s(g, "state"),
            n(g, "total"),
            n(c, "success_percent"),
            s(c, "success_action"),
            error
        );
    }
}

fn print_status(v: &Value) {
    println!("rollout {} ({}, {}, {} devices)", s(v, "name"), s(v, "state"), s(v, "image"), n(v, "total"));
    println!();
    println!(
        "{:<12} {:<10} {:>8} {:>8} {:>10} {:>8} {:>9} {:>7} {:>9} {:>9} {:>8}",
        "GROUP",
        "STATE",
        "TOTAL",
        "WAITING",
        "SCHEDULED",
        "RUNNING",
        "FINISHED",
        "FAILED",
        "CANCELED",
        "→SUCCESS",
        "→ERROR"
    );
    for g in v["groups"].as_array().into_iter().flatten() {
        println!(
            "{:<12} {:<10} {:>8} {:>8} {:>10} {:>8} {:>9} {:>7} {:>9} {:>8}% {:>7}%",
            s(g, "name"),
            s(g, "state"),
            n(g, "total"),
            n(g, "waiting"),
            n(g, "scheduled"),
            n(g, "running"),
            n(g, "succeeded"),
            n(g, "failed"),
            n(g, "canceled"),
            g["toward_success"],
            g["toward_error"]
        );
    }
}

pub async fn rollouts(cmd: RolloutsCommand, remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    let path = |name: &str, what: &str| c.url(&format!("/api/v1/rollouts/{name}{what}"));
    let done = |v: &Value, what: &str| {
        if remote.json {
            println!("{v:#}");
        } else {
            println!("rollout {} {what}: {}", s(v, "name"), s(v, "state"));
        }
    };
    match cmd {
        RolloutsCommand::Create {
            name,
            filter,
            image,
            groups,
            group,
            success,
            success_action,
            error,
            weight,
            start_at: at,
            dynamic_group_size,
            rate: per_minute,
            rate_growth,
        } => {
            let defs = group.iter().map(|g| group_def(g)).collect::<Result<Vec<_>>>()?;
            let body = serde_json::json!({
                "name": name, "filter": filter, "image": image, "groups": groups, "group_defs": defs,
                "success": success, "success_action": success_action, "error": error, "weight": weight,
                "start_at": at.as_deref().map(start_at).transpose()?,
                "dynamic_group_size": dynamic_group_size,
                "rate": per_minute.map(|r| rate(r, rate_growth.as_deref())).transpose()?,
            });
            let v = c.send(c.http.post(c.url("/api/v1/rollouts")).json(&body)).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                let sizes: Vec<u64> = v["groups"].as_array().into_iter().flatten().map(|g| n(g, "total")).collect();
                let listed: Vec<String> = sizes.iter().map(u64::to_string).collect();
                println!(
                    "rollout {name} created: {} devices in {} groups ({}), state {}",
                    sizes.iter().sum::<u64>(),
                    sizes.len(),
                    listed.join(", "),
                    s(&v, "state")
                );
            }
        }
        RolloutsCommand::List { deleted } => {
            let v = c.send(c.http.get(c.url("/api/v1/rollouts")).query(&[("deleted", deleted)])).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            println!("{:<24} {:<22} {:<20} {:>7} {:>9}  CREATED", "NAME", "STATE", "IMAGE", "GROUPS", "DEVICES");
            for r in v.as_array().into_iter().flatten() {
                let groups = r["groups"].as_array().cloned().unwrap_or_default();
                println!(
                    "{:<24} {:<22} {:<20} {:>7} {:>9}  {}",
                    s(r, "name"),
                    s(r, "state"),
                    s(r, "image"),
                    groups.len(),
                    groups.iter().map(|g| n(g, "total")).sum::<u64>(),
                    ago(&r["created_at"])
                );
            }
        }
        RolloutsCommand::Show { name } => {
            let v = c.send(c.http.get(path(&name, ""))).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                print_rollout(&v);
            }
        }
        RolloutsCommand::Status { name } => {
            let v = c.send(c.http.get(path(&name, "/status"))).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                print_status(&v);
            }
        }
        RolloutsCommand::Start { name } => done(&c.send(c.http.post(path(&name, "/start"))).await?, "started"),
        RolloutsCommand::Pause { name } => done(&c.send(c.http.post(path(&name, "/pause"))).await?, "paused"),
        RolloutsCommand::Resume { name } => done(&c.send(c.http.post(path(&name, "/resume"))).await?, "resumed"),
        RolloutsCommand::Stop { name } => done(&c.send(c.http.post(path(&name, "/stop"))).await?, "stopped"),
        RolloutsCommand::Approve { name, remark } => {
            let body = serde_json::json!({ "remark": remark });
            done(&c.send(c.http.post(path(&name, "/approve")).json(&body)).await?, "approved")
        }
        RolloutsCommand::Deny { name, remark } => {
            let body = serde_json::json!({ "remark": remark });
            done(&c.send(c.http.post(path(&name, "/deny")).json(&body)).await?, "denied")
        }
        RolloutsCommand::TriggerNextGroup { name } => {
            done(&c.send(c.http.post(path(&name, "/trigger-next-group"))).await?, "next group triggered")
        }
        RolloutsCommand::Retry { name } => {
            let v = c.send(c.http.post(path(&name, "/retry"))).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                let total: u64 = v["groups"].as_array().into_iter().flatten().map(|g| n(g, "total")).sum();
                println!(
                    "rollout {} created to retry {name}: {total} devices, state {}",
                    s(&v, "name"),
                    s(&v, "state")
                );
            }
        }
        RolloutsCommand::Delete { name } => done(&c.send(c.http.delete(path(&name, ""))).await?, "deleted"),
    }
    Ok(())
}
