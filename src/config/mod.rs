//! Command-line flags (each with an environment fallback) and their translation into one typed
//! `Config` per component. Validation happens here, once; components trust what they receive.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;

use crate::roles::{BaseArn, Resolver};
use crate::server::imds::Imdsv2;
use crate::telemetry::LogFormat;
use crate::workload::RoleArn;
use crate::{credentials, events, metadata, netfilter, sa_token, server, spire, sts, watch};

/// What `--version` prints after the name: the crate's version and the git revision it was built from
/// (`build.rs`).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (rev ", env!("IMDS_BROKER_REVISION"), ")");

/// imds-broker: per-pod AWS IAM credentials over an EC2-metadata-compatible endpoint, minted from
/// pod-bound service-account tokens at STS. The node needs no AWS credentials.
#[derive(Debug, Parser)]
#[command(name = "imds-broker", version = VERSION, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    /// A maintenance command; without one, the agent runs.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The agent's flags.
    #[command(flatten)]
    pub run: Args,
}

/// Maintenance commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Manage the iptables rules that capture 169.254.169.254.
    Iptables {
        /// What to do with them.
        #[command(subcommand)]
        action: IptablesAction,
    },
    /// The cluster's service-account issuer documents, for IAM's OIDC provider.
    Oidc {
        /// What to do with them.
        #[command(subcommand)]
        action: OidcAction,
    },
    /// Print the IAM trust policy that lets one service account (or SPIFFE ID) assume a role.
    TrustPolicy(TrustPolicyArgs),
}

/// What to do with the issuer documents.
#[derive(Debug, clap::Subcommand)]
pub enum OidcAction {
    /// Write the API server's discovery document and key set laid out for static hosting (S3, any
    /// HTTPS server), or with --check compare a published copy with the live keys.
    Export(OidcExportArgs),
}

/// `oidc export`'s flags.
#[derive(Debug, clap::Args)]
pub struct OidcExportArgs {
    /// The public URL the documents are published at; the API server's --service-account-issuer must
    /// be exactly this URL.
    #[arg(long, required_unless_present = "check")]
    pub issuer_url: Option<String>,

    /// The directory to write (DIR/.well-known/openid-configuration and DIR/openid/v1/jwks).
    #[arg(long, required_unless_present = "check", conflicts_with = "check")]
    pub out: Option<std::path::PathBuf>,

    /// Compare the copy published at this URL (or in this directory, same layout) with the live keys;
    /// exit 1 naming the missing, extra or changed key ids when they differ.
    #[arg(long, value_name = "URL|DIR")]
    pub check: Option<String>,
}

/// `trust-policy`'s flags.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("subject").required(true).args(["service_account", "spiffe_id"])))]
pub struct TrustPolicyArgs {
    /// The issuer URL exactly as in the tokens' `iss` (https://…): the API server's
    /// --service-account-issuer, or SPIRE's OIDC discovery provider.
    #[arg(long)]
    pub issuer: String,

    /// The AWS account holding the OIDC provider.
    #[arg(long)]
    pub account: String,

    /// The service account's namespace ('*' and '?' are IAM wildcards).
    #[arg(long, requires = "service_account", conflicts_with = "spiffe_id")]
    pub namespace: Option<String>,

    /// The service account ('*' and '?' are IAM wildcards).
    #[arg(long, requires = "namespace")]
    pub service_account: Option<String>,

    /// A SPIFFE ID instead of a service account (spiffe://<trust domain>/<path>).
    #[arg(long)]
    pub spiffe_id: Option<String>,

    /// The tokens' audience.
    #[arg(long, default_value = "sts.amazonaws.com")]
    pub audience: String,

    /// The AWS partition.
    #[arg(long, default_value = "aws")]
    pub partition: String,

    /// Print only the OIDC provider's ARN.
    #[arg(long)]
    pub provider_arn: bool,
}

