//! `fwgate waves`: init, rollout, complete, cancel, list, show, status.

use super::*;

#[derive(Subcommand)]
pub enum WavesCommand {
    /// Start a wave (Active): nothing is delivered until a rollout or complete.
    Init {
        wave: String,
        /// The version to deliver (any image of it that fits a device's hardware), or
        /// NAME@VERSION for one image. Must be newer than the tag's production version.
        version: String,
        tag: String,
        /// Production versions of the tag to withdraw when this wave completes
        /// (comma-separated).
        #[arg(long, value_delimiter = ',')]
        prune: Vec<String>,
        /// A wave for the tag's test (CI) devices instead of its production devices.
        #[arg(long)]
        ci: bool,
        /// Check everything, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Deliver the wave to a group, a sample, or a list of devices; repeatable.
    Rollout {
        wave: String,
        /// Same as --group.
        group_arg: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// N devices, or N% of the devices the rollout could reach; recently active devices
        /// first, never one already in the wave.
        #[arg(long)]
        limit: Option<String>,
        /// Device ids separated by , ; | or white space, or @FILE to read them from a file.
        #[arg(long)]
        uuids: Option<String>,
        /// Seed of the sample (default: random, printed so a dry run can be replayed).
        #[arg(long)]
        seed: Option<u64>,
        /// Select, print, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the selected device ids, one per line, on stdout.
        #[arg(long)]
        print_uuids: bool,
    },
    /// Deliver the version to every device of the tag, now and when they join later; it
    /// becomes the tag's production version.
    Complete { wave: String },
    /// Withdraw the wave's queued operations; updated devices stay updated.
    Cancel { wave: String },
    /// Waves, oldest first.
    List {
        /// active, complete or canceled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        tag: Option<String>,
    },
    /// A wave and its rollout history.
    Show { wave: String },
    /// Device counts of a wave, overall and per group (default: every active wave).
    Status { wave: Option<String> },
}

/// Reads `--uuids`: the text itself, or the contents of @FILE.
fn read_uuids(arg: &str) -> Result<String> {
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading --uuids file {path}")),
        None => Ok(arg.to_owned()),
    }
}

fn print_wave_status(v: &Value) {
    println!(
        "wave {} ({}, tag {}, {} devices, version {})",
        s(v, "name"),
        s(v, "state"),
        s(v, "tag"),
        if v["production"] == true { "production" } else { "ci" },
        s(v, "version")
    );
    println!(
        "devices on the tag {}: updated {}, need update {}, scheduled {}, in progress {}, failed {}, \
         canceled {}, online {}",
        n(v, "total"),
        n(v, "updated"),
        n(v, "need_update"),
        n(v, "scheduled"),
        n(v, "in_progress"),
        n(v, "failed"),
        n(v, "canceled"),
        n(v, "online")
    );
    if let Some(w) = v["waiting"].as_str() {
        println!("{w}");
    }
    if n(v, "deferred") > 0 {
        println!(
            "{} devices chosen while trust was missing: staged after the next successful TUF refresh",
            n(v, "deferred")
        );
    }
    let groups = v["groups"].as_array().cloned().unwrap_or_default();
    if groups.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<24} {:>9} {:>9} {:>12} {:>10} {:>8}",
        "GROUP", "TOTAL", "UPDATED", "NEED-UPDATE", "SCHEDULED", "ONLINE"
    );
    for g in groups {
        println!(
            "{:<24} {:>9} {:>9} {:>12} {:>10} {:>8}",
            s(&g, "group"),
            n(&g, "total"),
            n(&g, "updated"),
            n(&g, "need_update"),
            n(&g, "scheduled"),
            n(&g, "online")
        );
    }
}

fn print_wave(v: &Value) {
    println!("wave        {}", s(v, "name"));
    println!("state       {}", s(v, "state"));
    println!("tag         {} ({})", s(v, "tag"), if v["production"] == true { "production" } else { "ci" });
    let image = match v["image_name"].as_str() {
        Some(name) => format!("{name}@{}", s(v, "version")),
        None => format!("{} (any image of it fitting the device's hardware)", s(v, "version")),
    };
    println!("version     {image}");
    if let Some(p) = v["prune"].as_array().filter(|p| !p.is_empty()) {
        println!("prunes      {}", p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","));
    }
    println!("created     {}", ago(&v["created_at"]));
    if !v["ended_at"].is_null() {
        println!("ended       {}", ago(&v["ended_at"]));
    }
    let rollouts = v["rollouts"].as_array().cloned().unwrap_or_default();
    if rollouts.is_empty() {
        println!("rollouts    none");
        return;
    }
    println!();
    println!(
        "{:<16} {:<10} {:<16} {:>8} {:>8} {:>9} {:>20}",
        "WHEN", "STEP", "GROUP", "LIMIT", "UUIDS", "STAGED", "SEED"
    );
    for r in rollouts {
        println!(
            "{:<16} {:<10} {:<16} {:>8} {:>8} {:>9} {:>20}",
            ago(&r["at"]),
            if r["complete"] == true { "complete" } else { "rollout" },
            s(&r, "group"),
            s(&r, "limit"),
            n(&r, "uuids"),
            n(&r, "staged"),
            if r["complete"] == true { "-".into() } else { s(&r, "seed") }
        );
    }
}

