//! `fwgate actions`: FAS-style firmware actions — create from a FAS action JSON, list, show,
//! status, abort, delete.

use super::*;

#[derive(Subcommand)]
pub enum ActionsCommand {
    /// Plan (and, with command.overrideDryrun true in FILE, run) a FAS action JSON.
    Create { file: PathBuf },
    /// Actions, oldest first.
    List,
    /// An action and its operations, as they stand now.
    Show { id: String },
    /// An action's state and how many operations are in each state.
    Status { id: String },
    /// Abort a blocked or running action: what has not started is withdrawn, transfers under
    /// way stop at their device's next Status.
    Abort { id: String },
    /// Delete a completed or aborted action (dry runs also expire by themselves,
    /// `actions.dry_run_keep_secs`); its operations stay in the devices' histories.
    Delete { id: String },
}

fn print_operations(v: &Value) {
    println!("{:<20} {:<12} {:<14} {:<22} {:<14} NOTE", "XNAME", "TARGET", "STATE", "IMAGE", "FROM");
    for o in v["operations"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<12} {:<14} {:<22} {:<14} {}",
            s(o, "xname"),
            s(o, "target"),
            s(o, "state"),
            o["toImageID"].as_str().unwrap_or("-"),
            s(o, "fromFirmwareVersion"),
            o["stateHelper"].as_str().unwrap_or("")
        );
    }
}

fn print_counts(v: &Value) {
    let counts: Vec<String> = v["operationCounts"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, n)| *k != "total" && n.as_u64() != Some(0))
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "action {} ({}{}): {} operations: {}",
        s(v, "actionID"),
        s(v, "state"),
        if v["dryrun"] == true { ", dry run" } else { "" },
        n(&v["operationCounts"], "total"),
        if counts.is_empty() { "none".into() } else { counts.join(", ") }
    );
}

pub async fn actions(cmd: ActionsCommand, remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    let path = |id: &str, what: &str| c.url(&format!("/api/v1/actions/{id}{what}"));
    match cmd {
        ActionsCommand::Create { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let body: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
            let v = c.send(c.http.post(c.url("/api/v1/actions")).json(&body)).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                print_counts(&v);
                if v["dryrun"] == true {
                    print_operations(&v);
                    println!("a dry run: nothing changed; set command.overrideDryrun to true to run it");
                }
            }
        }
        ActionsCommand::List => {
            let v = c.send(c.http.get(c.url("/api/v1/actions"))).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            println!("{:<38} {:<14} {:<8} CREATED", "ACTION", "STATE", "DRYRUN");
            for a in v.as_array().into_iter().flatten() {
                println!("{:<38} {:<14} {:<8} {}", s(a, "actionID"), s(a, "state"), a["dryrun"], ago(&a["createTime"]));
            }
        }
        ActionsCommand::Show { id } => {
            let v = c.send(c.http.get(path(&id, ""))).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                print_counts(&v);
                print_operations(&v);
            }
        }
        ActionsCommand::Status { id } => {
            let v = c.send(c.http.get(path(&id, "/status"))).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                print_counts(&v);
            }
        }
        ActionsCommand::Abort { id } => {
            let v = c.send(c.http.delete(path(&id, "/instance"))).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                println!("action {id} {}", s(&v, "state"));
            }
        }
        ActionsCommand::Delete { id } => {
            let v = c.send(c.http.delete(path(&id, ""))).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                println!("action {id} deleted (it was {})", s(&v, "state"));
            }
        }
    }
    Ok(())
}
