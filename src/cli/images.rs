//! `fwgate images`: upload, list and show firmware images.

use super::*;

#[derive(Subcommand)]
pub enum ImagesCommand {
    /// Upload an image file.
    Add {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// A device type the image is for (repeatable); none means any.
        #[arg(long = "hw")]
        hardware: Vec<String>,
        /// The TUF target these bytes are: refused unless length and sha256 match it.
        #[arg(long)]
        target: Option<String>,
        /// The repository of --target: production (default) or ci.
        #[arg(long)]
        repo: Option<String>,
        /// A FAS imagefile JSON (deviceType, manufacturer, models, target, tags,
        /// firmwareVersion, semanticFirmwareVersion, …) giving the image its identity for
        /// FAS-style actions.
        #[arg(long)]
        meta: Option<PathBuf>,
    },
    /// List images.
    List,
}

pub async fn images(cmd: ImagesCommand, remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    match cmd {
        ImagesCommand::Add { file, name, version, hardware, target, repo, meta } => {
            let data = tokio::fs::read(&file).await.with_context(|| format!("reading {}", file.display()))?;
            // Read before the upload, so a bad file changes nothing.
            let identity: Option<crate::firmware::ImageIdentity> = match &meta {
                Some(path) => {
                    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                    Some(
                        serde_json::from_str(&text)
                            .with_context(|| format!("{} is not a FAS imagefile", path.display()))?,
                    )
                }
                None => None,
            };
            let ident_path = format!("/api/v1/images/{name}/{version}/identity");
            let mut q = vec![("name", name), ("version", version)];
            if let Some(t) = target {
                q.push(("target", t));
            }
            if let Some(r) = repo {
                q.push(("repo", r));
            }
            if !hardware.is_empty() {
                q.push(("hardware", hardware.join(",")));
            }
            let mut v = c.send(c.http.post(c.url("/api/v1/images")).query(&q).body(data)).await?;
            if let Some(identity) = identity {
                let created = v["created"].clone();
                v = c
                    .send(c.http.put(c.url(&ident_path)).json(&identity))
                    .await
                    .context("the image was stored, its identity was not: fix the file and run the command again")?;
                v["created"] = created;
            }
            if remote.json {
                println!("{v:#}");
            } else {
                let what = if v["created"].as_bool() == Some(true) { "added" } else { "already present (same bytes)" };
                println!(
                    "{}@{} {what}: {} bytes, sha256 {}",
                    s(&v, "name"),
                    s(&v, "version"),
                    s(&v, "length"),
                    s(&v, "sha256")
                );
                let i = &v["identity"];
                if i.is_object() {
                    let tags: Vec<&str> =
                        i["tags"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                    println!(
                        "identity: target {}, firmwareVersion {}, deviceType {}, manufacturer {}, tags {}",
                        s(i, "target"),
                        s(i, "firmwareVersion"),
                        s(i, "deviceType"),
                        s(i, "manufacturer"),
                        tags.join(",")
                    );
                }
            }
        }
        ImagesCommand::List => {
            let v = c.send(c.http.get(c.url("/api/v1/images"))).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            println!("{:<24} {:<16} {:>10}  {:<16} HARDWARE", "NAME", "VERSION", "BYTES", "SHA256");
            for i in v.as_array().into_iter().flatten() {
                let hw = i["hardware"]
                    .as_array()
                    .map(|h| h.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                    .unwrap_or_default();
                let sha = s(i, "sha256");
                println!(
                    "{:<24} {:<16} {:>10}  {:<16} {}",
                    s(i, "name"),
                    s(i, "version"),
                    s(i, "length"),
                    &sha[..sha.len().min(16)],
                    if hw.is_empty() { "any".into() } else { hw }
                );
            }
        }
    }
    Ok(())
}
