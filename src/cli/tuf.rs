//! `fwgate tuf`: refresh the gateway's repositories, and a standalone TUF client with the
//! command line of the public tuf-conformance suite, running the same code the gateway uses.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::tuf::Client;

#[derive(Subcommand)]
pub enum TufCommand {
    /// Refresh the gateway's TUF repositories now (default: every configured one).
    Refresh {
        /// production or ci.
        repo: Option<String>,
    },
    /// What each repository verified last: versions, expiry, targets.
    Status,
    /// A standalone TUF client (the tuf-conformance CLI): `init ROOT`, `refresh`, `download`.
    Client(ClientArgs),
}

#[derive(Args)]
pub struct ClientArgs {
    /// Where the trusted metadata lives (root.json, timestamp.json, snapshot.json,
    /// targets.json — non-versioned names).
    #[arg(long)]
    pub metadata_dir: PathBuf,
    /// Base URL of the repository's metadata (http:// or file://).
    #[arg(long)]
    pub metadata_url: Option<String>,
    /// A target to download (repeatable).
    #[arg(long = "target-name")]
    pub target_names: Vec<String>,
    /// Base URL of the target files.
    #[arg(long)]
    pub target_base_url: Option<String>,
    /// Where downloaded targets are written (and found again, verified, next time).
    #[arg(long)]
    pub target_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: ClientCommand,
}

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Trust ROOT (a root.json obtained out of band).
    Init { root: PathBuf },
    /// Update the trusted metadata from --metadata-url.
    Refresh,
    /// Update, then download each --target-name into --target-dir, verified.
    Download,
}

fn client(a: &ClientArgs, targets_url: Option<&str>) -> Result<Client> {
    let metadata_url = a.metadata_url.clone().context("--metadata-url is required")?;
    Ok(Client {
        name: "repository".into(),
        initial_root: a.metadata_dir.join("root.json"),
        targets_url: targets_url.map(str::to_owned).unwrap_or_else(|| metadata_url.clone()),
        metadata_url,
        datastore: a.metadata_dir.clone(),
        fetch_timeout: crate::tuf::FETCH_TIMEOUT,
    })
}

/// The file a target is saved as: its name, with `/` and `%` escaped so it stays one file.
fn file_name(target: &str) -> String {
    target.replace('%', "%25").replace('/', "%2F")
}

pub async fn client_command(a: ClientArgs) -> Result<()> {
    match &a.command {
        ClientCommand::Init { root } => {
            let bytes = std::fs::read(root).with_context(|| format!("reading {}", root.display()))?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).context("the root is not JSON")?;
            if v["signed"]["_type"] != "root" {
                bail!("{} is not TUF root metadata", root.display());
            }
            std::fs::create_dir_all(&a.metadata_dir)?;
            std::fs::write(a.metadata_dir.join("root.json"), bytes)?;
        }
        ClientCommand::Refresh => {
            client(&a, None)?.load().await?;
        }
        ClientCommand::Download => {
            let base = a.target_base_url.as_deref().context("--target-base-url is required")?;
            let dir = a.target_dir.clone().context("--target-dir is required")?;
            let c = client(&a, Some(base))?;
            let mut repo = c.load().await?;
            std::fs::create_dir_all(&dir)?;
            for name in &a.target_names {
                let path = dir.join(file_name(name));
                let Some((_, t)) = repo.find(name).await? else {
                    bail!("no target {name} in the repository");
                };
                if std::fs::read(&path).is_ok_and(|b| crate::tuf::target_matches(&b, &t)) {
                    continue; // verified before: cached
                }
                let bytes = repo.download_target(name, &t).await?;
                let tmp = dir.join(format!(".{}.part", file_name(name)));
                std::fs::write(&tmp, &bytes)?;
                std::fs::rename(&tmp, &path)?;
            }
        }
    }
    Ok(())
}
