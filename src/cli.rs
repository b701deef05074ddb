//! The `fwgate` command line. `serve` and `config check` run locally; every operator command
//! is an HTTP call to the admin API (`--server`, `FWGATE_SERVER`; token from `--token`,
//! `FWGATE_TOKEN`, or the gateway's generated `<data_dir>/admin.token`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::fleet::DeviceSpec;

mod load;
mod tags;
mod tuf;

const DEFAULT_CONFIG: &str = "config/fwgate.toml";

#[derive(Parser)]
#[command(name = "fwgate", version, about = "Firmware-update gateway for large device fleets")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Remote {
    /// Admin API address.
    #[arg(long, env = "FWGATE_SERVER", default_value = "http://127.0.0.1:8080", global = true)]
    pub server: String,
    /// Admin bearer token (default: read <data_dir>/admin.token of --config).
    #[arg(long, env = "FWGATE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Config file, used to find the generated admin token.
    #[arg(long, env = "FWGATE_CONFIG", default_value = DEFAULT_CONFIG, global = true)]
    pub config: PathBuf,
    /// Print the server's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway: MQTT broker, admin API, planner.
    Serve {
        #[arg(long, env = "FWGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Once every listener is up, write the addresses they are bound to as JSON
        /// (`{"admin", "mqtt", "mqtt_v5", "coap"}`) to this file: how a script that starts the
        /// gateway on port 0 learns its ports.
        #[arg(long)]
        ports_file: Option<PathBuf>,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Firmware images.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Devices and their assignments.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Foundries-style waves: promote a version to the devices of a tag, in rollouts, then
    /// to all of them.
    Waves {
        #[command(subcommand)]
        command: WavesCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Tags: which version a tag's devices get by default, and from which wave.
    Tags {
        #[command(subcommand)]
        command: tags::TagsCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// TUF: refresh the gateway's repositories, or run a standalone TUF client.
    Tuf {
        #[command(subcommand)]
        command: tuf::TufCommand,
        #[command(flatten)]
        remote: Remote,
    },
    /// Simulate devices against a running gateway and report how fast and how correctly they
    /// update (MQTT, CoAP DFU or CoAP Block2).
    Load(Box<load::LoadArgs>),
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file (with FWGATE_* overrides applied); reports the first invalid key.
    Check {
        #[arg(long, env = "FWGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

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
    },
    /// List images.
    List,
}

#[derive(Subcommand)]
pub enum DevicesCommand {
    /// Register a device (or update its tag, groups, production flag, hardware).
    Add {
        id: String,
        #[arg(long)]
        tag: Option<String>,
        /// A group (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long)]
        production: bool,
        #[arg(long = "hw")]
        hardware: Option<String>,
    },
    /// Register devices from a CSV file with header id,tag,groups,production,hardware
    /// (groups separated by ';'; only id is required). All or nothing.
    Import { file: PathBuf },
    /// List devices, in id order.
    List {
        #[arg(long)]
        after: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Assign an image (NAME@VERSION) to a device.
    Assign {
        id: String,
        image: String,
        /// Firmware target of the device (default: main).
        #[arg(long)]
        component: Option<String>,
    },
    /// A device's running and assigned versions, progress, last seen and outcome.
    Show { id: String },
    /// Delete a device: its queued operations are withdrawn, it leaves every wave, and its
    /// record and history are removed. Registered again, it starts afresh.
    Delete { id: String },
    /// Print a device's MQTT password (when mqtt.auth is on).
    Token { id: String },
}

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

/// Reads the CSV of `devices import`; errors name the line.
pub fn read_devices_csv(path: &Path) -> Result<Vec<DeviceSpec>> {
    let mut r = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let headers = r.headers()?.clone();
    let col = |name: &str| headers.iter().position(|h| h.eq_ignore_ascii_case(name));
    let id_col = col("id").ok_or_else(|| anyhow!("{}: the header has no `id` column", path.display()))?;
    for h in headers.iter() {
        if !["id", "tag", "groups", "production", "hardware"].contains(&h.to_ascii_lowercase().as_str()) {
            bail!("{}: unknown column `{h}` (expected id,tag,groups,production,hardware)", path.display());
        }
    }
    let mut out = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let line = i + 2;
        let rec = rec.with_context(|| format!("{}:{line}", path.display()))?;
        let get = |c: Option<usize>| c.and_then(|c| rec.get(c)).filter(|v| !v.is_empty()).map(str::to_owned);
        let production = match get(col("production")).as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("false") | Some("no") | Some("0") => false,
            Some("true") | Some("yes") | Some("1") => true,
            Some(v) => bail!("{}:{line}: production must be true or false, not {v:?}", path.display()),
        };
        let spec = DeviceSpec {
            id: get(Some(id_col)).ok_or_else(|| anyhow!("{}:{line}: empty id", path.display()))?,
            tag: get(col("tag")),
            groups: get(col("groups"))
                .map(|g| g.split(';').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
                .unwrap_or_default(),
            production,
            hardware: get(col("hardware")),
        };
        spec.validate().with_context(|| format!("{}:{line}", path.display()))?;
        out.push(spec);
    }
    Ok(out)
}

#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    fn new(remote: &Remote) -> Client {
        let token = remote.token.clone().or_else(|| {
            let dir = crate::load_config(&remote.config)
                .map(|c| c.store.data_dir)
                .unwrap_or_else(|_| PathBuf::from("./data"));
            std::fs::read_to_string(dir.join("admin.token")).ok().map(|t| t.trim().to_owned())
        });
        Client { http: reqwest::Client::new(), base: remote.server.trim_end_matches('/').to_owned(), token }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req.send().await.with_context(|| format!("cannot reach the gateway at {}", self.base))?;
        let status = resp.status();
        let body = resp.text().await?;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        if !status.is_success() {
            let msg = v.get("error").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| v.to_string());
            if status == reqwest::StatusCode::UNAUTHORIZED {
                bail!("{msg} (set FWGATE_TOKEN or --token; the gateway writes one to <data_dir>/admin.token)");
            }
            bail!("{msg} (HTTP {status})");
        }
        Ok(v)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(x)) => x.clone(),
        Some(x) => x.to_string(),
    }
}

