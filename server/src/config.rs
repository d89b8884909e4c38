//! Server configuration: a TOML file (`--config`), every key overridable by a `run` flag.
//!
//! Precedence: flag > file > default. Only the trust domain is required. Unknown keys in the file
//! are an error (a typo must not silently fall back to a default).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
pub use sigil::config::ConfigError;
use sigil::logging::LogFormat;
use sigil::TrustDomain;

use crate::attestor::k8s_psat::{self, ClusterConfig, FileCluster, FileK8sPsat};
use crate::bundle_publisher::{self, BundlePublisherConfig, FileBundlePublisher, FileK8sConfigMap};
use crate::ca::{CaConfig, KeyType, UpstreamConfig};
use crate::datastore::postgres::PostgresOptions;
use crate::federation;
use crate::federation::endpoint::{
    self as bundle_endpoint, BundleEndpointConfig, FileBundleEndpoint,
};
use crate::federation::relationship::{BundleFormat, ConfiguredRelationship, RelationshipError};

/// Default node API address (SPIRE's server port).
pub const DEFAULT_BIND_ADDRESS: &str = "0.0.0.0:8081";
/// Default admin socket: SPIRE's layout, but under /run, where only root creates directories,
/// not the world-writable /tmp.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sigil-server/private/admin.sock";
/// Default health/metrics address.
pub const DEFAULT_HEALTH_ADDRESS: &str = "127.0.0.1:8082";
/// Default data directory (relative to the working directory, as SPIRE's `./.data`).
pub const DEFAULT_DATA_DIR: &str = "./.data";

/// The file as written by the operator; every field optional so flags can fill in.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Trust domain name, e.g. `example.org`.
    pub trust_domain: Option<String>,
    /// Where the CA keys and the SQLite database live.
    pub data_dir: Option<PathBuf>,
    /// Node API listen address.
    pub bind_address: Option<String>,
    /// Admin API Unix socket.
    pub admin_socket: Option<PathBuf>,
    /// Health/metrics HTTP address; `""` disables it.
    pub health_address: Option<String>,
    /// Log level directive (`info`, `debug`, `sigil_server=debug`).
    pub log_level: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// CA settings.
    #[serde(default)]
    pub ca: FileCa,
    /// Datastore settings.
    #[serde(default)]
    pub datastore: FileDatastore,
    /// Node attestor settings.
    #[serde(default)]
    pub node_attestor: FileNodeAttestor,
    /// Where the trust bundle is published for the agents.
    #[serde(default)]
    pub bundle_publisher: FileBundlePublisher,
    /// Federation with other trust domains.
    #[serde(default)]
    pub federation: FileFederation,
}

/// `[federation]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFederation {
    /// `[federation.bundle_endpoint]`: unset means this server serves no bundle endpoint.
    pub bundle_endpoint: Option<FileBundleEndpoint>,
    /// `[federation.federates_with."<trust domain>"]`: relationships defined by this file
    /// (read only through the admin API; see `federation/relationship.rs`).
    #[serde(default)]
    pub federates_with: BTreeMap<String, FileFederatesWith>,
}

/// `[federation.federates_with."<trust domain>"]`: SPIRE's keys, the profile's endpoint SPIFFE
/// ID beside it rather than in a nested block.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFederatesWith {
    /// The foreign trust domain's bundle endpoint, `https://`.
    pub bundle_endpoint_url: Option<String>,
    /// `https_web` or `https_spiffe`.
    pub bundle_endpoint_profile: Option<String>,
    /// The SPIFFE ID the endpoint presents (`https_spiffe` only).
    pub endpoint_spiffe_id: Option<String>,
    /// The foreign trust domain's bundle to start from, stored at start-up when none is
    /// stored yet.
    pub trust_domain_bundle_path: Option<PathBuf>,
    /// Format of that file: `pem` (default) or `spiffe`.
    pub trust_domain_bundle_format: Option<String>,
}

/// `[node_attestor]` section (join tokens need no settings).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNodeAttestor {
    /// `[node_attestor.x509pop]`: unset means x509pop is not offered.
    pub x509pop: Option<FileX509Pop>,
    /// `[node_attestor.k8s_psat.clusters.<name>]`: no cluster means k8s_psat is not offered.
    pub k8s_psat: Option<FileK8sPsat>,
}

/// `[node_attestor.x509pop]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileX509Pop {
    /// PEM file of the CA certificate(s) that issue node certificates.
    pub ca_bundle: PathBuf,
}

/// `[ca]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCa {
    /// `ec-p256` (default), `ec-p384` or `rsa-2048`.
    pub key_type: Option<String>,
    /// Lifetime of the self-signed root, e.g. `8760h`.
    pub ca_ttl: Option<String>,
    /// Default X509-SVID TTL, e.g. `1h`.
    pub default_x509_svid_ttl: Option<String>,
    /// Default JWT-SVID TTL, e.g. `5m`.
    pub default_jwt_svid_ttl: Option<String>,
    /// Subject organization of the CA.
    pub organization: Option<String>,
    /// Upstream intermediate CA from disk instead of a self-signed root.
    pub upstream: Option<FileUpstream>,
}

/// `[ca.upstream]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    /// PEM: the intermediate certificate first, then any further intermediates.
    pub cert_chain: PathBuf,
    /// PEM PKCS#8 key of the intermediate.
    pub key: PathBuf,
    /// PEM: the upstream root(s), which become the trust bundle.
    pub bundle: PathBuf,
    /// Program and arguments run at ½ of the intermediate's life to write a new intermediate
    /// into `cert_chain` and `key` (read again from ⅚ of its life).
    pub command: Option<Vec<String>>,
}

/// `[datastore]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDatastore {
    /// `sqlite` (default) or `postgres`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// SQLite database path; default `<data_dir>/datastore.sqlite3`.
    pub path: Option<PathBuf>,
    /// PostgreSQL: libpq connection string (URL or `key=value`); also
    /// `SIGIL_DATASTORE_CONNECTION_STRING`.
    pub connection_string: Option<String>,
    /// PostgreSQL: connections this server keeps at most [default: 16].
    pub max_connections: Option<usize>,
}

/// Which datastore the server uses, resolved from `[datastore]`.
#[derive(Debug, Clone)]
pub enum DatastoreConfig {
    /// The embedded SQLite database at this path.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A PostgreSQL database, shared by the servers configured with it (boxed: the parsed
    /// connection string is large).
    Postgres(Box<PostgresOptions>),
}

/// The environment variable that may hold `datastore.connection_string` (so it can come from a
/// secret rather than a file).
pub const CONNECTION_STRING_ENV: &str = "SIGIL_DATASTORE_CONNECTION_STRING";

