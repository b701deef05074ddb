//! A real Mosquitto 2 broker on a loopback port, started by a test, restartable on the same
//! port, and killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mosquitto {
    child: Child,
    pub port: u16,
    conf: PathBuf,
    pub log: PathBuf,
}

fn binary() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

impl Mosquitto {
    /// Starts a broker with `extra` configuration lines (auth, ACL); without a
    /// `password_file` in them, anonymous clients are allowed. A port taken between choosing
    /// and binding it is tried again, up to three times.
    pub async fn start(dir: &Path, extra: &str) -> Mosquitto {
        for attempt in 1..=3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let conf = dir.join(format!("mosquitto-{port}.conf"));
            let anonymous = if extra.contains("password_file") { "" } else { "allow_anonymous true\n" };
            let text = format!(
                "listener {port} 127.0.0.1\n{anonymous}persistence false\nlog_dest stderr\nlog_type error\n\
                 log_type warning\nmax_queued_messages 100000\n{extra}\n"
            );
            std::fs::write(&conf, text).unwrap();
            let log = dir.join(format!("mosquitto-{port}.log"));
            let child = spawn(&conf, &log);
            let mut m = Mosquitto { child, port, conf, log };
            if m.wait_up().await {
                return m;
            }
            let text = std::fs::read_to_string(&m.log).unwrap_or_default();
            assert!(attempt < 3, "mosquitto did not start; log:\n{text}");
        }
        unreachable!("the loop returns or fails")
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the broker (every connection drops) and starts it again on the same port.
    pub async fn restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.child = spawn(&self.conf, &self.log);
            if self.wait_up().await {
                return;
            }
            // The port may linger a moment after the kill.
            assert!(Instant::now() < deadline, "mosquitto did not come back on {}", self.port);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the broker accepts connections within 10 s (false if it exited).
    async fn wait_up(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

fn spawn(conf: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(binary()).arg("-c").arg(conf).stdout(Stdio::null()).stderr(log).spawn().expect("mosquitto runs")
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