fn ago(v: &Value) -> String {
    match v.as_u64() {
        None => "never".into(),
        Some(t) => format!("{} s ago", crate::now_secs().saturating_sub(t)),
    }
}

fn print_device(v: &Value) {
    println!("device      {}", s(v, "id"));
    println!("tag         {}", s(v, "tag"));
    println!(
        "groups      {}",
        v["groups"]
            .as_array()
            .map(|g| g.iter().map(|x| x.as_str().unwrap_or("")).collect::<Vec<_>>().join(","))
            .unwrap_or_default()
    );
    println!("production  {}", s(v, "production"));
    println!("hardware    {}", s(v, "hardware"));
    println!("last seen   {}", ago(&v["last_seen"]));
    let running = v["running"].as_object().cloned().unwrap_or_default();
    if running.is_empty() {
        println!("running     - (no Status yet)");
    }
    for (component, version) in running {
        println!("running     {} ({component})", version.as_str().unwrap_or(""));
    }
    let ops = v["operations"].as_array().cloned().unwrap_or_default();
    if ops.is_empty() {
        println!("assigned    - (nothing assigned)");
    }
    for op in ops {
        println!(
            "assigned    {} ({}) — {} #{}, weight {}",
            s(&op, "image"),
            s(&op, "component"),
            s(&op, "origin"),
            s(&op, "seq"),
            s(&op, "weight")
        );
        println!("  outcome   {}", s(&op, "state"));
        println!(
            "  progress  {:.1}% ({} of {} bytes)",
            op["progress_percent"].as_f64().unwrap_or(0.0),
            s(&op, "offset"),
            s(&op, "length")
        );
        if let Some(d) = op["detail"].as_str() {
            println!("  detail    {d}");
        }
        if let Some(w) = op["waiting"].as_str() {
            println!("  waiting   {w}");
        }
    }
}