impl TrustPolicyArgs {
    /// The policy request these flags describe.
    pub fn request(&self) -> crate::federation::trust_policy::Request {
        use crate::federation::trust_policy::{Request, Subject};
        let subject = match (&self.spiffe_id, &self.namespace, &self.service_account) {
            (Some(id), _, _) => Subject::Spiffe(id.clone()),
            (None, namespace, name) => Subject::ServiceAccount {
                namespace: namespace.clone().unwrap_or_default(),
                name: name.clone().unwrap_or_default(),
            },
        };
        Request {
            issuer: self.issuer.clone(),
            subject,
            audience: self.audience.clone(),
            account: self.account.clone(),
            partition: self.partition.clone(),
        }
    }
}

/// What to do with the iptables rules.
#[derive(Debug, clap::Subcommand)]
pub enum IptablesAction {
    /// Remove every rule and chain the agent installed (IPv4 and IPv6).
    Uninstall,
    /// Install the capture and keep it in place until SIGTERM, vouching for it in a status file the
    /// server's readiness follows: the privileged half of a split DaemonSet.
    Reconcile(ReconcileArgs),
}

/// The capture's flags, shared by the agent (`--iptables`) and `iptables reconcile`.
#[derive(Debug, clap::Args)]
pub struct CaptureArgs {
    /// Interfaces whose metadata traffic is captured, as iptables patterns: cali+, eni+, veth+, cni0, or
    /// !eth0 to exclude one (comma-separated or repeated).
    #[arg(long, env = "IMDS_BROKER_HOST_INTERFACE", value_delimiter = ',')]
    pub host_interface: Vec<String>,

    /// The node's addresses, where captured traffic is sent (the downward API's status.hostIP, or
    /// status.hostIPs for dual stack; at most one per family; an IPv6 one adds the fd00:ec2::254 rules).
    #[arg(long, env = "NODE_IP", value_delimiter = ',')]
    pub node_ip: Vec<IpAddr>,

    /// How often the iptables rules are checked and put back if deleted or moved.
    #[arg(long, env = "IMDS_BROKER_IPTABLES_RECONCILE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub iptables_reconcile_interval: Duration,

    /// Serve the container-credentials endpoint (`GET /v1/credentials` at 169.254.170.23, as EKS Pod
    /// Identity): identity from the token the pod presents. The capture then also sends pods'
    /// 169.254.170.23:80 (fd00:ec2::23 with an IPv6 node address) to the agent, and the node's own
    /// (hostNetwork pods') too, through that address on `lo`.
    #[arg(long, env = "IMDS_BROKER_CONTAINER_CREDENTIALS")]
    pub container_credentials: bool,
}

/// Flags of `imds-broker iptables reconcile`.
#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// The capture's interfaces, node addresses and reconcile interval.
    #[command(flatten)]
    pub capture: CaptureArgs,

    /// The IMDS endpoint's address, as the server's --listen: its port is where captured traffic goes.
    #[arg(long, env = "IMDS_BROKER_LISTEN", default_value = "0.0.0.0:8181")]
    pub listen: SocketAddr,

    /// Where to vouch for the capture (a file on a volume shared with the server's container).
    #[arg(long, env = "IMDS_BROKER_CAPTURE_STATUS_FILE")]
    pub status_file: std::path::PathBuf,

    /// Address of this container's /healthz, /readyz (the capture is in place) and /metrics (the
    /// reconcile counters); unset: none. Not the server's port: both share the node's network.
    #[arg(long, env = "IMDS_BROKER_CAPTURE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl ReconcileArgs {
    /// Validates the flags into the capture's settings.
    pub fn config(&self) -> Result<netfilter::Config, Error> {
        self.capture.config(self.listen.port())
    }
}

