//! The agent as a process: what the kernel knows of it. Its memory holds credentials and the IMDSv2
//! token key, so it writes no core file and is not dumpable (no `ptrace`, no `/proc/<pid>/mem` for
//! other processes of its user).

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::Cluster;
use crate::support::client::poll;

const NOBODY: u32 = 65534;

/// The agent binary against the doubles, as `NOBODY` through `setpriv` when `as_nobody`.
struct Agent {
    child: Child,
    kubeconfig: PathBuf,
}

impl Agent {
    fn spawn(cluster: &Cluster, as_nobody: bool) -> Self {
        Self::spawn_with(cluster, as_nobody, &[])
    }

    fn spawn_with(cluster: &Cluster, as_nobody: bool, extra: &[&str]) -> Self {
        let kubeconfig = std::env::temp_dir().join(format!(
            "imds-broker-process-{}-{}.yaml",
            std::process::id(),
            extra.len()
        ));
        std::fs::write(&kubeconfig, cluster.kube.kubeconfig_yaml()).unwrap();
        let binary = env!("CARGO_BIN_EXE_imds-broker");
        let mut command = if as_nobody {
            let mut setpriv = Command::new("setpriv");
            setpriv.args([
                format!("--reuid={NOBODY}"),
                format!("--regid={NOBODY}"),
                "--clear-groups".to_owned(),
                "--".to_owned(),
                binary.to_owned(),
            ]);
            setpriv
        } else {
            Command::new(binary)
        };
        command
            .args(["--node-name", "node-1", "--region", "us-east-1", "--sts-endpoint"])
            .arg(cluster.sts.url())
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().expect("start the agent binary");
        Self { child, kubeconfig }
    }

    /// The names of the process's threads.
    fn threads(&self) -> Vec<String> {
        std::fs::read_dir(self.proc("task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
            .map(|name| name.trim().to_owned())
            .collect()
    }

    fn proc(&self, file: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/{file}", self.child.id()))
    }

    /// Whether the process runs the agent's code yet (`setpriv` execs it under the same pid).
    fn is_the_agent(&self) -> bool {
        std::fs::read_link(self.proc("exe")).is_ok_and(|p| p.to_string_lossy().ends_with("imds-broker"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

#[tokio::test]
async fn the_agent_writes_no_core_file() {
    let cluster = Cluster::start().await;
    let agent = Agent::spawn(&cluster, false);
    let limited = poll(Duration::from_secs(10), Duration::from_millis(20), || async {
        let limits = std::fs::read_to_string(agent.proc("limits")).unwrap_or_default();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap_or_default();
        // "Max core file size  <soft>  <hard>  bytes"
        agent.is_the_agent() && core.split_whitespace().skip(4).take(2).eq(["0", "0"])
    })
    .await;
    assert!(
        limited,
        "core dumps are not off: {:?}",
        std::fs::read_to_string(agent.proc("limits"))
    );
}

#[tokio::test]
async fn the_agent_is_not_dumpable_even_by_its_own_user() {
    // Starting it as another user takes root; the README's test command runs as root.
    assert!(
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0),
        "run as root (sudo ./tests/run.sh): this test starts the agent as nobody"
    );
    let cluster = Cluster::start().await;
    let agent = Agent::spawn(&cluster, true);
    // A dumpable process of nobody owns its /proc files; the kernel gives a non-dumpable one's to root.
    let hidden = poll(Duration::from_secs(10), Duration::from_millis(20), || async {
        let status = std::fs::read_to_string(agent.proc("status")).unwrap_or_default();
        let as_nobody = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .is_some_and(|l| l.split_whitespace().nth(1) == Some(&NOBODY.to_string()));
        let owner = std::fs::metadata(agent.proc("status")).map(|m| (m.uid(), m.gid())).ok();
        agent.is_the_agent() && as_nobody && owner == Some((0, 0))
    })
    .await;
    assert!(hidden, "the agent is dumpable");
}

#[test]
fn version_names_the_release_and_the_git_revision() {
    let output = Command::new(env!("CARGO_BIN_EXE_imds-broker"))
        .arg("--version")
        .output()
        .expect("run the agent binary");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let revision = stdout
        .trim_end()
        .strip_prefix(&format!("imds-broker {} (rev ", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not `imds-broker <version> (rev <revision>)`: {stdout:?}"));
    // Built from a git checkout (as this test is), the revision is that of HEAD: what build.rs read.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned());
    match head {
        Some(head) => assert_eq!(revision, head),
        None => assert!(
            !revision.is_empty() && revision == env!("IMDS_BROKER_REVISION"),
            "outside git the revision is IMDS_BROKER_REVISION or `unknown`: {revision:?}"
        ),
    }
}

#[tokio::test]
async fn the_heap_is_trimmed_by_its_own_thread_unless_turned_off() {
    let cluster = Cluster::start().await;
    let trimming = Agent::spawn(&cluster, false);
    let started = poll(Duration::from_secs(10), Duration::from_millis(20), || async {
        trimming.is_the_agent() && trimming.threads().iter().any(|t| t.starts_with("tokio-rt"))
    })
    .await;
    assert!(started, "the agent's runtime did not start: {:?}", trimming.threads());
    assert!(
        trimming.threads().iter().any(|t| t == "heap-trim"),
        "{:?}",
        trimming.threads()
    );
    let off = Agent::spawn_with(&cluster, false, &["--heap-trim-interval", "0"]);
    let started = poll(Duration::from_secs(10), Duration::from_millis(20), || async {
        off.is_the_agent() && off.threads().iter().any(|t| t.starts_with("tokio-rt"))
    })
    .await;
    assert!(started, "{:?}", off.threads());
    assert!(!off.threads().iter().any(|t| t == "heap-trim"), "{:?}", off.threads());
}
