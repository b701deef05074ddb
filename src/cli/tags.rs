//! `fwgate tags`: what a tag's devices run by default, and which wave made it so.

use anyhow::Result;
use clap::Subcommand;
use serde_json::Value;

use super::{s, Client, Remote};

#[derive(Subcommand)]
pub enum TagsCommand {
    /// A tag's production versions (per class), the complete wave each comes from, and the
    /// tag's active waves.
    Show { tag: String },
}

pub async fn tags(cmd: TagsCommand, remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    match cmd {
        TagsCommand::Show { tag } => {
            let v = c.send(c.http.get(c.url(&format!("/api/v1/tags/{tag}")))).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            println!("tag {}", s(&v, "tag"));
            for (class, key) in [("production", "production"), ("ci", "ci")] {
                let sources = v[key].as_array().cloned().unwrap_or_default();
                match sources.last() {
                    None => println!("{class:<11} no production version (no complete wave)"),
                    Some(latest) => {
                        println!(
                            "{class:<11} {} — from wave {} (stages devices that join)",
                            s(latest, "version"),
                            s(latest, "wave")
                        );
                        for older in sources.iter().rev().skip(1) {
                            println!("{:<11} {} — from wave {}", "", s(older, "version"), s(older, "wave"));
                        }
                    }
                }
            }
            for w in v["active_waves"].as_array().into_iter().flatten() {
                let class = if w["production"] == Value::Bool(true) { "production" } else { "ci" };
                println!("active      wave {} ({class}) rolling out {}", s(w, "wave"), s(w, "version"));
            }
        }
    }
    Ok(())
}