/// `sigil-server run` flags; each overrides the file key of the same name.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct RunFlags {
    /// TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Trust domain name, e.g. example.org (required here or in the file).
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Directory for CA keys and the database [default: ./.data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node API listen address [default: 0.0.0.0:8081].
    #[arg(long, value_name = "HOST:PORT")]
    pub bind_address: Option<String>,
    /// Admin API Unix socket [default: /run/sigil-server/private/admin.sock].
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Health/metrics HTTP address; empty disables [default: 127.0.0.1:8082].
    #[arg(long, value_name = "HOST:PORT")]
    pub health_address: Option<String>,
    /// Log level, e.g. info, debug, sigil_server=debug [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long)]
    pub log_format: Option<String>,
    /// CA key type: ec-p256, ec-p384 or rsa-2048 [default: ec-p256].
    #[arg(long)]
    pub ca_key_type: Option<String>,
    /// Self-signed root lifetime [default: 8760h].
    #[arg(long, value_name = "DURATION")]
    pub ca_ttl: Option<String>,
    /// Default X509-SVID TTL [default: 1h].
    #[arg(long, value_name = "DURATION")]
    pub default_x509_svid_ttl: Option<String>,
    /// Default JWT-SVID TTL [default: 5m].
    #[arg(long, value_name = "DURATION")]
    pub default_jwt_svid_ttl: Option<String>,
    /// Upstream CA: intermediate certificate chain (PEM). Needs --upstream-key and --upstream-bundle.
    #[arg(long, value_name = "FILE", requires_all = ["upstream_key", "upstream_bundle"])]
    pub upstream_cert_chain: Option<PathBuf>,
    /// Upstream CA: intermediate key (PEM PKCS#8).
    #[arg(long, value_name = "FILE", requires = "upstream_cert_chain")]
    pub upstream_key: Option<PathBuf>,
    /// Upstream CA: root bundle (PEM).
    #[arg(long, value_name = "FILE", requires = "upstream_cert_chain")]
    pub upstream_bundle: Option<PathBuf>,
    /// Datastore: sqlite or postgres [default: sqlite].
    #[arg(long, value_name = "TYPE")]
    pub datastore_type: Option<String>,
    /// SQLite database path [default: DATA_DIR/datastore.sqlite3, DATA_DIR being --data-dir].
    #[arg(long, value_name = "FILE")]
    pub datastore_path: Option<PathBuf>,
    /// PostgreSQL connection string (URL or key=value). Prefer the environment variable or the
    /// file: a password on the command line is visible to other local users.
    #[arg(
        long,
        value_name = "CONNINFO",
        env = "SIGIL_DATASTORE_CONNECTION_STRING",
        hide_env_values = true
    )]
    pub datastore_connection_string: Option<String>,
    /// Enable x509pop node attestation: PEM CA certificate(s) trusted to issue node certificates.
    #[arg(long, value_name = "FILE")]
    pub x509pop_ca_bundle: Option<PathBuf>,
    /// Enable k8s_psat node attestation for this cluster; the other --k8s-psat-* flags set its
    /// keys (overriding the file's cluster of the same name).
    #[arg(long, value_name = "NAME")]
    pub k8s_psat_cluster: Option<String>,
    /// k8s_psat: service accounts allowed to attest, NAMESPACE:NAME (repeat or comma-separate).
    #[arg(
        long,
        value_name = "NS:SA",
        value_delimiter = ',',
        requires = "k8s_psat_cluster"
    )]
    pub k8s_psat_service_account_allow_list: Vec<String>,
    /// k8s_psat: audience the token must carry [default: sigil-server].
    #[arg(long, value_name = "AUDIENCE", requires = "k8s_psat_cluster")]
    pub k8s_psat_audience: Option<String>,
    /// k8s_psat: verify tokens with this JWKS file of the cluster's service-account issuer.
    #[arg(long, value_name = "FILE", requires = "k8s_psat_cluster")]
    pub k8s_psat_jwks_file: Option<PathBuf>,
    /// k8s_psat: verify tokens with keys from OIDC discovery of this issuer URL.
    #[arg(long, value_name = "URL", requires = "k8s_psat_cluster")]
    pub k8s_psat_oidc_discovery_url: Option<String>,
    /// k8s_psat: PEM roots for the OIDC discovery and JWKS URLs [default: the API server's CA].
    #[arg(long, value_name = "FILE", requires = "k8s_psat_cluster")]
    pub k8s_psat_ca_file: Option<PathBuf>,
    /// k8s_psat: verify tokens with the API server's TokenReview.
    #[arg(long, requires = "k8s_psat_cluster")]
    pub k8s_psat_use_token_review: bool,
    /// k8s_psat: API server URL [default in a pod: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT].
    #[arg(long, value_name = "URL", requires = "k8s_psat_cluster")]
    pub k8s_psat_api_server_url: Option<String>,
    /// k8s_psat: API server bearer token file [default: the pod's service-account token].
    #[arg(long, value_name = "FILE", requires = "k8s_psat_cluster")]
    pub k8s_psat_api_token_file: Option<PathBuf>,
    /// k8s_psat: API server CA (PEM) [default: the pod's service-account ca.crt].
    #[arg(long, value_name = "FILE", requires = "k8s_psat_cluster")]
    pub k8s_psat_api_ca_file: Option<PathBuf>,
    /// Publish the trust bundle into a Kubernetes ConfigMap (as [bundle_publisher.k8s_configmap]
    /// in the file); the other --bundle-publisher-k8s-configmap-* flags set its keys.
    #[arg(long)]
    pub bundle_publisher_k8s_configmap: bool,
    /// Bundle ConfigMap namespace [default: the pod's namespace, else sigil].
    #[arg(long, value_name = "NAMESPACE")]
    pub bundle_publisher_k8s_configmap_namespace: Option<String>,
    /// Bundle ConfigMap name [default: sigil-bundle].
    #[arg(long, value_name = "NAME")]
    pub bundle_publisher_k8s_configmap_name: Option<String>,
    /// Key of the bundle in the ConfigMap [default: bundle.pem].
    #[arg(long, value_name = "KEY")]
    pub bundle_publisher_k8s_configmap_key: Option<String>,
    /// Bundle ConfigMap: API server URL [default in a pod: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT].
    #[arg(long, value_name = "URL")]
    pub bundle_publisher_k8s_configmap_api_server_url: Option<String>,
    /// Bundle ConfigMap: API server bearer token file [default: the pod's service-account token].
    #[arg(long, value_name = "FILE")]
    pub bundle_publisher_k8s_configmap_api_token_file: Option<PathBuf>,
    /// Bundle ConfigMap: API server CA (PEM) [default: the pod's service-account ca.crt].
    #[arg(long, value_name = "FILE")]
    pub bundle_publisher_k8s_configmap_api_ca_file: Option<PathBuf>,
    /// Serve the federation bundle endpoint on this address (as [federation.bundle_endpoint]
    /// address in the file); the other --federation-bundle-endpoint-* flags set its keys.
    #[arg(long, value_name = "IP:PORT")]
    pub federation_bundle_endpoint_address: Option<String>,
    /// Bundle endpoint profile: https_spiffe (the server's SVID) or https_web [default: https_spiffe].
    #[arg(long, value_name = "PROFILE")]
    pub federation_bundle_endpoint_profile: Option<String>,
    /// Bundle endpoint, https_web: PEM certificate chain (re-read when it changes).
    #[arg(long, value_name = "FILE")]
    pub federation_bundle_endpoint_cert_file: Option<PathBuf>,
    /// Bundle endpoint, https_web: PEM private key (re-read when it changes).
    #[arg(long, value_name = "FILE")]
    pub federation_bundle_endpoint_key_file: Option<PathBuf>,
    /// Bundle endpoint: spiffe_refresh_hint served [default: 5m].
    #[arg(long, value_name = "DURATION")]
    pub federation_bundle_endpoint_refresh_hint: Option<String>,
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Node API address.
    pub bind_address: SocketAddr,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Health/metrics address, if enabled.
    pub health_address: Option<SocketAddr>,
    /// Log level directive.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// CA configuration.
    pub ca: CaConfig,
    /// The datastore.
    pub datastore: DatastoreConfig,
    /// x509pop CA bundle (PEM); `None`: x509pop is not offered.
    pub x509pop_ca_bundle: Option<PathBuf>,
    /// k8s_psat clusters by name; empty: k8s_psat is not offered.
    pub k8s_psat: BTreeMap<String, ClusterConfig>,
    /// Where the trust bundle is published (nowhere by default).
    pub bundle_publisher: BundlePublisherConfig,
    /// The federation bundle endpoint; `None`: not served.
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    /// Federation relationships of the config file, ordered by trust domain.
    pub federates_with: Vec<ConfiguredRelationship>,
}

