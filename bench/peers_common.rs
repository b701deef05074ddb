#![allow(dead_code)] // each benchmark uses a part

//! Shared by the peer benchmarks: free loopback ports, the external tools they compare
//! against (installed when missing where that is possible), and how a round is picked.

use std::net::{TcpListener, UdpSocket};
use std::process::Command;

use openssl::ssl::{SslContext, SslContextBuilder, SslMethod, SslVersion};

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

/// A DTLS 1.2 client context that offers only TLS_PSK_WITH_AES_128_CCM_8 (RFC 7252's
/// mandatory suite) with `device` as the PSK identity and `key` as the key, as
/// `coap-client-openssl -u DEVICE -k KEY` does.
pub fn psk_client(device: &str, key: &str) -> anyhow::Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_cipher_list("PSK-AES128-CCM8")?;
    let (device, key) = (device.as_bytes().to_vec(), key.as_bytes().to_vec());
    b.set_psk_client_callback(move |_ssl, _hint, identity, psk| {
        identity[..device.len()].copy_from_slice(&device);
        identity[device.len()] = 0;
        psk[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    Ok(b.build())
}
