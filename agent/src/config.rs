//! Agent configuration: a TOML file (`--config`), every key overridable by a `run` flag.
//!
//! Precedence: flag > file > default. Required: the trust domain, the server address, and a way
//! to trust the server on first contact (`trust_bundle`, or `insecure_bootstrap` for demos).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
pub use sigil::config::ConfigError;
use sigil::logging::LogFormat;
use sigil::TrustDomain;

use crate::node_attestor::NodeAttestation;

/// Default Workload API socket (SPIRE's layout, under /run where only root creates directories,
/// not the world-writable /tmp; the same path as deploy/systemd's).
pub const DEFAULT_SOCKET_PATH: &str = "/run/sigil-agent/public/api.sock";
/// Default agent admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sigil-agent/private/admin.sock";
/// Default health/metrics address.
pub const DEFAULT_HEALTH_ADDRESS: &str = "127.0.0.1:8083";
/// Default data directory (relative to the working directory, like the server's).
pub const DEFAULT_DATA_DIR: &str = "./.data-agent";

/// `server_address` in the file: one address or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a HOST:PORT string or a list of them")]
pub enum ServerAddresses {
    /// `server_address = "host:8081"`.
    One(String),
    /// `server_address = ["a:8081", "b:8081"]`.
    Many(Vec<String>),
}

impl ServerAddresses {
    /// The addresses in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            ServerAddresses::One(a) => vec![a],
            ServerAddresses::Many(v) => v,
        }
    }
}

/// The file as written by the operator.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Trust domain name.
    pub trust_domain: Option<String>,
    /// Node API address of sigil-server, HOST:PORT, or a list of them (servers sharing one
    /// datastore).
    pub server_address: Option<ServerAddresses>,
    /// PEM bundle to trust the server with on first contact (`sigil-server bundle show`).
    pub trust_bundle: Option<PathBuf>,
    /// Skip server verification on first contact (demos only).
    pub insecure_bootstrap: Option<bool>,
    /// Join token for node attestation.
    pub join_token: Option<String>,
    /// x509pop node attestation: PEM node certificate chain, leaf first.
    pub x509pop_cert: Option<PathBuf>,
    /// x509pop node attestation: PEM PKCS#8 private key of the node certificate.
    pub x509pop_key: Option<PathBuf>,
    /// k8s_psat node attestation: this cluster's name in the server's k8s_psat configuration.
    pub k8s_psat_cluster: Option<String>,
    /// k8s_psat node attestation: the projected service-account token file.
    pub k8s_psat_token_path: Option<PathBuf>,
    /// Where the agent keeps its SVID, key and bundle.
    pub data_dir: Option<PathBuf>,
    /// Workload API socket.
    pub socket_path: Option<PathBuf>,
    /// Agent admin socket.
    pub admin_socket: Option<PathBuf>,
    /// Health/metrics address; `""` disables.
    pub health_address: Option<String>,
    /// Longest time since the last successful sync with the server for `/ready` (e.g. `5m`).
    pub ready_max_sync_age: Option<String>,
    /// Log level directive.
    pub log_level: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// Workload attestors besides the always-on unix/cgroup one: `["k8s"]`.
    pub workload_attestors: Option<Vec<String>>,
    /// `k8s` attestor: the kubelet's secure port, `https://HOST:10250`.
    pub kubelet_url: Option<String>,
    /// `k8s` attestor: PEM CA that signed the kubelet's serving certificate.
    pub kubelet_ca_path: Option<PathBuf>,
    /// `k8s` attestor: bearer token file for the kubelet (re-read as it rotates).
    pub kubelet_token_path: Option<PathBuf>,
    /// `k8s` attestor: use the kubelet's read-only port over plain HTTP instead.
    pub kubelet_read_only_port: Option<u16>,
    /// `k8s` attestor: how long to wait for a just-started container to appear (`10s`).
    pub kubelet_container_wait: Option<String>,
    /// `k8s` attestor: this node's Kubernetes name.
    pub node_name: Option<String>,
    /// Most Workload API connections one uid may hold open.
    pub workload_api_max_connections_per_uid: Option<usize>,
    /// Envoy's Secret Discovery Service (`[sds]`).
    pub sds: Option<SdsFileConfig>,
}

/// The `[sds]` table: the names of SDS resources (SPIRE's keys and defaults).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdsFileConfig {
    /// The name of the caller's default X509-SVID.
    pub default_svid_name: Option<String>,
    /// The name of our trust domain's validation context.
    pub default_bundle_name: Option<String>,
    /// The name of the validation context with every trust domain the caller may use.
    pub default_all_bundles_name: Option<String>,
    /// Per-trust-domain validation contexts as `trusted_ca` PEM instead of the SPIFFE validator.
    pub disable_spiffe_cert_validation: Option<bool>,
}