pub async fn waves(cmd: WavesCommand, remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    let out = |v: &Value, text: String| {
        if remote.json {
            println!("{v:#}");
        } else {
            println!("{text}");
        }
    };
    let path = |wave: &str, what: &str| c.url(&format!("/api/v1/waves/{wave}{what}"));
    match cmd {
        WavesCommand::Init { wave, version, tag, prune, ci, dry_run } => {
            let body = serde_json::json!({
                "name": wave, "version": version, "tag": tag, "production": !ci, "prune": prune, "dry_run": dry_run,
            });
            let v = c.send(c.http.post(c.url("/api/v1/waves")).json(&body)).await?;
            let what = if dry_run { "would be initialized (dry run)" } else { "initialized" };
            out(&v, format!("wave {wave} {what}: version {} to tag {tag}, state {}", s(&v, "version"), s(&v, "state")));
        }
        WavesCommand::Rollout { wave, group_arg, group, limit, uuids, seed, dry_run, print_uuids } => {
            let group = match (group_arg, group) {
                (Some(a), Some(b)) if a != b => bail!("group given twice, as {a} and --group {b}"),
                (a, b) => a.or(b),
            };
            let uuids = uuids.as_deref().map(read_uuids).transpose()?;
            let body = serde_json::json!({
                "group": group, "limit": limit, "uuids": uuids, "seed": seed,
                "dry_run": dry_run, "print_uuids": print_uuids,
            });
            let v = c.send(c.http.post(path(&wave, "/rollout")).json(&body)).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            // The ids go to stdout alone, so `--print-uuids > list` makes a list for --uuids @list.
            for id in v["devices"].as_array().into_iter().flatten() {
                println!("{}", id.as_str().unwrap_or(""));
            }
            let rejected = v["rejected"].as_array().cloned().unwrap_or_default();
            for r in rejected.iter().take(50) {
                eprintln!("  not staged: {}: {}", s(r, "device"), s(r, "reason"));
            }
            if rejected.len() > 50 {
                eprintln!("  ... and {} more (--json lists them all)", rejected.len() - 50);
            }
            let did = if dry_run {
                format!("would stage {} (dry run)", n(&v, "selected"))
            } else {
                format!("staged {} of {} selected", n(&v, "staged"), n(&v, "selected"))
            };
            eprintln!(
                "wave {wave}: {did}; {} devices reachable, {} not staged; seed {}",
                n(&v, "population"),
                rejected.len(),
                s(&v, "seed")
            );
        }
        WavesCommand::Complete { wave } => {
            let v = c.send(c.http.post(path(&wave, "/complete"))).await?;
            out(
                &v,
                format!(
                    "wave {wave} complete: {} is a production version of tag {}; {} more devices staged",
                    s(&v["wave"], "version"),
                    s(&v["wave"], "tag"),
                    n(&v, "operations")
                ),
            );
        }
        WavesCommand::Cancel { wave } => {
            let v = c.send(c.http.post(path(&wave, "/cancel"))).await?;
            out(&v, format!("wave {wave} canceled: {} operations withdrawn", n(&v, "operations")));
        }
        WavesCommand::List { status, tag } => {
            let mut q: Vec<(&str, String)> = Vec::new();
            if let Some(st) = status {
                q.push(("status", st));
            }
            if let Some(t) = tag {
                q.push(("tag", t));
            }
            let v = c.send(c.http.get(c.url("/api/v1/waves")).query(&q)).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            println!(
                "{:<24} {:<16} {:<11} {:<16} {:<9} {:>8}  CREATED",
                "NAME", "TAG", "CLASS", "VERSION", "STATUS", "ROLLOUTS"
            );
            for w in v.as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:<16} {:<11} {:<16} {:<9} {:>8}  {}",
                    s(w, "name"),
                    s(w, "tag"),
                    if w["production"] == true { "production" } else { "ci" },
                    s(w, "version"),
                    s(w, "state"),
                    w["rollouts"].as_array().map_or(0, Vec::len),
                    ago(&w["created_at"])
                );
            }
        }
        WavesCommand::Show { wave } => {
            let v = c.send(c.http.get(path(&wave, ""))).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                print_wave(&v);
            }
        }
        WavesCommand::Status { wave } => {
            let names = match wave {
                Some(w) => vec![w],
                None => {
                    let v = c.send(c.http.get(c.url("/api/v1/waves")).query(&[("status", "active")])).await?;
                    v.as_array().into_iter().flatten().map(|w| s(w, "name")).collect()
                }
            };
            if names.is_empty() && !remote.json {
                println!("no active waves");
            }
            let mut all = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let v = c.send(c.http.get(path(name, "/status"))).await?;
                if !remote.json {
                    if i > 0 {
                        println!();
                    }
                    print_wave_status(&v);
                }
                all.push(v);
            }
            if remote.json {
                println!("{:#}", Value::Array(all));
            }
        }
    }
    Ok(())
}
