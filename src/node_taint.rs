//! `--startup-taint KEY`: nodes can register with a taint (kubelet `--register-with-taints`) that keeps
//! workloads off them until the agent serves: before the capture rule exists, a pod's SDK would reach
//! the node's own metadata service. Once the agent is ready, [`Remover`] takes that one taint off the
//! agent's own Node — every taint with that key, nothing else — and is done; it never puts it back.
//!
//! The update is a read-modify-write with the Node's resourceVersion, so a concurrent change (the
//! kubelet, another controller) makes it start over instead of being overwritten. Failures retry with
//! the watches' capped backoff. RBAC lets the agent update Nodes; the admission policy of the
//! `startup-taint` component (`deploy/components/startup-taint`) narrows that to its own Node and
//! this one taint.

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Removes the startup taint once ready.
pub struct Remover {
    /// The API server.
    pub client: kube::Client,
    /// This node.
    pub node_name: String,
    /// The taint's key.
    pub key: String,
}

impl Remover {
    /// Waits until every one of `ready` is true (what `/readyz` answers), then removes the taint;
    /// returns when done or on `shutdown`.
    pub async fn run(self, mut ready: Vec<watch::Receiver<bool>>, shutdown: CancellationToken) {
        for receiver in &mut ready {
            tokio::select! {
                () = shutdown.cancelled() => return,
                result = receiver.wait_for(|r| *r) => if result.is_err() { return },
            }
        }
        let api: Api<Node> = Api::all(self.client.clone());
        let mut failures = 0;
        loop {
            match self.remove_once(&api).await {
                Ok(removed) => {
                    tracing::info!(node = %self.node_name, taint = %self.key, removed, "ready: startup taint removed");
                    return;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(node = %self.node_name, taint = %self.key, %error, "cannot remove the startup taint; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(crate::watch::retry_delay(failures, rand::random())) => {}
                    }
                }
            }
        }
    }

    /// One read-modify-write; how many taints it removed.
    async fn remove_once(&self, api: &Api<Node>) -> kube::Result<usize> {
        let mut node = api.get(&self.node_name).await?;
        let Some(taints) = node.spec.as_mut().and_then(|s| s.taints.as_mut()) else {
            return Ok(0);
        };
        let before = taints.len();
        taints.retain(|t| t.key != self.key);
        let removed = before - taints.len();
        if removed > 0 {
            // The resourceVersion read above goes back with the update: a change since is a 409.
            api.replace(&self.node_name, &PostParams::default(), &node).await?;
        }
        Ok(removed)
    }
}