impl ServerConfig {
    /// Reads the file named by `--config` (if any) and applies the flags.
    pub fn load(flags: &RunFlags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => sigil::config::read_toml(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(file, flags)
    }

    /// Merges file and flags, validating every value and naming the key that is wrong.
    pub fn resolve(file: FileConfig, flags: &RunFlags) -> Result<Self, ConfigError> {
        let trust_domain =
            sigil::config::resolve_trust_domain(flags.trust_domain.clone(), file.trust_domain)?;
        let data_dir = flags
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let bind_address = addr(
            "bind_address",
            flags.bind_address.clone().or(file.bind_address).as_deref(),
            DEFAULT_BIND_ADDRESS,
        )?;
        let admin_socket = flags
            .admin_socket
            .clone()
            .or(file.admin_socket)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
        let health = flags
            .health_address
            .clone()
            .or(file.health_address)
            .unwrap_or_else(|| DEFAULT_HEALTH_ADDRESS.to_string());
        let health_address = if health.is_empty() {
            None
        } else {
            Some(addr("health_address", Some(&health), "")?)
        };
        let log_level = flags
            .log_level
            .clone()
            .or(file.log_level)
            .unwrap_or_else(|| "info".into());
        let log_format = flags
            .log_format
            .clone()
            .or(file.log_format)
            .map(|s| s.parse::<LogFormat>())
            .transpose()
            .map_err(|e| ConfigError::value("log_format", e))?
            .unwrap_or_default();

        let mut ca = CaConfig::new(trust_domain.clone(), data_dir.join("ca"));
        if let Some(kt) = flags.ca_key_type.clone().or(file.ca.key_type) {
            ca.key_type = kt
                .parse::<KeyType>()
                .map_err(|e| ConfigError::value("ca.key_type", e))?;
        }
        if let Some(d) = duration("ca.ca_ttl", flags.ca_ttl.clone().or(file.ca.ca_ttl))? {
            ca.ca_ttl = d;
        }
        if let Some(d) = duration(
            "ca.default_x509_svid_ttl",
            flags
                .default_x509_svid_ttl
                .clone()
                .or(file.ca.default_x509_svid_ttl),
        )? {
            sigil::ttl::check_x509_svid_ttl(d)
                .map_err(|e| ConfigError::value("ca.default_x509_svid_ttl", e))?;
            ca.default_x509_svid_ttl = d;
        }
        if let Some(d) = duration(
            "ca.default_jwt_svid_ttl",
            flags
                .default_jwt_svid_ttl
                .clone()
                .or(file.ca.default_jwt_svid_ttl),
        )? {
            sigil::ttl::check_jwt_svid_ttl(d)
                .map_err(|e| ConfigError::value("ca.default_jwt_svid_ttl", e))?;
            ca.default_jwt_svid_ttl = d;
        }
        if let Some(org) = file.ca.organization {
            ca.organization = org;
        }
        ca.upstream = match (&flags.upstream_cert_chain, file.ca.upstream) {
            (Some(chain), _) => Some(UpstreamConfig {
                cert_chain_path: chain.clone(),
                key_path: flags.upstream_key.clone().ok_or_else(|| {
                    ConfigError::missing(
                        "--upstream-key",
                        "--upstream-cert-chain needs the upstream CA's key (PEM)",
                    )
                })?,
                bundle_path: flags.upstream_bundle.clone().ok_or_else(|| {
                    ConfigError::missing(
                        "--upstream-bundle",
                        "--upstream-cert-chain needs the upstream trust bundle (PEM)",
                    )
                })?,
                command: None,
            }),
            (None, Some(u)) => Some(UpstreamConfig {
                cert_chain_path: u.cert_chain,
                key_path: u.key,
                bundle_path: u.bundle,
                command: match u.command {
                    Some(argv) if argv.is_empty() || argv[0].is_empty() => {
                        return Err(ConfigError::value(
                            "ca.upstream.command",
                            "give the program and its arguments, e.g. [\"/usr/local/bin/renew-intermediate\"]",
                        ))
                    }
                    other => other,
                },
            }),
            (None, None) => None,
        };
        let datastore = resolve_datastore(file.datastore, flags, &data_dir)?;
        let x509pop_ca_bundle = flags
            .x509pop_ca_bundle
            .clone()
            .or(file.node_attestor.x509pop.map(|x| x.ca_bundle));
        if x509pop_ca_bundle
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(ConfigError::rule(
                "node_attestor.x509pop.ca_bundle",
                "the path is empty",
            ));
        }
        let mut k8s_clusters = file
            .node_attestor
            .k8s_psat
            .map(|k| k.clusters)
            .unwrap_or_default();
        if let Some(name) = &flags.k8s_psat_cluster {
            let from_file = k8s_clusters.remove(name).unwrap_or_default();
            k8s_clusters.insert(name.clone(), from_file.overridden_by(k8s_psat_flags(flags)));
        }
        let in_cluster = crate::kube::InCluster::detect();
        // Its messages name the node_attestor.k8s_psat key that is wrong.
        let k8s_psat =
            k8s_psat::resolve_clusters(k8s_clusters, in_cluster.api_server_url.as_deref())?;
        let configmap_flags = bundle_publisher_flags(flags);
        let configmap = match file.bundle_publisher.k8s_configmap {
            Some(f) => Some(f.overridden_by(configmap_flags)),
            None if flags.bundle_publisher_k8s_configmap => Some(configmap_flags),
            None if configmap_flags != FileK8sConfigMap::default() => {
                return Err(ConfigError::conflict(
                    "--bundle-publisher-k8s-configmap-* flags need the ConfigMap publisher on: pass \
                     --bundle-publisher-k8s-configmap or add [bundle_publisher.k8s_configmap] to \
                     the config file",
                ))
            }
            None => None,
        };
        let bundle_publisher = BundlePublisherConfig {
            // Its messages name the bundle_publisher.k8s_configmap key that is wrong.
            k8s_configmap: bundle_publisher::resolve_k8s_configmap(configmap, &in_cluster)?,
        };
        let endpoint_flags = bundle_endpoint_flags(flags);
        let endpoint = match file.federation.bundle_endpoint {
            Some(f) => Some(f.overridden_by(endpoint_flags)),
            None if endpoint_flags.address.is_some() => Some(endpoint_flags),
            None if endpoint_flags != FileBundleEndpoint::default() => {
                return Err(ConfigError::conflict(
                    "--federation-bundle-endpoint-* flags need the bundle endpoint on: pass \
                     --federation-bundle-endpoint-address or add [federation.bundle_endpoint] to \
                     the config file",
                ))
            }
            None => None,
        };
        // Its messages name the federation.bundle_endpoint key that is wrong.
        let bundle_endpoint = bundle_endpoint::resolve(endpoint)?;
        let federates_with = resolve_federates_with(&trust_domain, file.federation.federates_with)?;
        Ok(Self {
            federates_with,
            trust_domain,
            data_dir,
            bind_address,
            admin_socket,
            health_address,
            log_level,
            log_format,
            ca,
            datastore,
            x509pop_ca_bundle,
            k8s_psat,
            bundle_publisher,
            bundle_endpoint,
        })
    }
}

