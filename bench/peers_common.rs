#![allow(dead_code)] // each benchmark uses a part

//! Shared by the peer benchmarks: free loopback ports, the external tools they compare
//! against (installed when missing where that is possible), and how a round is picked.

use std::net::{TcpListener, UdpSocket};
use std::process::Command;

pub fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The path of `tool` on PATH or in /usr/sbin.
pub fn find(tool: &str) -> Option<String> {
    let on_path = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().ok()?;
    if on_path.status.success() {
        return Some(String::from_utf8_lossy(&on_path.stdout).trim().to_owned());
    }
    let sbin = format!("/usr/sbin/{tool}");
    std::path::Path::new(&sbin).exists().then_some(sbin)
}

/// `tool`, installing Debian's `package` first when it is missing and we may (root, apt-get
/// present, and `install` asked for: a benchmark run, not a smoke test).
pub fn ensure(tool: &str, package: &str, install: bool) -> Option<String> {
    if let Some(p) = find(tool) {
        return Some(p);
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    if install && root && find("apt-get").is_some() {
        eprintln!("installing {package} for {tool}");
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}"))
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return find(tool);
        }
    }
    None
}

/// CPU time (user + system) of a process, in seconds, from /proc.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

/// The round whose `rate` is the median (the lower middle one for an even count): a table row
/// is one whole round, never columns taken from different rounds.
pub fn median_round<T>(rounds: &[T], rate: impl Fn(&T) -> f64) -> &T {
    let mut by_rate: Vec<&T> = rounds.iter().collect();
    by_rate.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
    by_rate[(by_rate.len() - 1) / 2]
}
