//! `fwgate devices`: register, import, list, show, assign, delete.

use super::*;
use crate::fleet::Inventory;
use crate::shown;

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
        /// FAS inventory: the device type (e.g. nodeBMC).
        #[arg(long)]
        device_type: Option<String>,
        /// FAS inventory: the manufacturer (e.g. intel).
        #[arg(long)]
        manufacturer: Option<String>,
        /// FAS inventory: the model (e.g. s2600).
        #[arg(long)]
        model: Option<String>,
    },
    /// Register devices from a CSV file with header id,tag,groups,production,hardware,
    /// deviceType,manufacturer,model (groups separated by ';'; only id is required). All or
    /// nothing.
    Import { file: PathBuf },
    /// List devices, in id order.
    List {
        #[arg(long)]
        after: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        /// Only devices matching this RSQL filter, e.g. 'tag==release;hardware==nrf52' (see
        /// the README's "Device filters").
        #[arg(long)]
        filter: Option<String>,
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

const COLUMNS: [&str; 8] = ["id", "tag", "groups", "production", "hardware", "deviceType", "manufacturer", "model"];

/// A FAS inventory from its three optional parts; none given, none.
fn inventory(
    device_type: Option<String>,
    manufacturer: Option<String>,
    model: Option<String>,
) -> Option<Box<Inventory>> {
    (device_type.is_some() || manufacturer.is_some() || model.is_some())
        .then(|| Box::new(Inventory { device_type, manufacturer, model }))
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
        if !COLUMNS.iter().any(|c| c.eq_ignore_ascii_case(h)) {
            bail!("{}: unknown column `{h}` (expected {})", path.display(), COLUMNS.join(","));
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
            inventory: inventory(get(col("deviceType")), get(col("manufacturer")), get(col("model"))),
        };
        spec.validate().with_context(|| format!("{}:{line}", path.display()))?;
        out.push(spec);
    }
    Ok(out)
}

fn print_device(v: &Value) {
    println!("device      {}", s(v, "id"));
    println!("tag         {}", s(v, "tag"));
    println!(
        "groups      {}",
        v["groups"]
            .as_array()
            .map(|g| g.iter().map(|x| shown(x.as_str().unwrap_or("")).into_owned()).collect::<Vec<_>>().join(","))
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
        println!("running     {} ({})", shown(version.as_str().unwrap_or("")), shown(&component));
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
            println!("  detail    {}", shown(d));
        }
        if let Some(w) = op["waiting"].as_str() {
            println!("  waiting   {}", shown(w));
        }
    }
}

pub async fn devices(cmd: DevicesCommand, remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    let out = |v: &Value, text: String| {
        if remote.json {
            println!("{v:#}");
        } else {
            println!("{text}");
        }
    };
    match cmd {
        DevicesCommand::Add { id, tag, groups, production, hardware, device_type, manufacturer, model } => {
            let spec = DeviceSpec {
                id,
                tag,
                groups,
                production,
                hardware,
                inventory: inventory(device_type, manufacturer, model),
            };
            let v = c.send(c.http.post(c.url("/api/v1/devices")).json(&spec)).await?;
            out(&v, format!("{} {}", spec.id, if v["created"] == 1 { "added" } else { "updated" }));
        }
        DevicesCommand::Import { file } => {
            let specs = read_devices_csv(&file)?;
            let n = specs.len();
            let v = c.send(c.http.post(c.url("/api/v1/devices")).json(&specs)).await?;
            out(&v, format!("{n} devices imported: {} added, {} updated", s(&v, "created"), s(&v, "updated")));
        }
        DevicesCommand::List { after, limit, filter } => {
            let mut q: Vec<(&str, String)> = Vec::new();
            if let Some(f) = filter {
                q.push(("filter", f));
            }
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
                let running = shown(d["running"].get("main").and_then(Value::as_str).unwrap_or("-"));
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
        std::fs::write(&p, "id,deviceType,Manufacturer,model\nx0c0s1b0,nodeBMC,intel,s2600\n").unwrap();
        let v = read_devices_csv(&p).unwrap();
        let inv = v[0].inventory.as_deref().unwrap();
        assert_eq!(
            (inv.device_type.as_deref(), inv.manufacturer.as_deref(), inv.model.as_deref()),
            (Some("nodeBMC"), Some("intel"), Some("s2600"))
        );
        std::fs::write(&p, "id,production\ndev-1,maybe\n").unwrap();
        assert!(read_devices_csv(&p).unwrap_err().to_string().contains(":2: production"));
        std::fs::write(&p, "id,colour\ndev-1,red\n").unwrap();
        assert!(read_devices_csv(&p).unwrap_err().to_string().contains("unknown column `colour`"));
        std::fs::write(&p, "id\nbad/id\n").unwrap();
        assert!(format!("{:#}", read_devices_csv(&p).unwrap_err()).contains("invalid device id"));
    }
}