/// `sigil-agent run` flags.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct RunFlags {
    /// TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Node API address of sigil-server (required here or in the file); several servers
    /// sharing one datastore: repeat the flag or separate addresses with commas.
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',')]
    pub server_address: Vec<String>,
    /// Trust domain name (required here or in the file).
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// PEM bundle that authenticates the server on first contact.
    #[arg(long, value_name = "FILE")]
    pub trust_bundle: Option<PathBuf>,
    /// Do not verify the server on first contact (demos only; logs a warning).
    #[arg(long)]
    pub insecure_bootstrap: bool,
    /// Join token for node attestation.
    #[arg(long, value_name = "TOKEN", env = "SIGIL_JOIN_TOKEN")]
    pub join_token: Option<String>,
    /// x509pop node attestation: node certificate chain (PEM, leaf first). Needs --x509pop-key.
    #[arg(long, value_name = "FILE")]
    pub x509pop_cert: Option<PathBuf>,
    /// x509pop node attestation: the node certificate's private key (PEM PKCS#8).
    #[arg(long, value_name = "FILE")]
    pub x509pop_key: Option<PathBuf>,
    /// k8s_psat node attestation: this cluster's name in the server's k8s_psat configuration.
    #[arg(long, value_name = "NAME")]
    pub k8s_psat_cluster: Option<String>,
    /// k8s_psat node attestation: the projected service-account token (audience sigil-server)
    /// [default: /var/run/secrets/tokens/sigil-agent].
    #[arg(long, value_name = "PATH")]
    pub k8s_psat_token_path: Option<PathBuf>,
    /// Directory for the agent's SVID, key and bundle [default: ./.data-agent].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Workload API socket [default: /run/sigil-agent/public/api.sock].
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Agent admin socket [default: /run/sigil-agent/private/admin.sock].
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Health/metrics HTTP address; empty disables [default: 127.0.0.1:8083].
    #[arg(long, value_name = "HOST:PORT")]
    pub health_address: Option<String>,
    /// /ready turns 503 when the last successful sync with the server is older than this
    /// (the sync stream being up counts as now) [default: 5m].
    #[arg(long, value_name = "DURATION")]
    pub ready_max_sync_age: Option<String>,
    /// Log level [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long)]
    pub log_format: Option<String>,
    /// Enable a workload attestor besides unix (always on): `k8s` (pod selectors from the
    /// kubelet). Repeatable.
    #[arg(long = "workload-attestor", value_name = "NAME")]
    pub workload_attestors: Vec<String>,
    /// k8s attestor: kubelet secure port [default: https://127.0.0.1:10250].
    #[arg(long, value_name = "URL")]
    pub kubelet_url: Option<String>,
    /// k8s attestor: CA of the kubelet's serving certificate [default: the in-cluster CA].
    #[arg(long, value_name = "FILE")]
    pub kubelet_ca_path: Option<PathBuf>,
    /// k8s attestor: bearer token for the kubelet [default: the in-cluster SA token].
    #[arg(long, value_name = "FILE")]
    pub kubelet_token_path: Option<PathBuf>,
    /// k8s attestor: use the kubelet's read-only port (plain HTTP, no auth) instead.
    #[arg(long, value_name = "PORT")]
    pub kubelet_read_only_port: Option<u16>,
    /// k8s attestor: wait this long for a just-started container to appear [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub kubelet_container_wait: Option<String>,
    /// k8s attestor: this node's name (pods the kubelet lists for another node are ignored).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Most Workload API connections one uid may hold open; more are closed at once
    /// [default: 1000].
    #[arg(long, value_name = "N")]
    pub workload_api_max_connections_per_uid: Option<usize>,
    /// SDS: the name of the caller's default X509-SVID [default: default].
    #[arg(long, value_name = "NAME")]
    pub sds_default_svid_name: Option<String>,
    /// SDS: the name of our trust domain's validation context [default: ROOTCA].
    #[arg(long, value_name = "NAME")]
    pub sds_default_bundle_name: Option<String>,
    /// SDS: the name of the validation context holding every trust domain the caller may use
    /// [default: ALL].
    #[arg(long, value_name = "NAME")]
    pub sds_default_all_bundles_name: Option<String>,
    /// SDS: per-trust-domain validation contexts as `trusted_ca` PEM instead of Envoy's SPIFFE
    /// validator.
    #[arg(long)]
    pub sds_disable_spiffe_cert_validation: bool,
}

/// How the agent authenticates the server before it has an SVID of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// Verify the server against this PEM bundle.
    TrustBundle(PathBuf),
    /// Accept any server certificate on first contact.
    Insecure,
}

/// x509pop node attestation material (files on the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509PopConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM PKCS#8 private key of the leaf.
    pub key: PathBuf,
}

impl X509PopConfig {
    /// Reads the chain (DER, leaf first) and the key (PKCS#8 DER), naming the file that is wrong.
    pub fn load(&self) -> Result<(Vec<Vec<u8>>, Vec<u8>), MaterialError> {
        let read = |key, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| MaterialError::Read {
                key,
                path: path.to_path_buf(),
                source,
            })
        };
        let text = read("x509pop_cert", &self.cert)?;
        let chain =
            sigil::x509::parse_pem_certs(&text).map_err(|source| MaterialError::Certificates {
                path: self.cert.clone(),
                source,
            })?;
        if chain.is_empty() {
            return Err(MaterialError::NoCertificate(self.cert.clone()));
        }
        let text = read("x509pop_key", &self.key)?;
        let key = rcgen::KeyPair::from_pem(&text).map_err(|source| MaterialError::Key {
            path: self.key.clone(),
            source,
        })?;
        Ok((chain, key.serialize_der()))
    }
}

/// Why the node's attestation material (x509pop files, the k8s_psat token) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// An x509pop file cannot be read.
    #[error("reading {key} {}: {source}", path.display())]
    Read {
        /// `x509pop_cert` or `x509pop_key`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The x509pop certificate file is not PEM certificates.
    #[error("x509pop_cert {}: {source}", path.display())]
    Certificates {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        #[source]
        source: sigil::x509::X509Error,
    },
    /// The x509pop certificate file holds no certificate.
    #[error("x509pop_cert {} holds no certificate", .0.display())]
    NoCertificate(PathBuf),
    /// The x509pop key file is not a usable private key.
    #[error("x509pop_key {}: expected a PEM PKCS#8 private key (ECDSA P-256/P-384, RSA or Ed25519): {source}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What rcgen reported.
        #[source]
        source: rcgen::Error,
    },
    /// The k8s_psat token cannot be read.
    #[error("reading k8s_psat_token_path {} (mount a projected service-account token with audience sigil-server there): {source}", path.display())]
    ReadToken {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The k8s_psat token file is empty.
    #[error("k8s_psat_token_path {} is empty", .0.display())]
    EmptyToken(PathBuf),
}