async fn images(cmd: ImagesCommand, remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    match cmd {
        ImagesCommand::Add { file, name, version, hardware, target, repo } => {
            let data = tokio::fs::read(&file).await.with_context(|| format!("reading {}", file.display()))?;
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
            let v = c.send(c.http.post(c.url("/api/v1/images")).query(&q).body(data)).await?;
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

async fn devices(cmd: DevicesCommand, remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    let out = |v: &Value, text: String| {
        if remote.json {
            println!("{v:#}");
        } else {
            println!("{text}");
        }
    };
    match cmd {
        DevicesCommand::Add { id, tag, groups, production, hardware } => {
            let spec = DeviceSpec { id, tag, groups, production, hardware };
            let v = c.send(c.http.post(c.url("/api/v1/devices")).json(&spec)).await?;
            out(&v, format!("{} {}", spec.id, if v["created"] == 1 { "added" } else { "updated" }));
        }
        DevicesCommand::Import { file } => {
            let specs = read_devices_csv(&file)?;
            let n = specs.len();
            let v = c.send(c.http.post(c.url("/api/v1/devices")).json(&specs)).await?;
            out(&v, format!("{n} devices imported: {} added, {} updated", s(&v, "created"), s(&v, "updated")));
        }
        DevicesCommand::List { after, limit } => {
            let mut q: Vec<(&str, String)> = Vec::new();
            if let Some(a) = after {
                q.push(("after", a));
            }
            if let Some(l) = limit {
                q.push(("limit", l.to_string()));
            }
            let v = c.send(c.http.get(c.url("/api/v1/devices")).query(&q)).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            println!("{:<38} {:<12} {:<5} {:<12} {:<14} LAST SEEN", "ID", "TAG", "PROD", "HARDWARE", "RUNNING");
            for d in v.as_array().into_iter().flatten() {
                let running = d["running"].get("main").and_then(Value::as_str).unwrap_or("-");
                println!(
                    "{:<38} {:<12} {:<5} {:<12} {:<14} {}",
                    s(d, "id"),
                    s(d, "tag"),
                    s(d, "production"),
                    s(d, "hardware"),
                    running,
                    ago(&d["last_seen"])
                );
            }
        }
        DevicesCommand::Assign { id, image, component } => {
            let body = serde_json::json!({"image": image, "component": component});
            let v = c.send(c.http.put(c.url(&format!("/api/v1/devices/{id}/assignment"))).json(&body)).await?;
            out(&v, format!("{id}: {} assigned ({}), state {}", s(&v, "image"), s(&v, "component"), s(&v, "state")));
        }
        DevicesCommand::Delete { id } => {
            let v = c.send(c.http.delete(c.url(&format!("/api/v1/devices/{id}")))).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                println!("deleted {id} ({} unfinished operations withdrawn)", n(&v, "unfinished_operations"));
            }
        }
        DevicesCommand::Show { id } => {
            let v = c.send(c.http.get(c.url(&format!("/api/v1/devices/{id}")))).await?;
            if remote.json {
                println!("{v:#}");
            } else {
                print_device(&v);
            }
        }
        DevicesCommand::Token { id } => {
            let v = c.send(c.http.post(c.url(&format!("/api/v1/devices/{id}/token")))).await?;
            out(&v, s(&v, "token"));
        }
    }
    Ok(())
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
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

async fn waves(cmd: WavesCommand, remote: &Remote) -> Result<()> {
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

async fn tuf_remote(cmd: tuf::TufCommand, remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    match cmd {
        tuf::TufCommand::Refresh { repo } => {
            let repos = match repo {
                Some(r) => vec![r],
                None => {
                    let v = c.send(c.http.get(c.url("/api/v1/tuf"))).await?;
                    v["repositories"].as_array().into_iter().flatten().map(|r| s(r, "repo")).collect()
                }
            };
            if repos.is_empty() {
                bail!("the gateway has no TUF repository configured ([tuf] in its config)");
            }
            for r in repos {
                let v = c.send(c.http.post(c.url(&format!("/api/v1/tuf/{r}/refresh")))).await?;
                if remote.json {
                    println!("{v:#}");
                } else {
                    println!(
                        "{r}: verified — root v{}, timestamp v{}, snapshot v{}, targets v{}; {} targets",
                        n(&v, "root_version"),
                        n(&v, "timestamp_version"),
                        n(&v, "snapshot_version"),
                        n(&v, "targets_version"),
                        v["targets"].as_array().map_or(0, Vec::len)
                    );
                }
            }
        }
        tuf::TufCommand::Status => {
            let v = c.send(c.http.get(c.url("/api/v1/tuf"))).await?;
            if remote.json {
                println!("{v:#}");
                return Ok(());
            }
            for r in v["repositories"].as_array().into_iter().flatten() {
                let ver = &r["verified"];
                if ver.is_null() {
                    println!("{}: not verified (see the gateway log; `fwgate tuf refresh`)", s(r, "repo"));
                    continue;
                }
                println!(
                    "{}: targets v{}, expires in {} s",
                    s(r, "repo"),
                    n(ver, "targets_version"),
                    n(ver, "expires").saturating_sub(crate::now_secs())
                );
                for t in ver["targets"].as_array().into_iter().flatten() {
                    let tags = t["tags"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    println!("  {:<32} {:>10} {}  tags {}", s(t, "name"), n(t, "length"), &s(t, "sha256")[..16], tags);
                }
            }
        }
        tuf::TufCommand::Client(args) => tuf::client_command(args).await?,
    }
    Ok(())
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

/// Raises the open-file limit to its hard maximum: every device connection is a socket, and
/// the default soft limit (often 1024) would cap a gateway or a load run far below its
/// configured size.
pub fn raise_fd_limit() {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            if soft < hard {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            }
        }
    }
}

async fn serve(path: &Path, ports_file: Option<&Path>) -> Result<()> {
    let config = crate::load_config(path).with_context(|| format!("config {}", path.display()))?;
    init_logging(&config.log.level);
    raise_fd_limit();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let gateway = crate::start(config, shutdown.clone()).await?;
    tracing::info!(admin = %gateway.admin, "fwgate ready");
    if let Some(file) = ports_file {
        write_ports(&gateway, file).with_context(|| format!("--ports-file {}", file.display()))?;
    }
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        stop.cancel();
    });
    gateway.wait().await;
    Ok(())
}

/// Writes where the gateway listens, atomically (a reader sees the whole file or none).
fn write_ports(gateway: &crate::Gateway, file: &Path) -> Result<()> {
    let ports = serde_json::json!({
        "admin": gateway.admin,
        "mqtt": gateway.mqtt.map(|m| m.v4),
        "mqtt_v5": gateway.mqtt.and_then(|m| m.v5),
        "coap": gateway.coap,
    });
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&ports)?)?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}

