//! `fwgate snapshots`: record what every target runs, list, show, restore, delete.

use super::*;

#[derive(Subcommand)]
pub enum SnapshotsCommand {
    /// Record the running version of every target of the chosen xnames (all by default).
    Create {
        name: String,
        /// An xname (repeatable).
        #[arg(long = "xname")]
        xnames: Vec<String>,
        /// A group (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// A target (repeatable).
        #[arg(long = "target")]
        targets: Vec<String>,
        /// After this time (RFC 3339 or Unix seconds) it may no longer be restored.
        #[arg(long)]
        expires: Option<String>,
    },
    List,
    Show {
        name: String,
    },
    /// Put every target back to its snapshot version: a dry run unless --live.
    Restore {
        name: String,
        #[arg(long)]
        live: bool,
        /// Seconds the restore action may take.
        #[arg(long)]
        time_limit: Option<u64>,
    },
    Delete {
        name: String,
    },
}

pub async fn snapshots(cmd: SnapshotsCommand, remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    let path = |name: &str, what: &str| c.url(&format!("/api/v1/snapshots/{name}{what}"));
    let targets_of = |d: &Value| d["targets"].as_array().map_or(0, Vec::len);
    match cmd {
        SnapshotsCommand::Create { name, xnames, groups, targets, expires } => {
            let body = serde_json::json!({
                "name": name, "expirationTime": expires,
                "stateComponentFilter": {"xnames": xnames, "groups": groups},
                "targetFilter": {"targets": targets},
            });
            let v = c.send(c.http.post(c.url("/api/v1/snapshots")).json(&body)).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                let devices = v["devices"].as_array().cloned().unwrap_or_default();
                let n: usize = devices.iter().map(targets_of).sum();
                println!("snapshot {name}: {} xnames, {n} targets", devices.len());
            }
        }
        SnapshotsCommand::List => {
            let v = c.send(c.http.get(c.url("/api/v1/snapshots"))).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            println!("{:<24} {:>8} {:>8}  CAPTURED", "NAME", "XNAMES", "TARGETS");
            for snap in v.as_array().into_iter().flatten() {
                let devices = snap["devices"].as_array().cloned().unwrap_or_default();
                println!(
                    "{:<24} {:>8} {:>8}  {}",
                    s(snap, "name"),
                    devices.len(),
                    devices.iter().map(targets_of).sum::<usize>(),
                    ago(&snap["captureTime"])
                );
            }
        }
        SnapshotsCommand::Show { name } => {
            let v = c.send(c.http.get(path(&name, ""))).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            println!("{:<20} {:<12} {:<20} IMAGE", "XNAME", "TARGET", "FIRMWARE");
            for d in v["devices"].as_array().into_iter().flatten() {
                for t in d["targets"].as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:<12} {:<20} {}",
                        s(d, "xname"),
                        s(t, "name"),
                        s(t, "firmwareVersion"),
                        t["imageID"].as_str().unwrap_or("-")
                    );
                }
            }
        }
        SnapshotsCommand::Restore { name, live, time_limit } => {
            let body = serde_json::json!({"overrideDryrun": live, "timeLimit": time_limit});
            let v = c.send(c.http.post(path(&name, "/restore")).json(&body)).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            let a = &v["action"];
            println!(
                "snapshot {name}: action {} ({}{})",
                s(a, "actionID"),
                s(a, "state"),
                if a["dryrun"] == true { ", dry run: add --live to run it" } else { "" }
            );
            for x in v["skipped"].as_array().into_iter().flatten() {
                println!("  skipped {}: removed since the snapshot", x.as_str().unwrap_or(""));
            }
        }
        SnapshotsCommand::Delete { name } => {
            let v = c.send(c.http.delete(path(&name, ""))).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                println!("snapshot {name} deleted");
            }
        }
    }
    Ok(())
}