/// The bundle endpoint keys given by `--federation-bundle-endpoint-*` flags.
fn bundle_endpoint_flags(flags: &RunFlags) -> FileBundleEndpoint {
    FileBundleEndpoint {
        address: flags.federation_bundle_endpoint_address.clone(),
        profile: flags.federation_bundle_endpoint_profile.clone(),
        cert_file: flags.federation_bundle_endpoint_cert_file.clone(),
        key_file: flags.federation_bundle_endpoint_key_file.clone(),
        refresh_hint: flags.federation_bundle_endpoint_refresh_hint.clone(),
    }
}

/// The cluster keys given by `--k8s-psat-*` flags.
fn k8s_psat_flags(flags: &RunFlags) -> FileCluster {
    FileCluster {
        service_account_allow_list: Some(flags.k8s_psat_service_account_allow_list.clone())
            .filter(|l| !l.is_empty()),
        audience: flags.k8s_psat_audience.clone(),
        jwks_file: flags.k8s_psat_jwks_file.clone(),
        oidc_discovery_url: flags.k8s_psat_oidc_discovery_url.clone(),
        ca_file: flags.k8s_psat_ca_file.clone(),
        use_token_review: flags.k8s_psat_use_token_review.then_some(true),
        api_server_url: flags.k8s_psat_api_server_url.clone(),
        api_token_file: flags.k8s_psat_api_token_file.clone(),
        api_ca_file: flags.k8s_psat_api_ca_file.clone(),
    }
}

/// The ConfigMap publisher keys given by `--bundle-publisher-k8s-configmap-*` flags.
fn bundle_publisher_flags(flags: &RunFlags) -> FileK8sConfigMap {
    FileK8sConfigMap {
        namespace: flags.bundle_publisher_k8s_configmap_namespace.clone(),
        name: flags.bundle_publisher_k8s_configmap_name.clone(),
        key: flags.bundle_publisher_k8s_configmap_key.clone(),
        api_server_url: flags.bundle_publisher_k8s_configmap_api_server_url.clone(),
        api_token_file: flags.bundle_publisher_k8s_configmap_api_token_file.clone(),
        api_ca_file: flags.bundle_publisher_k8s_configmap_api_ca_file.clone(),
    }
}

/// `[datastore]` and the `--datastore-*` flags (the connection string also from
/// [`CONNECTION_STRING_ENV`], through its flag): keys of the other type are refused rather than
/// ignored, so a half-changed configuration does not silently run on the wrong database.
fn resolve_datastore(
    file: FileDatastore,
    flags: &RunFlags,
    data_dir: &std::path::Path,
) -> Result<DatastoreConfig, ConfigError> {
    let kind = flags.datastore_type.clone().or(file.kind);
    let path = flags.datastore_path.clone().or(file.path);
    let connection_string = flags
        .datastore_connection_string
        .clone()
        .or(file.connection_string);
    match kind.as_deref() {
        None | Some("sqlite") => {
            if connection_string.is_some() {
                return Err(ConfigError::conflict(format!(
                    "datastore.connection_string (or {CONNECTION_STRING_ENV}) is set, but the \
                     datastore type is sqlite: set type = \"postgres\" in [datastore] to use \
                     PostgreSQL, or unset the connection string"
                )));
            }
            if file.max_connections.is_some() {
                return Err(ConfigError::conflict(
                    "datastore.max_connections is for type = \"postgres\"; the sqlite datastore \
                     has no connection pool",
                ));
            }
            Ok(DatastoreConfig::Sqlite {
                path: path.unwrap_or_else(|| data_dir.join("datastore.sqlite3")),
            })
        }
        Some("postgres") => {
            if path.is_some() {
                return Err(ConfigError::conflict(
                    "datastore.path (--datastore-path) is for type = \"sqlite\"; the postgres \
                     datastore is named by datastore.connection_string",
                ));
            }
            let conninfo = connection_string
                .filter(|c| !c.trim().is_empty())
                .ok_or_else(|| {
                    ConfigError::missing(
                        "datastore.connection_string",
                        format!(
                            "type = \"postgres\" needs the database's connection string, in \
                             [datastore] or in the {CONNECTION_STRING_ENV} environment \
                             variable, e.g. postgresql://sigil@db.example.org:5432/sigil"
                        ),
                    )
                })?;
            let mut options = PostgresOptions::parse(&conninfo)
                .map_err(|e| ConfigError::value("datastore.connection_string", e))?;
            if let Some(n) = file.max_connections {
                if n == 0 {
                    return Err(ConfigError::invalid(
                        "datastore.max_connections",
                        "0",
                        "at least 1 connection is needed",
                    ));
                }
                options.max_connections = n;
            }
            Ok(DatastoreConfig::Postgres(Box::new(options)))
        }
        Some(other) => Err(ConfigError::invalid(
            "datastore.type",
            other,
            "supported: sqlite, postgres",
        )),
    }
}