/// Where the kubelet mounts the agent's projected service-account token by default.
pub const DEFAULT_K8S_PSAT_TOKEN_PATH: &str = "/var/run/secrets/tokens/sigil-agent";

/// k8s_psat node attestation settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sPsatConfig {
    /// The cluster's name in the server's `node_attestor.k8s_psat.clusters`.
    pub cluster: String,
    /// The projected service-account token file (the kubelet rotates it: read it each time).
    pub token_path: PathBuf,
}

impl K8sPsatConfig {
    /// Reads the token, naming the file if it is missing or empty.
    pub fn load_token(&self) -> Result<String, MaterialError> {
        let text = std::fs::read_to_string(&self.token_path).map_err(|source| {
            MaterialError::ReadToken {
                path: self.token_path.clone(),
                source,
            }
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(MaterialError::EmptyToken(self.token_path.clone()));
        }
        Ok(token.to_string())
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Server node API addresses, HOST:PORT (host names allowed), at least one: the agent talks
    /// to one at a time and moves to the next when it fails.
    pub server_addresses: Vec<String>,
    /// First-contact trust.
    pub bootstrap: Bootstrap,
    /// The node attestation method, if one was given (at most one may be; none is fine while a
    /// stored agent SVID is re-used).
    pub node_attestation: Option<NodeAttestation>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Workload API socket.
    pub socket_path: PathBuf,
    /// Admin socket.
    pub admin_socket: PathBuf,
    /// Health address, if enabled.
    pub health_address: Option<SocketAddr>,
    /// `/ready` fails when the last successful sync is older than this.
    pub ready_max_sync_age: std::time::Duration,
    /// Log level.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// The `k8s` workload attestor's kubelet, if that attestor is on.
    pub kubelet: Option<crate::workload_attestor::k8s::KubeletConfig>,
    /// Most Workload API connections one uid may hold open.
    pub workload_api_max_connections_per_uid: usize,
    /// Envoy's Secret Discovery Service.
    pub sds: crate::workload_api::SdsConfig,
}

impl AgentConfig {
    /// Reads `--config` (if given) and applies the flags.
    pub fn load(flags: &RunFlags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => sigil::config::read_toml(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(file, flags)
    }

    /// Merges file and flags, naming the key that is wrong.
    pub fn resolve(mut file: FileConfig, flags: &RunFlags) -> Result<Self, ConfigError> {
        let kubelet = resolve_kubelet(&file, flags)?;
        let sds = resolve_sds(file.sds.take().unwrap_or_default(), flags)?;
        let trust_domain =
            sigil::config::resolve_trust_domain(flags.trust_domain.clone(), file.trust_domain)?;
        let server_addresses = if flags.server_address.is_empty() {
            file.server_address.map(ServerAddresses::into_vec)
        } else {
            Some(flags.server_address.clone())
        }
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            ConfigError::missing(
                "server_address",
                "set it in the config file or pass --server-address HOST:PORT (several servers: \
                 a list in the file, or the flag repeated or comma-separated)",
            )
        })?;
        let server_addresses: Vec<String> = server_addresses
            .iter()
            .map(|a| a.trim().to_string())
            .collect();
        for a in &server_addresses {
            validate_host_port(a)
                .map_err(|reason| ConfigError::invalid("server_address", a, reason))?;
        }
        let insecure = flags.insecure_bootstrap || file.insecure_bootstrap.unwrap_or(false);
        let bootstrap = match (flags.trust_bundle.clone().or(file.trust_bundle), insecure) {
            (Some(_), true) => {
                return Err(ConfigError::conflict(
                    "trust_bundle and insecure_bootstrap are mutually exclusive: pick one",
                ))
            }
            (Some(path), false) => Bootstrap::TrustBundle(path),
            (None, true) => Bootstrap::Insecure,
            (None, false) => return Err(ConfigError::missing(
                "trust_bundle",
                "it authenticates the server (write it with `sigil-server bundle show > bundle.pem` and pass --trust-bundle bundle.pem), or pass --insecure-bootstrap for a demo",
            )),
        };
        let health = flags
            .health_address
            .clone()
            .or(file.health_address)
            .unwrap_or_else(|| DEFAULT_HEALTH_ADDRESS.to_string());
        let health_address = if health.is_empty() {
            None
        } else {
            Some(health.parse().map_err(|_| {
                ConfigError::invalid(
                    "health_address",
                    &health,
                    "expected IP:PORT, e.g. 127.0.0.1:8083",
                )
            })?)
        };
        let ready_max_sync_age =
            match flags.ready_max_sync_age.clone().or(file.ready_max_sync_age) {
                Some(v) => sigil::ttl::parse(&v)
                    .map_err(|e| ConfigError::value("ready_max_sync_age", e))?,
                None => crate::health::DEFAULT_READY_MAX_SYNC_AGE,
            };
        let log_format = flags
            .log_format
            .clone()
            .or(file.log_format)
            .map(|s| s.parse::<LogFormat>())
            .transpose()
            .map_err(|e| ConfigError::value("log_format", e))?
            .unwrap_or_default();
        let join_token = flags.join_token.clone().or(file.join_token);
        if let Some(t) = &join_token {
            if t.is_empty()
                || t.len() > 256
                || t.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                // The value is not shown: it is a secret.
                return Err(ConfigError::rule(
                    "join_token",
                    "expected the token printed by `sigil-server token generate`",
                ));
            }
        }
        let x509pop = match (
            flags.x509pop_cert.clone().or(file.x509pop_cert),
            flags.x509pop_key.clone().or(file.x509pop_key),
        ) {
            (Some(cert), Some(key)) => Some(X509PopConfig { cert, key }),
            (None, None) => None,
            (Some(_), None) => return Err(ConfigError::conflict(
                "x509pop_cert needs x509pop_key: pass --x509pop-key with the node certificate's PEM PKCS#8 key",
            )),
            (None, Some(_)) => return Err(ConfigError::conflict(
                "x509pop_key needs x509pop_cert: pass --x509pop-cert with the node certificate chain (PEM, leaf first)",
            )),
        };
        if join_token.is_some() && x509pop.is_some() {
            return Err(ConfigError::conflict(
                "join_token and x509pop_cert/x509pop_key are mutually exclusive: attest with one method",
            ));
        }
        let k8s_psat = match (
            flags.k8s_psat_cluster.clone().or(file.k8s_psat_cluster),
            flags.k8s_psat_token_path.clone().or(file.k8s_psat_token_path),
        ) {
            (Some(cluster), path) => {
                if cluster.is_empty() || cluster.contains('/') || cluster.trim() != cluster {
                    return Err(ConfigError::invalid(
                        "k8s_psat_cluster",
                        cluster,
                        "expected the cluster's name in the server's node_attestor.k8s_psat configuration",
                    ));
                }
                Some(K8sPsatConfig {
                    cluster,
                    token_path: path.unwrap_or_else(|| DEFAULT_K8S_PSAT_TOKEN_PATH.into()),
                })
            }
            (None, Some(_)) => return Err(ConfigError::conflict(
                "k8s_psat_token_path needs k8s_psat_cluster: pass --k8s-psat-cluster with the cluster's name in the server's k8s_psat configuration",
            )),
            (None, None) => None,
        };
        let node_attestation = match (join_token, x509pop, k8s_psat) {
            (Some(token), None, None) => Some(NodeAttestation::JoinToken(token)),
            (None, Some(x), None) => Some(NodeAttestation::X509Pop(x)),
            (None, None, Some(k)) => Some(NodeAttestation::K8sPsat(k)),
            (None, None, None) => None,
            (Some(_), Some(_), None) => return Err(ConfigError::conflict(
                "join_token and x509pop_cert/x509pop_key are mutually exclusive: attest with one method",
            )),
            (_, _, Some(_)) => return Err(ConfigError::conflict(
                "k8s_psat_cluster is mutually exclusive with join_token and x509pop_cert/x509pop_key: attest with one method",
            )),
        };
        let workload_api_max_connections_per_uid = flags
            .workload_api_max_connections_per_uid
            .or(file.workload_api_max_connections_per_uid)
            .unwrap_or(crate::workload_api::peer::DEFAULT_MAX_CONNECTIONS_PER_UID);
        if workload_api_max_connections_per_uid == 0 {
            return Err(ConfigError::invalid(
                "workload_api_max_connections_per_uid",
                "0",
                format!(
                    "every workload needs at least one connection; use a positive number (default {})",
                    crate::workload_api::peer::DEFAULT_MAX_CONNECTIONS_PER_UID
                ),
            ));
        }
        Ok(Self {
            trust_domain,
            server_addresses,
            bootstrap,
            node_attestation,
            data_dir: flags
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            socket_path: flags
                .socket_path
                .clone()
                .or(file.socket_path)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH)),
            admin_socket: flags
                .admin_socket
                .clone()
                .or(file.admin_socket)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET)),
            health_address,
            ready_max_sync_age,
            log_level: flags
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format,
            kubelet,
            workload_api_max_connections_per_uid,
            sds,
        })
    }
}