/// Flags of the agent itself.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Name of the node this agent serves; only pods scheduled here are answered (required).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Address of the IMDS endpoint (the target of the 169.254.169.254 DNAT).
    #[arg(long, env = "IMDS_BROKER_LISTEN", default_value = "0.0.0.0:8181")]
    pub listen: SocketAddr,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "IMDS_BROKER_METRICS_LISTEN", default_value = "0.0.0.0:9181")]
    pub metrics_listen: SocketAddr,

    /// AWS region whose STS endpoint is used (sts.<region>.amazonaws.com) and served to pods; unset:
    /// the agent's Node's topology.kubernetes.io/region label, read at start.
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,

    /// STS endpoint URL overriding the regional one (a VPC endpoint, a proxy, a test double).
    #[arg(long, env = "IMDS_BROKER_STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,

    /// Requested lifetime of STS sessions, in seconds (1200-43200, and within the role's maximum).
    #[arg(long, env = "IMDS_BROKER_SESSION_DURATION", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1200..=43200))]
    pub session_duration: u64,

    /// Audience of the pod-bound service-account tokens (the client id of the cluster's OIDC provider in IAM).
    #[arg(long, env = "IMDS_BROKER_TOKEN_AUDIENCE", default_value = "sts.amazonaws.com")]
    pub token_audience: String,

    /// Lifetime of the pod-bound service-account tokens, in seconds (the API server's minimum is 600).
    #[arg(long, env = "IMDS_BROKER_TOKEN_EXPIRATION", default_value_t = 600,
          value_parser = clap::value_parser!(i64).range(600..=86400))]
    pub token_expiration: i64,

    /// The audience a token presented to the container-credentials endpoint must carry (what the
    /// pod's projected token volume asks for).
    #[arg(
        long,
        env = "IMDS_BROKER_CONTAINER_CREDENTIALS_AUDIENCE",
        default_value = "pods.eks.amazonaws.com"
    )]
    pub container_credentials_audience: String,

    /// The issuer (`iss`) of the cluster's service-account tokens, as the API server's
    /// --service-account-issuer; unset: read from the API server's /.well-known/openid-configuration.
    #[arg(long, env = "IMDS_BROKER_SERVICE_ACCOUNT_ISSUER")]
    pub service_account_issuer: Option<String>,

    /// Where the web identity exchanged at STS comes from: `kubernetes` (a pod-bound service-account
    /// token, TokenRequest) or `spire` (the pod's JWT-SVID from the SPIRE agent's Delegated Identity API).
    #[arg(long, env = "IMDS_BROKER_IDENTITY_SOURCE", value_enum, default_value_t = IdentitySourceKind::Kubernetes)]
    pub identity_source: IdentitySourceKind,

    /// The SPIRE agent's admin socket (its `admin_socket_path`), for `--identity-source spire`.
    #[arg(
        long,
        env = "IMDS_BROKER_SPIRE_ADMIN_SOCKET",
        default_value = "/run/spire/admin/admin.sock"
    )]
    pub spire_admin_socket: std::path::PathBuf,

    /// Prefix that completes role names in the iam.amazonaws.com/role pod annotation,
    /// e.g. arn:aws:iam::123456789012:role/
    #[arg(long, env = "IMDS_BROKER_BASE_ROLE_ARN")]
    pub base_role_arn: Option<String>,

    /// Role ARN for pods that name no role (unset: such pods get no credentials).
    #[arg(long, env = "IMDS_BROKER_DEFAULT_ROLE")]
    pub default_role: Option<String>,

    /// Whether token-less IMDSv1 requests are served.
    #[arg(long, env = "IMDS_BROKER_IMDSV2", value_enum, default_value = "optional")]
    pub imdsv2: Imdsv2,

    /// How long a request from a not-yet-known pod IP waits for the pod watch (e.g. 500ms).
    #[arg(long, env = "IMDS_BROKER_POD_WAIT", default_value = "500ms", value_parser = parse_duration)]
    pub pod_wait: Duration,

    /// Least validity left on any credential served; SDKs refresh at about 15 minutes.
    #[arg(long, env = "IMDS_BROKER_CREDENTIAL_MIN_REMAINING", default_value = "15m", value_parser = parse_duration)]
    pub credential_min_remaining: Duration,

    /// How often the background refresher looks for sessions due for renewal.
    #[arg(long, env = "IMDS_BROKER_REFRESH_CHECK_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub refresh_check_interval: Duration,

    /// While refreshes fail, credentials are still served until this long before they expire (real
    /// IMDS serves its current credentials through trouble too). Must be less than
    /// --credential-min-remaining.
    #[arg(long, env = "IMDS_BROKER_CREDENTIAL_EXPIRY_MARGIN", default_value = "5m", value_parser = parse_duration)]
    pub credential_expiry_margin: Duration,

    /// How many exchanges (TokenRequest + AssumeRoleWithWebIdentity) run at once on this node; pods
    /// waiting for their first credentials go first, then refreshes, then prefetches.
    #[arg(long, env = "IMDS_BROKER_EXCHANGE_CONCURRENCY", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub exchange_concurrency: u16,

    /// How many exchanges start per second on this node, at most (bursts of one second's worth).
    #[arg(long, env = "IMDS_BROKER_EXCHANGE_RATE", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub exchange_rate: u32,

    /// A watch that delivers nothing (no event, no bookmark) for this long is presumed dead and
    /// relisted. The API server sends bookmarks about once a minute.
    #[arg(long, env = "IMDS_BROKER_WATCH_IDLE_TIMEOUT", default_value = "3m", value_parser = parse_duration)]
    pub watch_idle_timeout: Duration,

    /// IMDS connections open at once, at most; more are closed on accept.
    #[arg(long, env = "IMDS_BROKER_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// IMDS connections open at once from one source address (one pod), at most.
    #[arg(long, env = "IMDS_BROKER_MAX_CONNECTIONS_PER_IP", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: u32,

    /// A taint key the node registers with (kubelet --register-with-taints) to keep workloads off until
    /// the agent serves; the agent removes it from its own Node once ready. Unset: no taint is touched.
    #[arg(long, env = "IMDS_BROKER_STARTUP_TAINT")]
    pub startup_taint: Option<String>,

    /// How often freed heap memory is handed back to the kernel (glibc's malloc_trim), with the
    /// allocator limited to two arenas; 0 turns both off. Keeps an idle agent's RSS at its live data.
    #[arg(long, env = "IMDS_BROKER_HEAP_TRIM_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub heap_trim_interval: Duration,

    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "IMDS_BROKER_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Install and keep the iptables rules that send pods' 169.254.169.254 to this agent (needs
    /// CAP_NET_ADMIN), in this process. Off by default: the shipped DaemonSet runs them in its own
    /// container instead (`imds-broker iptables reconcile`).
    #[arg(long, env = "IMDS_BROKER_IPTABLES")]
    pub iptables: bool,

    /// The capture's interfaces, node addresses and reconcile interval.
    #[command(flatten)]
    pub capture: CaptureArgs,

    /// Readiness follows this file, written by the capture container (`imds-broker iptables
    /// reconcile --status-file`) while the capture rules are in place: for a server that does not
    /// manage iptables itself (and so holds no privilege).
    #[arg(long, env = "IMDS_BROKER_CAPTURE_STATUS_FILE")]
    pub capture_status_file: Option<std::path::PathBuf>,

    /// Write Kubernetes Events on pods whose credentials fail for a reason their owner can fix
    /// (invalid role annotation, STS or TokenRequest refused, throttling), shown by `kubectl describe
    /// pod`. Needs create and patch of events.k8s.io events; `--events false` writes none.
    #[arg(long, env = "IMDS_BROKER_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub events: bool,

    /// Log format.
    #[arg(long, env = "IMDS_BROKER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax (e.g. info, imds_broker=debug).
    #[arg(long, env = "IMDS_BROKER_LOG", default_value = "info")]
    pub log: String,

    /// Where metadata other than credentials comes from: none (synthesised from the flags, the Node's
    /// labels and the node name), auto (probe http://169.254.169.254 for 1s at start, else
    /// none), or http://IP[:PORT] (proxy the --allow-path paths to that IMDS).
    #[arg(long, env = "IMDS_BROKER_UPSTREAM_IMDS", default_value = "none", value_parser = metadata::Mode::parse)]
    pub upstream_imds: metadata::Mode,

    /// A regular expression over the path after /latest/ (matched whole) that may be proxied to the
    /// upstream IMDS; repeatable. Replaces the default list. The node's credentials, user-data, identity
    /// signatures and spot notices are never proxied, whatever the patterns.
    #[arg(long = "allow-path", env = "IMDS_BROKER_ALLOW_PATH")]
    pub allow_path: Vec<String>,

    /// Availability zone served in on-prem mode (must start with the region); unset: the Node's
    /// topology.kubernetes.io/zone label (or its AWS providerID), followed while the agent runs.
    #[arg(long, env = "IMDS_BROKER_AVAILABILITY_ZONE")]
    pub availability_zone: Option<String>,

    /// The accountId of the on-prem identity document; unset: the account of the calling pod's role.
    #[arg(long, env = "IMDS_BROKER_ACCOUNT_ID")]
    pub account_id: Option<String>,

    /// IP TTL (IPv6 hop limit) of IMDSv2 token responses, as EC2's HttpPutResponseHopLimit: 1 keeps
    /// tokens inside the pod's network namespace.
    #[arg(long, env = "IMDS_BROKER_TOKEN_HOP_LIMIT", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=64))]
    pub token_hop_limit: u8,

    /// File whose contents key the IMDSv2 tokens, so tokens survive a restart (a mounted Secret
    /// or a hostPath; at least 32 bytes). Unset: a random key per process.
    #[arg(long, env = "IMDS_BROKER_TOKEN_KEY_FILE")]
    pub token_key_file: Option<std::path::PathBuf>,
}

