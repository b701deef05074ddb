//! `fwgate serve` as a child process, for tests that drive the real binary (and kill it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_fwgate");

pub struct Serve {
    pub child: Child,
    pub admin: String,
    /// The embedded MQTT listener's port; 0 in external-broker mode.
    pub mqtt: u16,
    /// 0 on a planner or data-plane node, which serve no CoAP.
    pub coap: u16,
    pub log: PathBuf,
}

/// What `fwgate serve --ports-file` wrote: the addresses it bound.
pub fn port_of(ports: &serde_json::Value, key: &str) -> u16 {
    let addr = ports[key].as_str().unwrap_or_else(|| panic!("no {key} in the ports file: {ports}"));
    addr.parse::<std::net::SocketAddr>().unwrap().port()
}

impl Serve {
    pub async fn start(dir: &Path) -> Serve {
        Serve::start_with(dir, &[]).await
    }

    /// Starts `fwgate serve` with extra `FWGATE_*` overrides. Every listener binds port 0 and
    /// the gateway reports what it got (`--ports-file`), so no port is picked here and released
    /// for another process to take. A start that fails to bind is tried again, up to three
    /// times.
    pub async fn start_with(dir: &Path, env: &[(&str, String)]) -> Serve {
        Serve::start_wrapped(dir, env, &[]).await
    }

    /// [`Serve::start_with`], run through `wrapper` (`["faketime", "-f", "-1h"]`: a node whose
    /// clock is an hour behind).
    pub async fn start_wrapped(dir: &Path, env: &[(&str, String)], wrapper: &[&str]) -> Serve {
        let config = dir.join("fwgate.toml");
        std::fs::write(&config, "# defaults, with FWGATE_* overrides from the test\n").unwrap();
        for attempt in 1..=3 {
            let run = format!("{attempt}-{}", std::process::id());
            let (ports_file, log) = (dir.join(format!("ports-{run}.json")), dir.join(format!("serve-{run}.log")));
            let _ = std::fs::remove_file(&ports_file);
            let mut cmd = match wrapper.split_first() {
                Some((first, rest)) => {
                    let mut c = Command::new(first);
                    c.args(rest).arg(BIN);
                    c
                }
                None => Command::new(BIN),
            };
            let mut child = cmd
                .args(["serve", "--config"])
                .arg(&config)
                .arg("--ports-file")
                .arg(&ports_file)
                .env("FWGATE_STORE__DATA_DIR", dir.join("data"))
                .env("FWGATE_MQTT__LISTEN", "127.0.0.1:0")
                .env("FWGATE_ADMIN__LISTEN", "127.0.0.1:0")
                .env("FWGATE_COAP__LISTEN", "127.0.0.1:0")
                .env("FWGATE_ADMIN__TOKEN", "test-token")
                .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("fwgate binary starts");
            let deadline = Instant::now() + Duration::from_secs(30);
            let ports = loop {
                if let Ok(text) = std::fs::read(&ports_file) {
                    break Some(serde_json::from_slice::<serde_json::Value>(&text).expect("ports file is JSON"));
                }
                if child.try_wait().unwrap().is_some() {
                    break None;
                }
                assert!(
                    Instant::now() < deadline,
                    "fwgate serve not ready after 30 s; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let Some(ports) = ports else {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                assert!(
                    attempt < 3 && (text.contains("bind") || text.contains("not listening")),
                    "fwgate serve exited (attempt {attempt}); log:\n{text}"
                );
                continue;
            };
            let admin = format!("http://127.0.0.1:{}", port_of(&ports, "admin"));
            let s = Serve {
                child,
                admin,
                mqtt: if ports["mqtt"].is_null() { 0 } else { port_of(&ports, "mqtt") },
                coap: if ports["coap"].is_null() { 0 } else { port_of(&ports, "coap") },
                log,
            };
            let r = reqwest::get(format!("{}/readyz", s.admin)).await.expect("admin answers once ports are written");
            assert_eq!(r.status(), 200, "ready once the ports file is written");
            return s;
        }
        unreachable!("the loop returns or fails")
    }

    /// SIGKILL, and waits for the process to be gone: a crash at this point.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(BIN)
            .args(args)
            .env("FWGATE_SERVER", &self.admin)
            .env("FWGATE_TOKEN", "test-token")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails the test, saying what to install, when an external client it runs is missing: a
/// test that cannot run its tool has not passed.
pub fn require(tool: &str, package: &str) {
    let found =
        Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is not on PATH: this test runs it; install it with `apt-get install {package}` (.ci/run does)"
    );
}