/// The SDS settings: names non-empty, distinct, and not SPIFFE IDs (those name the caller's own
/// identities and trust domains).
fn resolve_sds(
    file: SdsFileConfig,
    flags: &RunFlags,
) -> Result<crate::workload_api::SdsConfig, ConfigError> {
    use crate::workload_api::sds;
    let names = [
        (
            "[sds] default_svid_name",
            flags
                .sds_default_svid_name
                .clone()
                .or(file.default_svid_name)
                .unwrap_or_else(|| sds::DEFAULT_SVID_NAME.into()),
        ),
        (
            "[sds] default_bundle_name",
            flags
                .sds_default_bundle_name
                .clone()
                .or(file.default_bundle_name)
                .unwrap_or_else(|| sds::DEFAULT_BUNDLE_NAME.into()),
        ),
        (
            "[sds] default_all_bundles_name",
            flags
                .sds_default_all_bundles_name
                .clone()
                .or(file.default_all_bundles_name)
                .unwrap_or_else(|| sds::DEFAULT_ALL_BUNDLES_NAME.into()),
        ),
    ];
    for (i, (key, name)) in names.iter().enumerate() {
        if name.trim().is_empty() {
            return Err(ConfigError::rule(
                *key,
                "it is empty; give the SDS resource a name",
            ));
        }
        if name.starts_with("spiffe://") {
            return Err(ConfigError::invalid(
                *key,
                name,
                "SPIFFE IDs already name the caller's SVIDs and trust domains; pick a plain name",
            ));
        }
        if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
            return Err(ConfigError::invalid(
                *key,
                name,
                format!("{other} has the same name; each SDS name must differ"),
            ));
        }
    }
    let [(_, default_svid_name), (_, default_bundle_name), (_, default_all_bundles_name)] = names;
    Ok(crate::workload_api::SdsConfig {
        default_svid_name,
        default_bundle_name,
        default_all_bundles_name,
        disable_spiffe_cert_validation: flags.sds_disable_spiffe_cert_validation
            || file.disable_spiffe_cert_validation.unwrap_or(false),
    })
}

