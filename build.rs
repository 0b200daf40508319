//! Build script: names the git revision the binary is built from, for `--version` and the
//! `imds_broker_build_info` metric (`IMDS_BROKER_REVISION` at compile time).
//!
//! The revision is `git rev-parse --short=12 HEAD` when the sources are a git checkout; outside one
//! (a source tarball, a container build without `.git`) it is the `IMDS_BROKER_REVISION` environment
//! variable, and `unknown` without either. The script reruns only when HEAD moves (`HEAD` and the
//! ref it points to) or that variable changes, not on every source edit.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=IMDS_BROKER_REVISION");
    let revision = git(&["rev-parse", "--short=12", "HEAD"])
        .or_else(|| {
            std::env::var("IMDS_BROKER_REVISION")
                .ok()
                .filter(|r| !r.trim().is_empty())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    // HEAD itself, and the ref it names (a branch moves without HEAD changing); in a worktree both
    // live in different directories, which `--git-path` resolves. A ref that is only in packed-refs
    // has no file of its own: watch packed-refs then. A path that does not exist is never named,
    // as Cargo would rerun the script on every build.
    let mut watched = vec!["HEAD".to_owned()];
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(reference);
        watched.push("packed-refs".to_owned());
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name])
            && std::path::Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rustc-env=IMDS_BROKER_REVISION={}", revision.trim());
}

/// One line of git's output, or `None` when git is missing, fails or prints nothing.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}
