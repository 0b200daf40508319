//! Test doubles at the wire and the harness that starts the agent against them.

pub mod agent;
pub mod client;
pub mod fixtures;
pub mod jwt;
pub mod kube;
pub mod logs;
pub mod python;
pub mod spire;
pub mod sts;
pub mod upstream;
pub mod wire;

use agent::Agent;
use kube::{PodFixture, ServiceAccountFixture};

/// A kube API double and an STS double that trusts the kube double's signing key.
pub struct Cluster {
    pub kube: kube::FakeKube,
    pub sts: sts::FakeSts,
}

impl Cluster {
    /// Starts both doubles on loopback ports.
    pub async fn start() -> Self {
        let kube = kube::FakeKube::start().await;
        let sts = sts::FakeSts::start(&kube.jwks(), &kube.issuer()).await;
        Self { kube, sts }
    }

    /// Adds or replaces a pod, creating its service account first if it does not exist (as every
    /// namespace has its `default` one).
    pub fn add_pod(&self, pod: &PodFixture) {
        let (namespace, service_account) = (pod.namespace_str(), pod.service_account_str());
        if self.kube.get_service_account(namespace, service_account).is_none() {
            self.add_service_account(&kube::service_account(namespace, service_account));
        }
        self.kube.upsert_pod(pod);
    }

    /// Adds or replaces a service account.
    pub fn add_service_account(&self, service_account: &ServiceAccountFixture) {
        self.kube.upsert_service_account(service_account);
    }

    /// Starts the agent against both doubles with extra flags, and waits until it is ready.
    pub async fn agent(&self, extra: &[&str]) -> Agent {
        agent::spawn_agent(&self.kube.url(), &self.sts.url(), extra).await
    }

    /// Starts the agent against both doubles without waiting for it to be ready.
    pub async fn agent_unready(&self, extra: &[&str]) -> Agent {
        agent::start_agent(&self.kube.url(), &self.sts.url(), extra).await
    }

    /// Starts the agent against the kube double and another STS (moto).
    pub async fn agent_with_sts(&self, sts_url: &str, extra: &[&str]) -> Agent {
        agent::spawn_agent(&self.kube.url(), sts_url, extra).await
    }
}