/// The `k8s` workload attestor's settings: `None` unless `workload_attestors` has `k8s`.
fn resolve_kubelet(
    file: &FileConfig,
    flags: &RunFlags,
) -> Result<Option<crate::workload_attestor::k8s::KubeletConfig>, ConfigError> {
    let names = if flags.workload_attestors.is_empty() {
        file.workload_attestors.clone().unwrap_or_default()
    } else {
        flags.workload_attestors.clone()
    };
    let mut k8s = false;
    for name in &names {
        match name.as_str() {
            "k8s" => k8s = true,
            "unix" => {}
            other => {
                return Err(ConfigError::rule(
                    "workload_attestors",
                    format!("unknown workload attestor {other:?}; expected \"k8s\" (unix and cgroup selectors are always on)"),
                ))
            }
        }
    }
    let url = flags.kubelet_url.clone().or(file.kubelet_url.clone());
    let ca = flags
        .kubelet_ca_path
        .clone()
        .or(file.kubelet_ca_path.clone());
    let token = flags
        .kubelet_token_path
        .clone()
        .or(file.kubelet_token_path.clone());
    let port = flags.kubelet_read_only_port.or(file.kubelet_read_only_port);
    let wait = flags
        .kubelet_container_wait
        .clone()
        .or(file.kubelet_container_wait.clone());
    if !k8s {
        if url.is_some() || ca.is_some() || token.is_some() || port.is_some() || wait.is_some() {
            return Err(ConfigError::conflict(
                "kubelet_* settings are given but the k8s workload attestor is off: add --workload-attestor k8s (workload_attestors = [\"k8s\"])",
            ));
        }
        return Ok(None);
    }
    let node = flags.node_name.clone().or(file.node_name.clone());
    crate::workload_attestor::k8s::KubeletConfig::resolve(
        url,
        port,
        ca,
        token,
        wait.as_deref(),
        node,
    )
    .map(Some)
}