/// Why the flags do not make a working configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--base-role-arn` is not a role ARN prefix.
    #[error("--base-role-arn {value:?}: {reason}")]
    BaseArn {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: crate::workload::RoleArnError,
    },
    /// `--default-role` is not a role ARN.
    #[error("--default-role {value:?}: {reason}")]
    DefaultRole {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: crate::workload::RoleArnError,
    },
    /// No node name.
    #[error("--node-name (or NODE_NAME) is required and must not be empty")]
    NodeName,
    /// Sessions would never be servable.
    #[error("--session-duration {session:?} must exceed --credential-min-remaining {min:?}")]
    SessionTooShort {
        /// `--session-duration`.
        session: Duration,
        /// `--credential-min-remaining`.
        min: Duration,
    },
    /// The expiry margin would not extend serving past the fresh window.
    #[error("--credential-expiry-margin {margin:?} must be less than --credential-min-remaining {min:?}")]
    ExpiryMargin {
        /// `--credential-expiry-margin`.
        margin: Duration,
        /// `--credential-min-remaining`.
        min: Duration,
    },
    /// The idle bound would relist healthy watches between bookmarks.
    #[error("--watch-idle-timeout {0:?} must be at least 10s (bookmarks come about once a minute)")]
    WatchIdle(Duration),
    /// An `--account-id` that is not 12 digits.
    #[error("--account-id {0:?}: an AWS account id is 12 digits")]
    AccountId(String),
    /// A `--host-interface` pattern iptables would not take.
    #[error("--host-interface {value:?}: {reason}")]
    HostInterface {
        /// The pattern given.
        value: String,
        /// What is wrong with it.
        #[source]
        reason: netfilter::InterfaceError,
    },
    /// `--iptables` without an interface to capture on.
    #[error("--iptables needs at least one --host-interface pattern (e.g. cali+, eni+, !eth0)")]
    NoHostInterface,
    /// `--iptables` without an address to send captured traffic to.
    #[error("--iptables needs --node-ip (or NODE_IP, from status.hostIP), the address captured traffic is sent to")]
    NoNodeIp,
    /// A `--node-ip` that cannot be a DNAT target.
    #[error("--node-ip {ip}: {reason}")]
    NodeIp {
        /// The address given.
        ip: IpAddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An `--allow-path` that is not a regular expression.
    #[error("--allow-path {value:?}: {reason}")]
    AllowPath {
        /// The pattern given.
        value: String,
        /// What is wrong with it.
        #[source]
        reason: regex::Error,
    },
    /// An `--availability-zone` outside `--region`.
    #[error("--availability-zone {zone:?} is not in --region {region:?}")]
    AvailabilityZone {
        /// `--availability-zone`.
        zone: String,
        /// `--region`.
        region: String,
    },
}