/// Runs the command line; the binary's `main` is this.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config, ports_file } => serve(&config, ports_file.as_deref()).await,
        Command::Config { command: ConfigCommand::Check { config } } => {
            crate::load_config(&config).with_context(|| config.display().to_string())?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Images { command, remote } => images(command, &remote).await,
        Command::Devices { command, remote } => devices(command, &remote).await,
        Command::Waves { command, remote } => waves(command, &remote).await,
        Command::Tags { command, remote } => tags::tags(command, &remote).await,
        Command::Tuf { command, remote } => tuf_remote(command, &remote).await,
        Command::Load(args) => load::load(*args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_import_reads_columns_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, "id,tag,groups,production,hardware\ndev-1,prod,eu;canary,true,nrf52\ndev-2,,,,\n").unwrap();
        let v = read_devices_csv(&p).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].groups, ["eu", "canary"]);
        assert!(v[0].production);
        assert_eq!(v[1], DeviceSpec { id: "dev-2".into(), ..Default::default() });
        std::fs::write(&p, "id,production\ndev-1,maybe\n").unwrap();
        assert!(read_devices_csv(&p).unwrap_err().to_string().contains(":2: production"));
        std::fs::write(&p, "id,colour\ndev-1,red\n").unwrap();
        assert!(read_devices_csv(&p).unwrap_err().to_string().contains("unknown column `colour`"));
        std::fs::write(&p, "id\nbad/id\n").unwrap();
        assert!(format!("{:#}", read_devices_csv(&p).unwrap_err()).contains("invalid device id"));
    }
}