/// `HOST:PORT` with a non-empty host and a numeric port (host names allowed, unlike listen
/// addresses); the error is the rule broken.
fn validate_host_port(s: &str) -> Result<(), &'static str> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or("expected HOST:PORT, e.g. sigil-server.example.org:8081")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err("the host part is empty or contains spaces");
    }
    port.parse::<u16>()
        .map_err(|_| "the port is not a number from 0 to 65535")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, flags: RunFlags) -> anyhow::Result<AgentConfig> {
        Ok(AgentConfig::resolve(toml::from_str(text)?, &flags)?)
    }

    #[test]
    fn several_server_addresses_from_a_list_repeated_flags_or_commas() -> anyhow::Result<()> {
        let base = "trust_domain = \"example.org\"\ninsecure_bootstrap = true\n";
        let c = parse(
            &format!("{base}server_address = [\"a:8081\", \"[::1]:8081\"]\n"),
            RunFlags::default(),
        )?;
        assert_eq!(c.server_addresses, ["a:8081", "[::1]:8081"]);
        // Flags win over the file, repeated or comma-separated (as clap splits them).
        let flags = <RunFlagsParser as clap::Parser>::try_parse_from([
            "x",
            "--server-address",
            "b:1,c:2",
            "--server-address",
            " d:3",
        ])?
        .flags;
        assert_eq!(flags.server_address, ["b:1", "c:2", " d:3"]);
        let c = parse(&format!("{base}server_address = \"a:8081\"\n"), flags)?;
        assert_eq!(c.server_addresses, ["b:1", "c:2", "d:3"]);
        // Each address is checked, and the list may not be empty.
        let err = parse(
            &format!("{base}server_address = [\"a:8081\", \"b\"]\n"),
            RunFlags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("server_address") && err.contains("HOST:PORT"),
            "{err}"
        );
        let err = parse(&format!("{base}server_address = []\n"), RunFlags::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("server_address is required"), "{err}");
        let err = parse(
            &format!("{base}server_address = 8081\n"),
            RunFlags::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("a HOST:PORT string or a list of them"),
            "{err}"
        );
        Ok(())
    }

    /// `RunFlags` as clap parses them.
    #[derive(clap::Parser)]
    struct RunFlagsParser {
        #[command(flatten)]
        flags: RunFlags,
    }

    #[test]
    fn resolves_with_defaults_and_overrides() -> anyhow::Result<()> {
        let c = parse(
            "trust_domain = \"example.org\"\nserver_address = \"srv:8081\"\ntrust_bundle = \"/b.pem\"\n",
            RunFlags {
                join_token: Some("abc".into()),
                socket_path: Some("/s.sock".into()),
                ..Default::default()
            },
        )?;
        assert_eq!(c.server_addresses, ["srv:8081"]);
        assert_eq!(c.bootstrap, Bootstrap::TrustBundle("/b.pem".into()));
        assert_eq!(c.socket_path, PathBuf::from("/s.sock"));
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(
            c.node_attestation,
            Some(NodeAttestation::JoinToken("abc".into()))
        );
        assert_eq!(
            c.health_address.map(|a| a.to_string()).as_deref(),
            Some(DEFAULT_HEALTH_ADDRESS)
        );
        assert_eq!(c.ready_max_sync_age, std::time::Duration::from_secs(300));
        let c = parse(
            "trust_domain = \"example.org\"\nserver_address = \"srv:8081\"\ntrust_bundle = \"/b.pem\"\nready_max_sync_age = \"2m\"\n",
            RunFlags::default(),
        )?;
        assert_eq!(c.ready_max_sync_age, std::time::Duration::from_secs(120));
        let c = parse(
            "trust_domain = \"example.org\"\nserver_address = \"srv:8081\"\ntrust_bundle = \"/b.pem\"\nready_max_sync_age = \"2m\"\n",
            RunFlags {
                ready_max_sync_age: Some("5s".into()),
                ..Default::default()
            },
        )?;
        assert_eq!(c.ready_max_sync_age, std::time::Duration::from_secs(5));
        let err = parse(
            "trust_domain = \"example.org\"\nserver_address = \"srv:8081\"\ntrust_bundle = \"/b.pem\"\nready_max_sync_age = \"0s\"\n",
            RunFlags::default(),
        )
        .expect_err("zero");
        assert!(err.to_string().contains("ready_max_sync_age"), "{err}");
        Ok(())
    }

    #[test]
    fn workload_api_connection_limit_per_uid() -> anyhow::Result<()> {
        let base = "trust_domain = \"example.org\"\nserver_address = \"srv:8081\"\ninsecure_bootstrap = true\n";
        let limit = |c: AgentConfig| c.workload_api_max_connections_per_uid;
        assert_eq!(
            limit(parse(base, RunFlags::default())?),
            crate::workload_api::peer::DEFAULT_MAX_CONNECTIONS_PER_UID
        );
        let file = format!("{base}workload_api_max_connections_per_uid = 50\n");
        assert_eq!(limit(parse(&file, RunFlags::default())?), 50);
        let flags = RunFlags {
            workload_api_max_connections_per_uid: Some(20),
            ..Default::default()
        };
        assert_eq!(limit(parse(&file, flags)?), 20);
        let err = parse(
            &format!("{base}workload_api_max_connections_per_uid = 0\n"),
            RunFlags::default(),
        )
        .expect_err("0 refused");
        assert!(
            format!("{err:#}").contains("workload_api_max_connections_per_uid"),
            "{err:#}"
        );
        Ok(())
    }

    #[test]
    fn config_errors_are_typed_and_keep_their_causes() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().unwrap();
        let flags = |config: PathBuf| RunFlags {
            config: Some(config),
            ..RunFlags::default()
        };
        let err = AgentConfig::load(&flags(dir.path().join("none.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(err.source().is_some_and(|c| c.is::<std::io::Error>()));
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "server_adress = \"x:1\"\n").unwrap();
        let err = AgentConfig::load(&flags(path.clone())).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("server_adress"), "{err}");
        assert!(err.source().is_some_and(|c| c.is::<toml::de::Error>()));
        std::fs::write(&path, "trust_domain = \"Bad Domain\"\n").unwrap();
        let err = AgentConfig::load(&flags(path.clone())).unwrap_err();
        assert!(matches!(err, ConfigError::Unusable { .. }), "{err}");
        assert!(err.source().is_some_and(|c| c.is::<sigil::SpiffeIdError>()));
        std::fs::write(
            &path,
            "trust_domain = \"example.org\"\nserver_address = \"s:1\"\ninsecure_bootstrap = true\nready_max_sync_age = \"soon\"\n",
        )
        .unwrap();
        let err = AgentConfig::load(&flags(path.clone())).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid ready_max_sync_age: "),
            "{err}"
        );
        assert!(err.source().is_some_and(|c| c.is::<sigil::ttl::TtlError>()));
        // A join token is a secret: a refused one is not repeated in the message.
        std::fs::write(
            &path,
            "trust_domain = \"example.org\"\nserver_address = \"s:1\"\ninsecure_bootstrap = true\njoin_token = \"sec ret\"\n",
        )
        .unwrap();
        let err = AgentConfig::load(&flags(path)).unwrap_err();
        assert!(matches!(err, ConfigError::Rule { .. }), "{err}");
        assert!(!err.to_string().contains("sec ret"), "{err}");
    }

    #[test]
    fn material_errors_keep_their_causes() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().unwrap();
        let x = X509PopConfig {
            cert: dir.path().join("n.pem"),
            key: dir.path().join("n.key"),
        };
        let err = x.load().unwrap_err();
        assert!(
            matches!(
                err,
                MaterialError::Read {
                    key: "x509pop_cert",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.source().is_some_and(|c| c.is::<std::io::Error>()));
        std::fs::write(&x.cert, "junk").unwrap();
        let err = x.load().unwrap_err();
        assert!(matches!(err, MaterialError::Certificates { .. }), "{err}");
        assert!(err
            .source()
            .is_some_and(|c| c.is::<sigil::x509::X509Error>()));
        let k = K8sPsatConfig {
            cluster: "prod".into(),
            token_path: dir.path().join("token"),
        };
        let err = k.load_token().unwrap_err();
        assert!(matches!(err, MaterialError::ReadToken { .. }), "{err}");
        assert!(err.source().is_some_and(|c| c.is::<std::io::Error>()));
    }

    #[test]
    fn bad_values_name_their_key() {
        let base = "trust_domain = \"example.org\"\nserver_address = \"srv:8081\"\n";
        for (text, flags, key) in [
            ("", RunFlags::default(), "trust_domain is required"),
            ("trust_domain = \"example.org\"", RunFlags::default(), "server_address is required"),
            (base, RunFlags::default(), "trust_bundle is required"),
            (
                "trust_domain = \"example.org\"\nserver_address = \"srv\"\ninsecure_bootstrap = true",
                RunFlags::default(),
                "server_address",
            ),
            (
                "trust_domain = \"example.org\"\nserver_address = \"srv:http\"\ninsecure_bootstrap = true",
                RunFlags::default(),
                "port",
            ),
            (
                base,
                RunFlags {
                    insecure_bootstrap: true,
                    trust_bundle: Some("/b".into()),
                    ..Default::default()
                },
                "mutually exclusive",
            ),
            (
                base,
                RunFlags {
                    insecure_bootstrap: true,
                    join_token: Some("has space".into()),
                    ..Default::default()
                },
                "join_token",
            ),
        ] {
            let err = parse(text, flags).expect_err(text);
            assert!(format!("{err:#}").contains(key), "{text}: {err:#}");
        }
        assert!(toml::from_str::<FileConfig>("server_adress = \"x:1\"").is_err());
    }

    #[test]
    fn x509pop_needs_cert_and_key_and_excludes_join_token() -> anyhow::Result<()> {
        let base = "trust_domain = \"example.org\"\nserver_address = \"srv:8081\"\ninsecure_bootstrap = true\n";
        let c = parse(
            &format!("{base}x509pop_cert = \"/n.pem\"\n"),
            RunFlags {
                x509pop_key: Some("/n.key".into()),
                ..Default::default()
            },
        )?;
        assert_eq!(
            c.node_attestation,
            Some(NodeAttestation::X509Pop(X509PopConfig {
                cert: "/n.pem".into(),
                key: "/n.key".into()
            }))
        );
        assert!(parse(base, RunFlags::default())?.node_attestation.is_none());
        for (flags, want) in [
            (
                RunFlags {
                    x509pop_cert: Some("/n.pem".into()),
                    ..Default::default()
                },
                "x509pop_cert needs x509pop_key",
            ),
            (
                RunFlags {
                    x509pop_key: Some("/n.key".into()),
                    ..Default::default()
                },
                "x509pop_key needs x509pop_cert",
            ),
            (
                RunFlags {
                    x509pop_cert: Some("/n.pem".into()),
                    x509pop_key: Some("/n.key".into()),
                    join_token: Some("abc".into()),
                    ..Default::default()
                },
                "mutually exclusive",
            ),
        ] {
            let err = parse(base, flags).expect_err(want);
            assert!(format!("{err:#}").contains(want), "{err:#}");
        }
        Ok(())
    }

    #[test]
    fn k8s_psat_cluster_token_path_default_and_exclusivity() -> anyhow::Result<()> {
        let base = "trust_domain = \"example.org\"\nserver_address = \"srv:8081\"\ninsecure_bootstrap = true\n";
        let c = parse(
            base,
            RunFlags {
                k8s_psat_cluster: Some("prod".into()),
                ..Default::default()
            },
        )?;
        assert_eq!(
            c.node_attestation,
            Some(NodeAttestation::K8sPsat(K8sPsatConfig {
                cluster: "prod".into(),
                token_path: DEFAULT_K8S_PSAT_TOKEN_PATH.into()
            }))
        );
        let c = parse(
            &format!("{base}k8s_psat_cluster = \"file\"\nk8s_psat_token_path = \"/t\"\n"),
            RunFlags {
                k8s_psat_cluster: Some("flag".into()),
                ..Default::default()
            },
        )?;
        assert_eq!(
            c.node_attestation,
            Some(NodeAttestation::K8sPsat(K8sPsatConfig {
                cluster: "flag".into(),
                token_path: "/t".into()
            }))
        );
        assert!(parse(base, RunFlags::default())?.node_attestation.is_none());
        for (flags, want) in [
            (
                RunFlags {
                    k8s_psat_token_path: Some("/t".into()),
                    ..Default::default()
                },
                "k8s_psat_token_path needs k8s_psat_cluster",
            ),
            (
                RunFlags {
                    k8s_psat_cluster: Some("prod".into()),
                    join_token: Some("abc".into()),
                    ..Default::default()
                },
                "mutually exclusive",
            ),
            (
                RunFlags {
                    k8s_psat_cluster: Some("prod".into()),
                    x509pop_cert: Some("/n.pem".into()),
                    x509pop_key: Some("/n.key".into()),
                    ..Default::default()
                },
                "mutually exclusive",
            ),
            (
                RunFlags {
                    k8s_psat_cluster: Some("a/b".into()),
                    ..Default::default()
                },
                "invalid k8s_psat_cluster",
            ),
        ] {
            let err = parse(base, flags).expect_err(want);
            assert!(format!("{err:#}").contains(want), "{err:#}");
        }
        Ok(())
    }

    #[test]
    fn k8s_psat_token_is_read_trimmed_or_names_the_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let k = K8sPsatConfig {
            cluster: "prod".into(),
            token_path: dir.path().join("token"),
        };
        let err = k.load_token().expect_err("missing");
        assert!(
            format!("{err:#}").contains("k8s_psat_token_path"),
            "{err:#}"
        );
        std::fs::write(&k.token_path, "  \n")?;
        let err = k.load_token().expect_err("empty");
        assert!(format!("{err:#}").contains("is empty"), "{err:#}");
        std::fs::write(&k.token_path, "eyJ.a.b\n")?;
        assert_eq!(k.load_token()?, "eyJ.a.b");
        Ok(())
    }

    #[test]
    fn x509pop_files_load_or_name_the_file() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["node-1".to_string()])?.self_signed(&key)?;
        let (cert_path, key_path) = (dir.path().join("n.pem"), dir.path().join("n.key"));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        let x = X509PopConfig {
            cert: cert_path.clone(),
            key: key_path.clone(),
        };
        let (chain, der) = x.load()?;
        assert_eq!(chain, vec![cert.der().to_vec()]);
        assert_eq!(der, key.serialize_der());
        std::fs::write(&key_path, "junk")?;
        let err = x.load().expect_err("bad key");
        assert!(format!("{err:#}").contains("x509pop_key"), "{err:#}");
        let missing = X509PopConfig {
            cert: dir.path().join("missing.pem"),
            key: key_path,
        };
        let err = missing.load().expect_err("missing cert");
        assert!(format!("{err:#}").contains("x509pop_cert"), "{err:#}");
        Ok(())
    }

    #[test]
    fn k8s_workload_attestor_is_off_by_default_and_configured_by_file_or_flags(
    ) -> anyhow::Result<()> {
        use crate::workload_attestor::k8s;
        let base = "trust_domain = \"example.org\"\nserver_address = \"srv:8081\"\ninsecure_bootstrap = true\n";
        assert!(parse(base, RunFlags::default())?.kubelet.is_none());
        // NODE_NAME alone (set on every node by a DaemonSet) does not turn it on.
        let flags = RunFlags {
            node_name: Some("node-1".into()),
            ..Default::default()
        };
        assert!(parse(base, flags)?.kubelet.is_none());

        let c = parse(
            &format!("{base}workload_attestors = [\"k8s\"]\n"),
            RunFlags::default(),
        )?;
        let k = c.kubelet.expect("k8s attestor on");
        assert_eq!(k.url, k8s::DEFAULT_KUBELET_URL);
        assert_eq!(k.ca_path, PathBuf::from(k8s::DEFAULT_CA_PATH));
        assert_eq!(k.token_path, PathBuf::from(k8s::DEFAULT_TOKEN_PATH));

        let file = format!(
            "{base}workload_attestors = [\"k8s\"]\nkubelet_url = \"https://10.0.0.1:10250\"\nkubelet_ca_path = \"/ca\"\nkubelet_container_wait = \"20s\"\nnode_name = \"file-node\"\n"
        );
        let c = parse(
            &file,
            RunFlags {
                kubelet_url: Some("https://10.0.0.2:10250".into()),
                kubelet_token_path: Some("/tok".into()),
                node_name: Some("flag-node".into()),
                ..Default::default()
            },
        )?;
        let k = c.kubelet.expect("k8s attestor on");
        assert_eq!(k.url, "https://10.0.0.2:10250");
        assert_eq!(k.ca_path, PathBuf::from("/ca"));
        assert_eq!(k.token_path, PathBuf::from("/tok"));
        assert_eq!(k.container_wait, std::time::Duration::from_secs(20));
        assert_eq!(k.node_name.as_deref(), Some("flag-node"));

        let c = parse(
            base,
            RunFlags {
                workload_attestors: vec!["k8s".into()],
                kubelet_read_only_port: Some(10255),
                ..Default::default()
            },
        )?;
        assert_eq!(c.kubelet.expect("on").url, "http://127.0.0.1:10255");

        for (text, flags, want) in [
            (
                format!("{base}workload_attestors = [\"docker\"]\n"),
                RunFlags::default(),
                "unknown workload attestor \"docker\"",
            ),
            (
                base.to_string(),
                RunFlags {
                    kubelet_url: Some("https://10.0.0.2:10250".into()),
                    ..Default::default()
                },
                "--workload-attestor k8s",
            ),
            (
                format!("{base}kubelet_read_only_port = 10255\n"),
                RunFlags::default(),
                "--workload-attestor k8s",
            ),
            (
                base.to_string(),
                RunFlags {
                    workload_attestors: vec!["k8s".into()],
                    kubelet_url: Some("http://10.0.0.2:10255".into()),
                    ..Default::default()
                },
                "kubelet_url",
            ),
        ] {
            let err = parse(&text, flags).expect_err(want);
            assert!(format!("{err:#}").contains(want), "{want}: {err:#}");
        }
        Ok(())
    }

    #[test]
    fn sds_names_have_spire_defaults_and_must_be_distinct_plain_names() -> anyhow::Result<()> {
        let base = "trust_domain = \"example.org\"\nserver_address = \"srv:8081\"\ntrust_bundle = \"/b.pem\"\n";
        let c = parse(base, RunFlags::default())?;
        assert_eq!(c.sds, crate::workload_api::SdsConfig::default());
        assert_eq!(c.sds.default_svid_name, "default");
        assert_eq!(c.sds.default_bundle_name, "ROOTCA");
        assert_eq!(c.sds.default_all_bundles_name, "ALL");
        assert!(!c.sds.disable_spiffe_cert_validation);

        let c = parse(
            &format!("{base}[sds]\ndefault_svid_name = \"svid\"\ndefault_bundle_name = \"ca\"\ndisable_spiffe_cert_validation = true\n"),
            RunFlags {
                sds_default_svid_name: Some("mine".into()),
                sds_default_all_bundles_name: Some("every".into()),
                ..Default::default()
            },
        )?;
        assert_eq!(c.sds.default_svid_name, "mine", "the flag wins");
        assert_eq!(c.sds.default_bundle_name, "ca");
        assert_eq!(c.sds.default_all_bundles_name, "every");
        assert!(c.sds.disable_spiffe_cert_validation);

        for (text, want) in [
            ("[sds]\ndefault_svid_name = \"\"\n", "default_svid_name"),
            (
                "[sds]\ndefault_bundle_name = \"spiffe://example.org\"\n",
                "SPIFFE IDs",
            ),
            (
                "[sds]\ndefault_all_bundles_name = \"ROOTCA\"\n",
                "default_bundle_name has the same name",
            ),
            ("[sds]\nsvid_name = \"x\"\n", "unknown field"),
        ] {
            let err = toml::from_str::<FileConfig>(&format!("{base}{text}"))
                .map_err(anyhow::Error::from)
                .and_then(|f| Ok(AgentConfig::resolve(f, &RunFlags::default())?))
                .expect_err(want);
            assert!(format!("{err:#}").contains(want), "{want}: {err:#}");
        }
        Ok(())
    }
}