/// `[federation.federates_with."<td>"]`: each relationship checked by the rules of
/// `federation::relationship`, each error naming the full key; the initial bundle read and
/// parsed now, so a bad file stops the start rather than the first fetch.
fn resolve_federates_with(
    own: &TrustDomain,
    file: BTreeMap<String, FileFederatesWith>,
) -> Result<Vec<ConfiguredRelationship>, ConfigError> {
    let mut out: Vec<ConfiguredRelationship> = Vec::new();
    for (name, f) in file {
        let key = |field: &str| format!("federation.federates_with.{name:?}.{field}");
        let refused = |e: RelationshipError| {
            ConfigError::invalid(
                key(e.field()),
                match e.field() {
                    "trust_domain" => name.clone(),
                    "bundle_endpoint_url" => f.bundle_endpoint_url.clone().unwrap_or_default(),
                    "bundle_endpoint_profile" => {
                        f.bundle_endpoint_profile.clone().unwrap_or_default()
                    }
                    "endpoint_spiffe_id" => f.endpoint_spiffe_id.clone().unwrap_or_default(),
                    _ => String::new(),
                },
                e.to_string(),
            )
        };
        let url = f.bundle_endpoint_url.as_deref().ok_or_else(|| {
            ConfigError::missing(
                key("bundle_endpoint_url"),
                "the foreign trust domain's bundle endpoint, e.g. https://other.org:8443",
            )
        })?;
        let profile = f.bundle_endpoint_profile.as_deref().ok_or_else(|| {
            ConfigError::missing(
                key("bundle_endpoint_profile"),
                "https_web (Web PKI) or https_spiffe (with endpoint_spiffe_id)",
            )
        })?;
        let relationship = federation::relationship::relationship(
            own,
            &name,
            url,
            profile,
            f.endpoint_spiffe_id.as_deref(),
        )
        .map_err(refused)?;
        if out
            .iter()
            .any(|c| c.relationship.trust_domain == relationship.trust_domain)
        {
            return Err(ConfigError::conflict(format!(
                "[federation.federates_with] names trust domain {} twice (as a name and as \
                 spiffe://{0}); keep one",
                relationship.trust_domain
            )));
        }
        let format = f
            .trust_domain_bundle_format
            .as_deref()
            .map(str::parse::<BundleFormat>)
            .transpose()
            .map_err(|e| {
                ConfigError::invalid(
                    key("trust_domain_bundle_format"),
                    f.trust_domain_bundle_format.clone().unwrap_or_default(),
                    e.to_string(),
                )
            })?;
        let initial_bundle = match &f.trust_domain_bundle_path {
            None if format.is_some() => {
                return Err(ConfigError::conflict(format!(
                    "{} is set without {}",
                    key("trust_domain_bundle_format"),
                    key("trust_domain_bundle_path")
                )))
            }
            None => None,
            Some(path) => {
                let content = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::unusable(
                        key("trust_domain_bundle_path"),
                        path.display().to_string(),
                        e,
                    )
                })?;
                let bundle = federation::relationship::parse_bundle(
                    &relationship.trust_domain,
                    format.unwrap_or_default(),
                    &content,
                )
                .map_err(|e| {
                    ConfigError::unusable(
                        key("trust_domain_bundle_path"),
                        path.display().to_string(),
                        e,
                    )
                })?;
                Some(bundle)
            }
        };
        out.push(ConfiguredRelationship {
            relationship,
            initial_bundle,
        });
    }
    out.sort_by(|a, b| {
        a.relationship
            .trust_domain
            .cmp(&b.relationship.trust_domain)
    });
    Ok(out)
}

fn addr(key: &'static str, value: Option<&str>, default: &str) -> Result<SocketAddr, ConfigError> {
    let v = value.unwrap_or(default);
    v.parse().map_err(|_| {
        ConfigError::invalid(
            key,
            v,
            "expected HOST:PORT with an IP address, e.g. 127.0.0.1:8081",
        )
    })
}

