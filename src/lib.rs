//! imds-broker: per-pod AWS IAM credentials over an EC2-instance-metadata-compatible endpoint.
//!
//! A pod's SDK asks `169.254.169.254` for credentials; the node DNATs that to this agent, which finds
//! the pod by source IP, resolves its role, mints a service-account token bound to that pod with the
//! TokenRequest API,
//! exchanges it at STS with `AssumeRoleWithWebIdentity` (unsigned: the node holds no AWS credentials),
//! caches the STS session per pod and answers exactly as IMDS does.
//!
//! Three tokens, three names: an *IMDSv2 token* is what `PUT /latest/api/token` hands a pod
//! ([`server::imds_token`]); a *service-account token* is what TokenRequest mints for STS
//! ([`sa_token`]); the *STS session token* is part of the credentials. The agent's own IMDSv2 token at
//! the node's IMDS is its *upstream token* ([`metadata`]). A *pod token* is the projected
//! service-account token a pod presents itself, verified against the API server's keys ([`pod_token`]).
//!
//! # Layout
//! Dependencies point one way, top to bottom:
//! - [`app`], [`config`], [`shutdown`], [`telemetry`]: composition, flags, signals, logging;
//! - [`server`]: the IMDS and admin endpoints — `route` (method and target alone), `imds` (the
//!   handler), `imds_token` (IMDSv2 tokens), `document` (EC2's documents), `response` (the one place
//!   failures become HTTP);
//! - [`metrics`]: the registry and its encoding;
//! - [`credentials`]: the per-pod STS session cache (exchanges on their own tasks, remembered
//!   failures, the node's exchange budget in `limit`, timing policies in `schedule`);
//! - [`events`]: Kubernetes Events on pods whose credentials fail for a reason their owner can fix;
//!   [`audit`]: one log line per credential issued;
//! - [`pods`], [`roles`], [`sa_token`], [`sts`]: who is calling, which role, a service-account token
//!   bound to the pod, the STS session; [`pod_token`]: who a presented token says is calling;
//! - [`metadata`]: the rest of the metadata tree, proxied through an allow-list or synthesised;
//! - [`namespaces`]: which namespaces require IMDSv2 (a Namespace annotation);
//! - [`watch`]: the list-then-watch loop under both watchers (410, idle watches, capped retries);
//! - [`netfilter`]: the iptables rules that bring pods' metadata traffic to this agent;
//! - [`node_taint`]: takes the node's startup taint off once the agent is ready;
//! - [`federation`]: the `oidc` and `trust-policy` commands (issuer documents, IAM trust policies);
//! - [`workload`]: the shared vocabulary.
#![forbid(unsafe_code)]

pub mod app;
pub mod audit;
pub mod config;
pub mod credentials;
pub mod events;
pub mod federation;
pub mod metadata;
pub mod metrics;
pub mod namespaces;
pub mod netfilter;
pub mod node_taint;
pub mod pod_token;
pub mod pods;
pub mod roles;
pub mod sa_token;
pub mod server;
pub mod shutdown;
pub mod spire;
pub mod sts;
pub mod telemetry;
pub mod watch;
pub mod workload;