/// Everything the application needs, per component.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--node-name`.
    pub node_name: String,
    /// `--listen`.
    pub listen: SocketAddr,
    /// `--metrics-listen`.
    pub metrics_listen: SocketAddr,
    /// `--shutdown-grace`.
    pub shutdown_grace: Duration,
    /// The IMDS endpoint.
    pub imds: server::imds::Config,
    /// Role resolution.
    pub roles: Resolver,
    /// Service-account tokens.
    pub sa_token: sa_token::Config,
    /// `--identity-source spire`: the SPIRE agent to ask for JWT-SVIDs; `None`: TokenRequest.
    pub spire: Option<spire::Config>,
    /// `--region`; `None`: the Node's region label, read by the app at start.
    pub region: Option<String>,
    /// STS.
    pub sts: sts::Config,
    /// The credential cache.
    pub credentials: credentials::Config,
    /// The list-then-watch loops.
    pub watch: watch::Config,
    /// `--startup-taint`.
    pub startup_taint: Option<String>,
    /// `--capture-status-file`.
    pub capture_status_file: Option<std::path::PathBuf>,
    /// `--max-connections`, `--max-connections-per-ip`.
    pub connections: server::connections::Config,
    /// The iptables capture, when `--iptables` is set.
    pub netfilter: Option<netfilter::Config>,
    /// The metadata surface besides credentials.
    pub metadata: metadata::Config,
    /// `--token-key-file`.
    pub token_key_file: Option<std::path::PathBuf>,
    /// `--events`.
    pub events: events::Config,
    /// `--container-credentials`: the endpoint's settings; `None`: not served.
    pub container_credentials: Option<server::container::Config>,
}

