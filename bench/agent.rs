//! The agent under measurement: the real `imds-broker` binary, built by cargo in the same profile as
//! this bench, run as a child process so its memory can be read alone from `/proc/<pid>/status`.
//!
//! It reaches the kube double through a generated kubeconfig (plain HTTP on loopback) and the STS
//! double through `--sts-endpoint`. Its log goes to a file under `target/bench-logs/`. The child is
//! killed when the handle drops, so a failing bench leaves nothing running.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;

use crate::load;

/// The node name every simulated pod is scheduled on.
pub const NODE: &str = "bench-node";

/// The account of every simulated role.
pub const BASE_ARN: &str = "arn:aws:iam::111111111111:role/";

/// A running agent process.
pub struct Agent {
    pub imds: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

/// A free loopback port (bound, read back, released: the agent binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn scratch_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-logs");
    std::fs::create_dir_all(&dir).expect("create target/bench-logs");
    dir
}

impl Agent {
    /// Starts the agent against the doubles with `extra` flags and waits (bounded) until it is ready.
    pub async fn start(name: &str, kube_url: &str, sts_url: &str, extra: &[&str]) -> Self {
        let dir = scratch_dir();
        let kubeconfig = dir.join(format!("{name}.kubeconfig"));
        std::fs::write(&kubeconfig, crate::support::kube::kubeconfig_yaml(kube_url)).expect("write the kubeconfig");
        let log = dir.join(format!("{name}.log"));
        let imds = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let (imds_flag, admin_flag) = (imds.to_string(), admin.to_string());
        let child = Command::new(env!("CARGO_BIN_EXE_imds-broker"))
            .args(["--node-name", NODE, "--region", "us-east-1", "--sts-endpoint", sts_url])
            .args(["--listen", &imds_flag, "--metrics-listen", &admin_flag])
            .args(["--base-role-arn", BASE_ARN])
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("IMDS_BROKER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the agent log"))
            .spawn()
            .expect("start the imds-broker binary");
        let agent = Self {
            imds,
            admin,
            log,
            child,
        };
        agent.wait_ready(Duration::from_secs(120)).await;
        agent
    }

    async fn wait_ready(&self, within: Duration) {
        let ready = crate::support::client::poll(within, Duration::from_millis(20), || async {
            matches!(
                load::once(self.admin, [127, 0, 0, 1].into(), "/readyz").await,
                Some((StatusCode::OK, _))
            )
        })
        .await;
        assert!(
            ready,
            "the agent was not ready within {within:?}; see {}",
            self.log.display()
        );
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size and its high-water mark, in bytes, from `/proc/<pid>/status`.
    pub fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("read /proc/<pid>/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024)
        };
        Memory {
            rss: field("VmRSS:"),
            hwm: field("VmHWM:"),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Memory of a process, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss: u64,
    pub hwm: u64,
}