fn duration(key: &'static str, value: Option<String>) -> Result<Option<Duration>, ConfigError> {
    value
        .map(|v| sigil::ttl::parse(&v).map_err(|e| ConfigError::value(key, e)))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str, flags: RunFlags) -> anyhow::Result<ServerConfig> {
        let file: FileConfig = toml::from_str(toml_text)?;
        Ok(ServerConfig::resolve(file, &flags)?)
    }

    #[test]
    fn config_errors_are_typed_and_keep_their_causes() {
        use std::error::Error as _;
        let resolve = |text: &str| {
            ServerConfig::resolve(
                toml::from_str(text).expect("valid TOML"),
                &RunFlags::default(),
            )
        };
        let err = resolve("").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Missing { key, .. } if key == "trust_domain"),
            "{err}"
        );
        let err = resolve("trust_domain = \"example.org\"\n[ca]\nca_ttl = \"0s\"\n").unwrap_err();
        assert!(
            err.source().is_some_and(|c| c.is::<sigil::ttl::TtlError>()),
            "{err}"
        );
        let err =
            resolve("trust_domain = \"example.org\"\n[datastore]\ntype = \"mysql\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "invalid datastore.type \"mysql\": supported: sqlite, postgres"
        );
        // A section checked by its own module gives the same typed error.
        let err =
            resolve("trust_domain = \"example.org\"\n[node_attestor.k8s_psat.clusters.\"a b\"]\n")
                .unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("cluster name \"a b\""), "{err}");
    }

    #[test]
    fn federates_with_relationships_are_checked_naming_the_key() -> anyhow::Result<()> {
        let resolve = |body: &str| {
            ServerConfig::resolve(
                toml::from_str(&format!("trust_domain = \"example.org\"\n{body}"))
                    .expect("valid TOML"),
                &RunFlags::default(),
            )
        };
        let dir = tempfile::tempdir()?;
        let bundle = dir.path().join("other.pem");
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&bundle, params.self_signed(&key)?.pem())?;
        let c = resolve(&format!(
            r#"
[federation.federates_with."other.org"]
bundle_endpoint_url = "https://other.org:8443"
bundle_endpoint_profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://other.org/spire/server"
trust_domain_bundle_path = "{}"
trust_domain_bundle_format = "pem"

[federation.federates_with."aaa.org"]
bundle_endpoint_url = "https://aaa.org/bundle"
bundle_endpoint_profile = "https_web"
"#,
            bundle.display()
        ))?;
        let names: Vec<&str> = c
            .federates_with
            .iter()
            .map(|r| r.relationship.trust_domain.name())
            .collect();
        assert_eq!(names, ["aaa.org", "other.org"]);
        let other = &c.federates_with[1];
        assert_eq!(
            other
                .initial_bundle
                .as_ref()
                .map(|b| b.x509_authorities.len()),
            Some(1)
        );

        let cases = [
            (
                "[federation.federates_with.\"other.org\"]\nbundle_endpoint_profile = \"https_web\"\n",
                "federation.federates_with.\"other.org\".bundle_endpoint_url is required",
            ),
            (
                "[federation.federates_with.\"other.org\"]\nbundle_endpoint_url = \"http://o.org\"\nbundle_endpoint_profile = \"https_web\"\n",
                "invalid federation.federates_with.\"other.org\".bundle_endpoint_url \"http://o.org\"",
            ),
            (
                "[federation.federates_with.\"example.org\"]\nbundle_endpoint_url = \"https://o.org\"\nbundle_endpoint_profile = \"https_web\"\n",
                "own trust domain",
            ),
            (
                "[federation.federates_with.\"other.org\"]\nbundle_endpoint_url = \"https://o.org\"\nbundle_endpoint_profile = \"https_spiffe\"\n",
                "federation.federates_with.\"other.org\".endpoint_spiffe_id",
            ),
            (
                "[federation.federates_with.\"other.org\"]\nbundle_endpoint_url = \"https://o.org\"\nbundle_endpoint_profile = \"https_web\"\ntrust_domain_bundle_path = \"/nonexistent/b.pem\"\n",
                "federation.federates_with.\"other.org\".trust_domain_bundle_path \"/nonexistent/b.pem\"",
            ),
            (
                "[federation.federates_with.\"other.org\"]\nbundle_endpoint_url = \"https://o.org\"\nbundle_endpoint_profile = \"https_web\"\ntrust_domain_bundle_format = \"der\"\n",
                "trust_domain_bundle_format \"der\"",
            ),
            (
                "[federation.federates_with.\"other.org\"]\nbundle_endpoint_url = \"https://o.org\"\nbundle_endpoint_profile = \"https_web\"\n[federation.federates_with.\"spiffe://other.org\"]\nbundle_endpoint_url = \"https://o.org\"\nbundle_endpoint_profile = \"https_web\"\n",
                "twice",
            ),
        ];
        for (body, says) in cases {
            let err = resolve(body).expect_err(body);
            assert!(err.to_string().contains(says), "{body}: {err}");
        }
        let err = toml::from_str::<FileConfig>(
            "[federation.federates_with.\"o.org\"]\nbundle_endpoint_uri = \"https://o.org\"\n",
        )
        .expect_err("unknown key");
        assert!(err.to_string().contains("bundle_endpoint_uri"), "{err}");
        Ok(())
    }

    #[test]
    fn defaults_and_required_trust_domain() -> anyhow::Result<()> {
        let err = parse("", RunFlags::default()).expect_err("no trust domain");
        assert!(
            err.to_string().contains("trust_domain is required"),
            "{err}"
        );
        let c = parse("trust_domain = \"example.org\"", RunFlags::default())?;
        assert_eq!(c.trust_domain.name(), "example.org");
        assert_eq!(c.bind_address.to_string(), DEFAULT_BIND_ADDRESS);
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert!(
            matches!(&c.datastore, DatastoreConfig::Sqlite { path } if path == &PathBuf::from("./.data/datastore.sqlite3")),
            "{:?}",
            c.datastore
        );
        assert_eq!(c.ca.default_x509_svid_ttl, Duration::from_secs(3600));
        assert_eq!(
            c.ca.ca_ttl,
            Duration::from_secs(24 * 3600),
            "SPIRE's default"
        );
        assert!(c.x509pop_ca_bundle.is_none(), "x509pop is off by default");
        assert!(c.k8s_psat.is_empty(), "k8s_psat is off by default");
        assert!(
            c.bundle_publisher.k8s_configmap.is_none(),
            "the bundle publisher is off by default"
        );
        Ok(())
    }

    #[test]
    fn flags_override_file() -> anyhow::Result<()> {
        let flags = RunFlags {
            trust_domain: Some("flag.org".into()),
            data_dir: Some("/d".into()),
            default_x509_svid_ttl: Some("2m".into()),
            health_address: Some(String::new()),
            ..Default::default()
        };
        let c = parse(
            "trust_domain = \"file.org\"\nbind_address = \"127.0.0.1:9\"\n[ca]\ndefault_x509_svid_ttl = \"2h\"\n",
            flags,
        )?;
        assert_eq!(c.trust_domain.name(), "flag.org");
        assert_eq!(c.bind_address.to_string(), "127.0.0.1:9");
        assert_eq!(c.ca.default_x509_svid_ttl, Duration::from_secs(120));
        assert!(
            matches!(&c.datastore, DatastoreConfig::Sqlite { path } if path == &PathBuf::from("/d/datastore.sqlite3")),
            "{:?}",
            c.datastore
        );
        assert!(c.health_address.is_none());
        Ok(())
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            ("trust_domain = \"Bad.Org\"", "trust_domain"),
            (
                "trust_domain = \"a.org\"\nbind_address = \"localhost\"",
                "bind_address",
            ),
            (
                "trust_domain = \"a.org\"\nhealth_address = \"x:y\"",
                "health_address",
            ),
            (
                "trust_domain = \"a.org\"\nlog_format = \"xml\"",
                "log_format",
            ),
            (
                "trust_domain = \"a.org\"\n[ca]\nkey_type = \"dsa\"",
                "ca.key_type",
            ),
            (
                "trust_domain = \"a.org\"\n[ca]\nca_ttl = \"forever\"",
                "ca.ca_ttl",
            ),
            (
                "trust_domain = \"a.org\"\n[ca]\ndefault_x509_svid_ttl = \"20s\"",
                "invalid ca.default_x509_svid_ttl: X509-SVID TTL 20s is shorter than the minimum of 1m",
            ),
            (
                "trust_domain = \"a.org\"\n[ca]\ndefault_jwt_svid_ttl = \"10s\"",
                "invalid ca.default_jwt_svid_ttl: JWT-SVID TTL 10s is shorter than the minimum of 30s",
            ),
            (
                "trust_domain = \"a.org\"\n[datastore]\ntype = \"mysql\"",
                "datastore.type",
            ),
        ] {
            let err = parse(text, RunFlags::default()).expect_err(text);
            assert!(format!("{err:#}").contains(key), "{text}: {err:#}");
        }
        let err = parse(
            "trust_domain = \"a.org\"\n[node_attestor.x509pop]\nca_bundle = \"\"",
            RunFlags::default(),
        )
        .expect_err("empty ca_bundle");
        assert!(
            format!("{err:#}").contains("node_attestor.x509pop.ca_bundle"),
            "{err:#}"
        );
        // Unknown keys are refused by the TOML layer.
        assert!(
            toml::from_str::<FileConfig>("[node_attestor.x509pop]\nca_bundel = \"x\"").is_err()
        );
        assert!(toml::from_str::<FileConfig>("[node_attestor.k8s]\nx = 1").is_err());
        assert!(toml::from_str::<FileConfig>("trust_domian = \"a.org\"").is_err());
    }

    #[test]
    fn postgres_datastore_from_file_flags_or_environment() -> anyhow::Result<()> {
        let text = "trust_domain = \"a.org\"\n[datastore]\ntype = \"postgres\"\n\
            connection_string = \"postgresql://sigil:pw@db.example:6432/ids\"\n\
            max_connections = 4\n";
        let c = parse(text, RunFlags::default())?;
        let DatastoreConfig::Postgres(options) = &c.datastore else {
            panic!("not postgres: {:?}", c.datastore);
        };
        assert_eq!(
            options.target().to_string(),
            "host=db.example port=6432 user=sigil dbname=ids"
        );
        assert_eq!(options.max_connections, 4);
        assert!(!format!("{c:?}").contains("pw@"), "no password in Debug");

        // The flag (and so SIGIL_DATASTORE_CONNECTION_STRING, which clap reads into it) wins
        // over the file.
        let c = parse(
            text,
            RunFlags {
                datastore_connection_string: Some("host=/run/postgresql dbname=other".into()),
                ..Default::default()
            },
        )?;
        let DatastoreConfig::Postgres(options) = &c.datastore else {
            panic!("not postgres: {:?}", c.datastore);
        };
        assert_eq!(
            options.target().to_string(),
            "host=/run/postgresql dbname=other"
        );
        let c = parse(
            "trust_domain = \"a.org\"",
            RunFlags {
                datastore_type: Some("postgres".into()),
                datastore_connection_string: Some("postgresql://db/sigil".into()),
                ..Default::default()
            },
        )?;
        assert!(matches!(c.datastore, DatastoreConfig::Postgres(_)));
        Ok(())
    }

    #[test]
    fn upstream_command_from_file() -> anyhow::Result<()> {
        let base = "trust_domain = \"a.org\"\n[ca.upstream]\ncert_chain = \"/c.pem\"\nkey = \"/k.pem\"\nbundle = \"/b.pem\"\n";
        let c = parse(base, RunFlags::default())?;
        assert_eq!(c.ca.upstream.and_then(|u| u.command), None);
        let c = parse(
            &format!("{base}command = [\"/usr/local/bin/renew\", \"--now\"]\n"),
            RunFlags::default(),
        )?;
        assert_eq!(
            c.ca.upstream.and_then(|u| u.command),
            Some(vec![
                "/usr/local/bin/renew".to_string(),
                "--now".to_string()
            ])
        );
        let err = parse(&format!("{base}command = []\n"), RunFlags::default())
            .expect_err("an empty command");
        assert!(err.to_string().contains("ca.upstream.command"), "{err}");
        Ok(())
    }

    #[test]
    fn postgres_datastore_errors_say_what_to_fix_without_the_password() {
        for (text, flags, expected) in [
            (
                "[datastore]\ntype = \"postgres\"",
                RunFlags::default(),
                "datastore.connection_string is required: type = \"postgres\" needs the \
                 database's connection string, in [datastore] or in the \
                 SIGIL_DATASTORE_CONNECTION_STRING environment variable",
            ),
            (
                "[datastore]\ntype = \"postgres\"\nconnection_string = \"postgresql://u:s3cret@db:port/x\"",
                RunFlags::default(),
                "invalid datastore.connection_string: the PostgreSQL connection string does not \
                 parse: invalid value for option `port`",
            ),
            (
                "[datastore]\ntype = \"postgres\"\nconnection_string = \"host=db password=s3cret sslmode=require\"",
                RunFlags::default(),
                "invalid datastore.connection_string: sslmode=require is set, but this \
                 sigil-server does not connect to PostgreSQL over TLS yet",
            ),
            (
                "[datastore]\ntype = \"postgres\"\nconnection_string = \"postgresql://db/x\"\npath = \"/x.db\"",
                RunFlags::default(),
                "datastore.path (--datastore-path) is for type = \"sqlite\"",
            ),
            (
                "[datastore]\ntype = \"postgres\"\nconnection_string = \"postgresql://db/x\"\nmax_connections = 0",
                RunFlags::default(),
                "invalid datastore.max_connections \"0\": at least 1 connection is needed",
            ),
            (
                "",
                RunFlags {
                    datastore_connection_string: Some("postgresql://u:s3cret@db/x".into()),
                    ..Default::default()
                },
                "datastore.connection_string (or SIGIL_DATASTORE_CONNECTION_STRING) is set, but \
                 the datastore type is sqlite",
            ),
        ] {
            let text = format!("trust_domain = \"a.org\"\n{text}");
            let err = parse(&text, flags).expect_err(&text);
            let msg = format!("{err:#}");
            assert!(msg.contains(expected), "{text}:\n{msg}\nexpected: {expected}");
            assert!(!msg.contains("s3cret"), "{text}: the password is echoed: {msg}");
        }
    }

    #[test]
    fn x509pop_ca_bundle_from_file_or_flag() -> anyhow::Result<()> {
        let text =
            "trust_domain = \"a.org\"\n[node_attestor.x509pop]\nca_bundle = \"/etc/ca.pem\"\n";
        let c = parse(text, RunFlags::default())?;
        assert_eq!(c.x509pop_ca_bundle, Some(PathBuf::from("/etc/ca.pem")));
        let c = parse(
            text,
            RunFlags {
                x509pop_ca_bundle: Some("/flag.pem".into()),
                ..Default::default()
            },
        )?;
        assert_eq!(c.x509pop_ca_bundle, Some(PathBuf::from("/flag.pem")));
        Ok(())
    }

    #[test]
    fn k8s_psat_clusters_from_file_and_flags() -> anyhow::Result<()> {
        use crate::attestor::k8s_psat::Verification;
        let text = "trust_domain = \"a.org\"\n\
            [node_attestor.k8s_psat.clusters.prod]\n\
            service_account_allow_list = [\"sigil:sigil-agent\"]\n\
            jwks_file = \"/etc/sigil/prod-jwks.json\"\n\
            api_server_url = \"https://prod-api:6443\"\n\
            [node_attestor.k8s_psat.clusters.dev]\n\
            service_account_allow_list = [\"sigil:sigil-agent\", \"dev:agent\"]\n\
            use_token_review = true\n\
            api_server_url = \"https://dev-api:6443\"\n";
        let c = parse(text, RunFlags::default())?;
        assert_eq!(c.k8s_psat.len(), 2);
        assert_eq!(
            c.k8s_psat["prod"].verification,
            Verification::JwksFile("/etc/sigil/prod-jwks.json".into())
        );
        assert_eq!(c.k8s_psat["dev"].service_account_allow_list.len(), 2);
        assert_eq!(c.k8s_psat["dev"].audience, "sigil-server");

        // Flags override the file's cluster of the same name, key by key.
        let c = parse(
            text,
            RunFlags {
                k8s_psat_cluster: Some("prod".into()),
                k8s_psat_use_token_review: true,
                k8s_psat_audience: Some("spire-server".into()),
                ..Default::default()
            },
        )?;
        assert_eq!(c.k8s_psat["prod"].verification, Verification::TokenReview);
        assert_eq!(c.k8s_psat["prod"].audience, "spire-server");
        assert_eq!(c.k8s_psat["prod"].api_server_url, "https://prod-api:6443");

        // Or define a cluster with flags alone.
        let c = parse(
            "trust_domain = \"a.org\"",
            RunFlags {
                k8s_psat_cluster: Some("edge".into()),
                k8s_psat_service_account_allow_list: vec!["sigil:sigil-agent".into()],
                k8s_psat_oidc_discovery_url: Some("https://issuer.example".into()),
                k8s_psat_api_server_url: Some("https://edge-api".into()),
                k8s_psat_api_ca_file: Some("/ca.pem".into()),
                ..Default::default()
            },
        )?;
        assert_eq!(
            c.k8s_psat["edge"].verification,
            Verification::OidcDiscovery {
                url: "https://issuer.example".into(),
                ca_file: "/ca.pem".into()
            }
        );

        let err = parse(
            "trust_domain = \"a.org\"\n[node_attestor.k8s_psat.clusters.prod]\njwks_file = \"/j\"\napi_server_url = \"https://api\"\n",
            RunFlags::default(),
        )
        .expect_err("no allow list");
        assert!(
            format!("{err:#}")
                .contains("node_attestor.k8s_psat.clusters.prod.service_account_allow_list"),
            "{err:#}"
        );
        assert!(toml::from_str::<FileConfig>(
            "[node_attestor.k8s_psat.clusters.prod]\njwks_flie = \"/j\""
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn federation_bundle_endpoint_from_file_and_flags() -> anyhow::Result<()> {
        use crate::federation::endpoint::ServedProfile;
        let c = parse("trust_domain = \"a.org\"", RunFlags::default())?;
        assert!(c.bundle_endpoint.is_none(), "off by default");

        let text = "trust_domain = \"a.org\"\n\
            [federation.bundle_endpoint]\n\
            address = \"0.0.0.0:443\"\n\
            profile = \"https_web\"\n\
            cert_file = \"/etc/tls/crt.pem\"\n\
            key_file = \"/etc/tls/key.pem\"\n\
            refresh_hint = \"1m\"\n";
        let e = parse(text, RunFlags::default())?
            .bundle_endpoint
            .expect("endpoint on");
        assert_eq!(e.address.to_string(), "0.0.0.0:443");
        assert_eq!(e.refresh_hint, Duration::from_secs(60));
        assert_eq!(
            e.profile,
            ServedProfile::HttpsWeb {
                cert_file: "/etc/tls/crt.pem".into(),
                key_file: "/etc/tls/key.pem".into()
            }
        );

        // Flags override the file's keys, or turn the endpoint on alone.
        let e = parse(
            text,
            RunFlags {
                federation_bundle_endpoint_cert_file: Some("/flag.pem".into()),
                federation_bundle_endpoint_refresh_hint: Some("2m".into()),
                ..Default::default()
            },
        )?
        .bundle_endpoint
        .expect("endpoint on");
        assert!(
            matches!(&e.profile, ServedProfile::HttpsWeb { cert_file, .. } if cert_file == &PathBuf::from("/flag.pem"))
        );
        assert_eq!(e.refresh_hint, Duration::from_secs(120));
        let e = parse(
            "trust_domain = \"a.org\"",
            RunFlags {
                federation_bundle_endpoint_address: Some("127.0.0.1:8443".into()),
                ..Default::default()
            },
        )?
        .bundle_endpoint
        .expect("endpoint on");
        assert_eq!(e.profile, ServedProfile::HttpsSpiffe);
        assert_eq!(e.address.to_string(), "127.0.0.1:8443");

        let err = parse(
            "trust_domain = \"a.org\"",
            RunFlags {
                federation_bundle_endpoint_profile: Some("https_web".into()),
                ..Default::default()
            },
        )
        .expect_err("a key flag without the endpoint");
        assert!(
            format!("{err:#}").contains("--federation-bundle-endpoint-address"),
            "{err:#}"
        );
        let err = parse(
            "trust_domain = \"a.org\"\n[federation.bundle_endpoint]\nprofile = \"https_web\"\n",
            RunFlags::default(),
        )
        .expect_err("https_web without files");
        assert!(
            format!("{err:#}").contains("federation.bundle_endpoint.cert_file"),
            "{err:#}"
        );
        assert!(toml::from_str::<FileConfig>(
            "[federation.bundle_endpoint]\nadress = \"0.0.0.0:8443\""
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn bundle_publisher_from_file_and_flags() -> anyhow::Result<()> {
        let text = "trust_domain = \"a.org\"\n\
            [bundle_publisher.k8s_configmap]\n\
            namespace = \"spire\"\n\
            api_server_url = \"https://api:6443\"\n\
            api_ca_file = \"/etc/k8s/ca.crt\"\n";
        let c = parse(text, RunFlags::default())?;
        let cm = c.bundle_publisher.k8s_configmap.expect("publisher on");
        assert_eq!(cm.namespace, "spire");
        assert_eq!(cm.name, "sigil-bundle");
        assert_eq!(cm.key, "bundle.pem");
        assert_eq!(cm.api.url, "https://api:6443");
        assert_eq!(cm.api.ca_file, PathBuf::from("/etc/k8s/ca.crt"));
        assert_eq!(
            cm.api.token_file,
            PathBuf::from(crate::kube::IN_CLUSTER_TOKEN_FILE)
        );

        // Flags override the file's keys, or turn the publisher on alone.
        let c = parse(
            text,
            RunFlags {
                bundle_publisher_k8s_configmap_name: Some("trust".into()),
                ..Default::default()
            },
        )?;
        let cm = c.bundle_publisher.k8s_configmap.expect("publisher on");
        assert_eq!(
            (cm.namespace.as_str(), cm.name.as_str()),
            ("spire", "trust")
        );
        let c = parse(
            "trust_domain = \"a.org\"",
            RunFlags {
                bundle_publisher_k8s_configmap: true,
                bundle_publisher_k8s_configmap_namespace: Some("ns1".into()),
                bundle_publisher_k8s_configmap_api_server_url: Some("https://api".into()),
                ..Default::default()
            },
        )?;
        let cm = c.bundle_publisher.k8s_configmap.expect("publisher on");
        assert_eq!(cm.namespace, "ns1");
        assert_eq!(cm.api.url, "https://api");

        let err = parse(
            "trust_domain = \"a.org\"",
            RunFlags {
                bundle_publisher_k8s_configmap_name: Some("x".into()),
                ..Default::default()
            },
        )
        .expect_err("a key flag without the publisher");
        assert!(
            format!("{err:#}").contains("--bundle-publisher-k8s-configmap"),
            "{err:#}"
        );
        let err = parse(
            "trust_domain = \"a.org\"\n[bundle_publisher.k8s_configmap]\nkey = \"a/b\"\napi_server_url = \"https://api\"\n",
            RunFlags::default(),
        )
        .expect_err("bad key");
        assert!(
            format!("{err:#}").contains("bundle_publisher.k8s_configmap.key"),
            "{err:#}"
        );
        assert!(toml::from_str::<FileConfig>(
            "[bundle_publisher.k8s_configmap]\nnamepsace = \"x\""
        )
        .is_err());
        assert!(toml::from_str::<FileConfig>("[bundle_publisher.s3]\nx = 1").is_err());
        Ok(())
    }
}