impl Args {
    /// Validates the flags into a [`Config`].
    pub fn config(&self) -> Result<Config, Error> {
        let node_name = self
            .node_name
            .clone()
            .filter(|n| !n.trim().is_empty())
            .ok_or(Error::NodeName)?;
        let region = self.region.clone().filter(|r| !r.trim().is_empty());
        let base = self
            .base_role_arn
            .as_deref()
            .map(|v| {
                BaseArn::parse(v).map_err(|reason| Error::BaseArn {
                    value: v.to_owned(),
                    reason,
                })
            })
            .transpose()?;
        let default = self
            .default_role
            .as_deref()
            .map(|v| {
                RoleArn::parse(v).map_err(|reason| Error::DefaultRole {
                    value: v.to_owned(),
                    reason,
                })
            })
            .transpose()?;
        let session = Duration::from_secs(self.session_duration);
        if session <= self.credential_min_remaining {
            return Err(Error::SessionTooShort {
                session,
                min: self.credential_min_remaining,
            });
        }
        if self.credential_expiry_margin >= self.credential_min_remaining {
            return Err(Error::ExpiryMargin {
                margin: self.credential_expiry_margin,
                min: self.credential_min_remaining,
            });
        }
        if self.watch_idle_timeout < Duration::from_secs(10) {
            return Err(Error::WatchIdle(self.watch_idle_timeout));
        }
        let netfilter = self
            .iptables
            .then(|| self.capture.config(self.listen.port()))
            .transpose()?;
        let metadata = self.metadata(&node_name, region.as_deref())?;
        let events = events::Config {
            enabled: self.events,
            instance: node_name.clone(),
        };
        Ok(Config {
            node_name,
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            shutdown_grace: self.shutdown_grace,
            imds: server::imds::Config {
                imdsv2: self.imdsv2,
                pod_wait: self.pod_wait,
                token_hop_limit: self.token_hop_limit,
            },
            roles: Resolver { base, default },
            sa_token: sa_token::Config {
                audience: self.token_audience.clone(),
                expiration_seconds: self.token_expiration,
            },
            spire: match self.identity_source {
                IdentitySourceKind::Kubernetes => None,
                IdentitySourceKind::Spire => Some(spire::Config {
                    socket: self.spire_admin_socket.clone(),
                    audience: self.token_audience.clone(),
                }),
            },
            region,
            sts: sts::Config {
                endpoint: self.sts_endpoint.clone(),
                session_duration: session,
            },
            credentials: credentials::Config {
                min_remaining: self.credential_min_remaining,
                expiry_margin: self.credential_expiry_margin,
                refresh_check_interval: self.refresh_check_interval,
                concurrency: usize::from(self.exchange_concurrency),
                rate: f64::from(self.exchange_rate),
            },
            startup_taint: self.startup_taint.clone().filter(|k| !k.trim().is_empty()),
            capture_status_file: self.capture_status_file.clone(),
            connections: server::connections::Config {
                total: self.max_connections as usize,
                per_ip: self.max_connections_per_ip as usize,
            },
            watch: watch::Config {
                idle: self.watch_idle_timeout,
                page_size: 500,
            },
            netfilter,
            metadata,
            token_key_file: self.token_key_file.clone(),
            events,
            container_credentials: self.capture.container_credentials.then(|| server::container::Config {
                audience: self.container_credentials_audience.clone(),
                issuer: self.service_account_issuer.clone().filter(|i| !i.trim().is_empty()),
            }),
        })
    }

