//! `fwgate nodes`: the data-plane nodes a planner has heard from, and how far behind they are.

use anyhow::Result;

use super::{s, Client, Remote};

pub async fn nodes(remote: &Remote) -> Result<()> {
    let c = Client::new(remote);
    let v = c.send(c.http.get(c.url("/api/v1/nodes"))).await?;
    if remote.json {
        println!("{v:#}");
        return Ok(());
    }
    let list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no data-plane nodes heard from (is this a planner, cluster.role = \"planner\"?)");
        return Ok(());
    }
    println!(
        "{:<24} {:<6} {:>8} {:>8} {:>10} {:>12} {:>8} {:>13}",
        "NODE", "STATE", "HEARD", "VIEWS", "STATUSES", "BLOCKS", "LAG_MS", "DELAY_P50/P99"
    );
    for n in &list {
        let state = if n["gone"].as_bool() == Some(true) { "gone" } else { "up" };
        println!(
            "{:<24} {:<6} {:>7}s {:>8} {:>10} {:>12} {:>8} {:>13}",
            s(n, "node"),
            state,
            s(n, "heard_secs_ago"),
            s(n, "views"),
            s(n, "statuses"),
            s(n, "blocks"),
            s(n, "lag_ms"),
            format!("{}/{} ms", s(n, "delay_p50_ms"), s(n, "delay_p99_ms")),
        );
    }
    Ok(())
}