    fn metadata(&self, node_name: &str, region: Option<&str>) -> Result<metadata::Config, Error> {
        let allow = if self.allow_path.is_empty() {
            metadata::Rules::default_allow()
        } else {
            for value in &self.allow_path {
                metadata::Rules::new(&[value]).map_err(|reason| Error::AllowPath {
                    value: value.clone(),
                    reason,
                })?;
            }
            metadata::Rules::new(&self.allow_path).map_err(|reason| Error::AllowPath {
                value: self.allow_path.join(" "),
                reason,
            })?
        };
        let availability_zone = self.availability_zone.clone().filter(|z| !z.trim().is_empty());
        if let (Some(zone), Some(region)) = (&availability_zone, region)
            && !zone.starts_with(region)
        {
            return Err(Error::AvailabilityZone {
                zone: zone.clone(),
                region: region.to_owned(),
            });
        }
        let account_id = self.account_id.clone().filter(|a| !a.trim().is_empty());
        if let Some(account) = &account_id
            && !(account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(Error::AccountId(account.clone()));
        }
        Ok(metadata::Config {
            mode: self.upstream_imds.clone(),
            allow,
            flags: metadata::Placement {
                region: region.map(str::to_owned),
                zone: availability_zone,
                ..metadata::Placement::default()
            },
            account_id,
            node_name: node_name.to_owned(),
        })
    }
}

impl CaptureArgs {
    /// Validates the capture flags for an endpoint listening on `port`.
    pub fn config(&self, port: u16) -> Result<netfilter::Config, Error> {
        let interfaces = self
            .host_interface
            .iter()
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                netfilter::Interface::parse(v).map_err(|reason| Error::HostInterface {
                    value: v.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if interfaces.is_empty() {
            return Err(Error::NoHostInterface);
        }
        if self.node_ip.is_empty() {
            return Err(Error::NoNodeIp);
        }
        for (i, ip) in self.node_ip.iter().enumerate() {
            let reason = if ip.is_loopback() {
                // The kernel drops packets DNATed from PREROUTING to 127/8 unless route_localnet is set.
                Some("a loopback address cannot receive traffic DNATed from other interfaces")
            } else if ip.is_unspecified() || ip.is_multicast() {
                Some("not a unicast address")
            } else if self.node_ip[..i].iter().any(|other| other.is_ipv4() == ip.is_ipv4()) {
                Some("only one address per family")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(Error::NodeIp { ip: *ip, reason });
            }
        }
        Ok(netfilter::Config {
            interfaces,
            node_ips: self.node_ip.clone(),
            port,
            reconcile_interval: self.iptables_reconcile_interval,
            container_credentials: self.container_credentials,
        })
    }
}

/// Parses `250ms`, `30s`, `15m`, `1h` (a bare number is seconds).
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a duration like 500ms, 30s, 15m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{value:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

/// `--identity-source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentitySourceKind {
    /// Pod-bound service-account tokens (TokenRequest).
    Kubernetes,
    /// JWT-SVIDs from the SPIRE agent's Delegated Identity API.
    Spire,
}

#[cfg(test)]
mod tests;
