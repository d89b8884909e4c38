//! Envoy's Secret Discovery Service (SDS v3), served on the Workload API socket.
//!
//! Envoy gets the caller's X509-SVIDs and trust bundles as `tls.v3.Secret` resources, named as
//! SPIRE's agent names them, so an Envoy configuration written for SPIRE works unchanged:
//! - a TLS certificate per SPIFFE ID the caller holds, named by that ID; the default (first) one
//!   also as [`SdsConfig::default_svid_name`] (`default`);
//! - a validation context per trust domain the caller may use (ours, and the federated ones its
//!   entries name), named `spiffe://<td>`; ours also as [`SdsConfig::default_bundle_name`]
//!   (`ROOTCA`);
//! - [`SdsConfig::default_all_bundles_name`] (`ALL`): one validation context with Envoy's SPIFFE
//!   certificate validator holding every one of those trust domains' bundles.
//!
//! The per-trust-domain contexts use the SPIFFE validator too (it checks the peer's trust domain
//! as well as its chain), unless `disable_spiffe_cert_validation` (agent configuration, or the
//! Envoy node's metadata key of that name, which wins) or an Envoy older than 1.18 calls for plain
//! `trusted_ca` PEM. An empty list of names (a wildcard request) gets every TLS certificate and
//! every per-trust-domain context, as SPIRE answers it.
//!
//! Callers are attested as Workload API callers are (the pinned process, checked again before
//! every message; no identity → PermissionDenied), but need no `workload.spiffe.io` header: Envoy
//! does not send it.
//!
//! StreamSecrets follows the xDS state-of-the-world protocol. Each response carries a version (a
//! hash of its resources) and a nonce. A request with the last nonce acknowledges it, or with
//! `error_detail` rejects it (logged once per version; the version is not sent again, only a
//! change is); a request with another nonce is stale and ignored; a request that changes the
//! resource names gets a fresh response. Cache changes (rotation, bundles, entries) are pushed
//! only when what the stream's names resolve to changed. Names that resolve to nothing are left
//! out, logged at debug (an entry may give the caller that identity later, and the stream then
//! sends it), and a response that would hold no resource at all is not sent (Envoy rejects one).
//! Like the Workload API streams, an SDS stream has no task of its own: it is polled by the
//! connection that carries it.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3 as core_v3;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls_v3;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use super::identities::{self, ServedSvids};
use super::service::{
    attest_again_if_hash_wanted, look, look_changed, now_unix, Caller, StreamGauge, Watch,
    WorkloadApi, EXPIRED, NO_IDENTITY,
};
use crate::sync::cache::{split_chain, Snapshot};
use crate::sync::watchers::Subscription;
use crate::sync::worker::AgentState;
use crate::workload_attestor::WorkloadAttestor;

/// The only resource type served.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// Envoy's name for its SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
/// The node metadata key with which one Envoy overrides
/// [`SdsConfig::disable_spiffe_cert_validation`] (a bool, or a string such as `"true"`).
pub const DISABLE_SPIFFE_CERT_VALIDATION_KEY: &str = "disable_spiffe_cert_validation";
/// Default of [`SdsConfig::default_svid_name`] (SPIRE's).
pub const DEFAULT_SVID_NAME: &str = "default";
/// Default of [`SdsConfig::default_bundle_name`] (SPIRE's).
pub const DEFAULT_BUNDLE_NAME: &str = "ROOTCA";
/// Default of [`SdsConfig::default_all_bundles_name`] (SPIRE's).
pub const DEFAULT_ALL_BUNDLES_NAME: &str = "ALL";
/// Most resource names one request may carry.
pub const MAX_RESOURCE_NAMES: usize = 1024;
/// Longest resource name, in bytes (a SPIFFE ID's maximum length).
pub const MAX_RESOURCE_NAME_BYTES: usize = 2048;
/// Most bytes of resource names one request may carry in all.
pub const MAX_RESOURCE_NAMES_BYTES: usize = 64 * 1024;
/// Largest request decoded. Envoy sends its node description (a few hundred extensions, tens of
/// KiB) with every request.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// The `stream` field of this module's log lines.
const STREAM: &str = "sds";

/// SDS settings (agent configuration `[sds]`, SPIRE's names and defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsConfig {
    /// The name of the caller's default (first) X509-SVID.
    pub default_svid_name: String,
    /// The name of our trust domain's validation context.
    pub default_bundle_name: String,
    /// The name of the validation context holding every trust domain the caller may use.
    pub default_all_bundles_name: String,
    /// Per-trust-domain validation contexts carry `trusted_ca` PEM instead of Envoy's SPIFFE
    /// validator.
    pub disable_spiffe_cert_validation: bool,
}

impl Default for SdsConfig {
    fn default() -> Self {
        Self {
            default_svid_name: DEFAULT_SVID_NAME.into(),
            default_bundle_name: DEFAULT_BUNDLE_NAME.into(),
            default_all_bundles_name: DEFAULT_ALL_BUNDLES_NAME.into(),
            disable_spiffe_cert_validation: false,
        }
    }
}

/// The `envoy.service.secret.v3.SecretDiscoveryService`, over the Workload API's state and
/// attestation.
#[derive(Clone)]
pub struct SecretDiscovery {
    api: WorkloadApi,
    config: Arc<SdsConfig>,
}

/// The responses of one StreamSecrets call.
pub type SdsStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

/// The requests of one StreamSecrets call.
type Requests = Pin<Box<dyn Stream<Item = Result<DiscoveryRequest, Status>> + Send>>;

impl SecretDiscovery {
    /// SDS for the callers of `api`.
    pub fn new(api: WorkloadApi, config: SdsConfig) -> Self {
        Self {
            api,
            config: Arc::new(config),
        }
    }

    /// The gRPC service, decoding requests of at most [`MAX_REQUEST_BYTES`].
    pub fn into_server(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Opens a StreamSecrets stream for an attested `caller`: PermissionDenied at once when it
    /// has no identity, Unavailable when its SVIDs expired unrenewed.
    async fn open(&self, mut caller: Caller, requests: Requests) -> Result<SdsStream, Status> {
        let state = self.api.state().clone();
        let attestor = self.api.attestor().clone();
        attest_again_if_hash_wanted(&attestor, &mut caller, STREAM).await?;
        // Subscribed before the first look, so no change between the two is missed.
        let sub = state
            .watchers
            .subscribe(&mut caller.selectors, caller.exe_hash_skipped);
        match look(&state, &caller, &sds_view) {
            Watch::NoIdentity => {
                tracing::info!(pid = caller.pid, selectors = %caller.selectors, stream = STREAM, "no identity for the caller; PermissionDenied");
                return Err(Status::permission_denied(NO_IDENTITY));
            }
            Watch::Unavailable(why) => return Err(Status::unavailable(why)),
            Watch::Pending | Watch::Send(_) => {}
        }
        tracing::debug!(pid = caller.pid, stream = STREAM, "SDS stream opened");
        let stream = Streamer {
            _gauge: StreamGauge::new(&state),
            state,
            attestor,
            config: self.config.clone(),
            caller,
            requests,
            sub,
            last_key: None,
            shutdown: self.api.shutdown(),
            names: None,
            validator: Validator::Spiffe,
            sent: None,
            responses: 0,
            rejection_logged: None,
            look_now: false,
            answer: false,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(stream, Streamer::next)))
    }
}

/// How per-trust-domain validation contexts validate peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Validator {
    /// Envoy's SPIFFE certificate validator (Envoy 1.18 and later).
    Spiffe,
    /// Plain `trusted_ca` PEM.
    TrustedCa,
}

/// The validator for an Envoy described by `node`: the node's metadata key
/// [`DISABLE_SPIFFE_CERT_VALIDATION_KEY`] (a bool, or a string Go's `ParseBool` accepts; other
/// values are ignored) overrides `disabled`; an Envoy older than 1.18 has no SPIFFE validator.
fn validator_for(node: &core_v3::Node, disabled: bool) -> Validator {
    use envoy_types::pb::google::protobuf::value::Kind;
    let mut disabled = disabled;
    if let Some(v) = node
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(DISABLE_SPIFFE_CERT_VALIDATION_KEY))
    {
        match &v.kind {
            Some(Kind::BoolValue(b)) => disabled = *b,
            Some(Kind::StringValue(s)) => match s.as_str() {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => disabled = true,
                "0" | "f" | "F" | "false" | "FALSE" | "False" => disabled = false,
                _ => {}
            },
            _ => {}
        }
    }
    if disabled {
        return Validator::TrustedCa;
    }
    if let Some(core_v3::node::UserAgentVersionType::UserAgentBuildVersion(b)) =
        &node.user_agent_version_type
    {
        if let Some(v) = &b.version {
            if (v.major_number, v.minor_number) < (1, 18) {
                return Validator::TrustedCa;
            }
        }
    }
    Validator::Spiffe
}

/// An X509-SVID as Envoy takes it.
struct SvidPem {
    spiffe_id: String,
    /// PEM chain, leaf first.
    chain: Vec<u8>,
    /// PEM PKCS#8 key.
    key: Vec<u8>,
}

/// A trust domain's X.509 roots as Envoy takes them.
struct BundlePem {
    /// Trust domain name (`example.org`).
    trust_domain: String,
    /// PEM certificates.
    roots: Vec<u8>,
}

impl BundlePem {
    /// `spiffe://<td>`, the name of its validation context.
    fn id(&self) -> String {
        format!("spiffe://{}", self.trust_domain)
    }
}

/// What a caller may get, in PEM, read from the cache in one look.
struct View {
    /// Its X509-SVIDs, default first (the Workload API's order and choice).
    svids: Vec<SvidPem>,
    /// Our trust domain's bundle, if held.
    own: Option<BundlePem>,
    /// The federated bundles its entries name, by trust domain.
    federated: Vec<BundlePem>,
}

/// SDS's view of the cache for a caller with `selectors`.
fn sds_view(cache: &Snapshot, selectors: &sigil::selector::SelectorSet) -> Watch<View> {
    let served = match identities::served_svids(cache, selectors, now_unix()) {
        ServedSvids::NoIdentity => return Watch::NoIdentity,
        ServedSvids::Pending => return Watch::Pending,
        ServedSvids::Expired => return Watch::Unavailable(EXPIRED),
        ServedSvids::Ready { svids, .. } => svids,
    };
    let entries: Vec<_> = served.iter().map(|(e, _)| *e).collect();
    Watch::Send(View {
        svids: served
            .iter()
            .map(|(e, svid)| {
                let (chain, key) = svid.chain_and_key_der();
                SvidPem {
                    spiffe_id: e.spiffe_id.to_string(),
                    chain: sigil::x509::to_pem_certs(&split_chain(&chain)).into_bytes(),
                    key: sigil::x509::to_pem("PRIVATE KEY", &key).into_bytes(),
                }
            })
            .collect(),
        own: cache.bundle().and_then(bundle_pem),
        federated: identities::federated_for(cache, &entries)
            .into_values()
            .filter_map(bundle_pem)
            .collect(),
    })
}

/// A held bundle's roots in PEM; `None` (logged) if they do not parse, which the cache's checks
/// should make impossible.
fn bundle_pem(b: &sigil::proto::node::Bundle) -> Option<BundlePem> {
    match sigil::x509::split_der_concat(&b.x509_roots) {
        Ok(roots) => Some(BundlePem {
            trust_domain: b.trust_domain.clone(),
            roots: sigil::x509::to_pem_certs(&roots).into_bytes(),
        }),
        Err(e) => {
            tracing::warn!(trust_domain = %b.trust_domain, error = %e, "the X.509 roots held for this trust domain do not parse; SDS leaves its validation context out");
            None
        }
    }
}

fn inline(bytes: &[u8]) -> Option<core_v3::DataSource> {
    Some(core_v3::DataSource {
        specifier: Some(core_v3::data_source::Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

fn secret(name: &str, kind: tls_v3::secret::Type) -> Any {
    envoy_types::util::pack_any(tls_v3::Secret {
        name: name.to_string(),
        r#type: Some(kind),
    })
}

/// A TLS certificate secret named `name`.
fn tls_certificate(name: &str, svid: &SvidPem) -> Any {
    secret(
        name,
        tls_v3::secret::Type::TlsCertificate(tls_v3::TlsCertificate {
            certificate_chain: inline(&svid.chain),
            private_key: inline(&svid.key),
            ..Default::default()
        }),
    )
}

/// A validation context named `name` with Envoy's SPIFFE validator over `bundles`.
fn spiffe_validation_context(name: &str, bundles: &[&BundlePem]) -> Any {
    use tls_v3::spiffe_cert_validator_config::TrustDomain;
    let mut trust_domains: Vec<TrustDomain> = bundles
        .iter()
        .map(|b| TrustDomain {
            name: b.trust_domain.clone(),
            trust_bundle: inline(&b.roots),
        })
        .collect();
    trust_domains.sort_by(|a, b| a.name.cmp(&b.name));
    let config = tls_v3::SpiffeCertValidatorConfig {
        trust_domains,
        trust_bundles: None,
    };
    secret(
        name,
        tls_v3::secret::Type::ValidationContext(tls_v3::CertificateValidationContext {
            custom_validator_config: Some(core_v3::TypedExtensionConfig {
                name: SPIFFE_VALIDATOR.into(),
                typed_config: Some(envoy_types::util::pack_any(config)),
            }),
            ..Default::default()
        }),
    )
}

/// A validation context named `name` for one trust domain's `bundle`.
fn validation_context(name: &str, bundle: &BundlePem, validator: Validator) -> Any {
    match validator {
        Validator::Spiffe => spiffe_validation_context(name, &[bundle]),
        Validator::TrustedCa => secret(
            name,
            tls_v3::secret::Type::ValidationContext(tls_v3::CertificateValidationContext {
                trusted_ca: inline(&bundle.roots),
                ..Default::default()
            }),
        ),
    }
}

/// The secrets `names` resolve to for a caller (an empty set: everything, as SPIRE), and the
/// names that resolve to nothing.
struct Resolved {
    secrets: Vec<Any>,
    unknown: Vec<String>,
}

fn resolve(view: &View, names: &BTreeSet<String>, cfg: &SdsConfig, v: Validator) -> Resolved {
    let bundles: Vec<&BundlePem> = view.own.iter().chain(&view.federated).collect();
    if names.is_empty() {
        let mut secrets: Vec<Any> = bundles
            .iter()
            .map(|b| validation_context(&b.id(), b, v))
            .collect();
        secrets.extend(view.svids.iter().map(|s| tls_certificate(&s.spiffe_id, s)));
        return Resolved {
            secrets,
            unknown: Vec::new(),
        };
    }
    let mut out = Resolved {
        secrets: Vec::with_capacity(names.len()),
        unknown: Vec::new(),
    };
    for name in names {
        // SPIFFE IDs first: the configured names cannot be SPIFFE IDs (config checks it).
        let found = if let Some(s) = view.svids.iter().find(|s| &s.spiffe_id == name) {
            Some(tls_certificate(name, s))
        } else if let Some(b) = bundles.iter().find(|b| &b.id() == name) {
            Some(validation_context(name, b, v))
        } else if name == &cfg.default_svid_name {
            view.svids.first().map(|s| tls_certificate(name, s))
        } else if name == &cfg.default_bundle_name {
            view.own.as_ref().map(|b| validation_context(name, b, v))
        } else if name == &cfg.default_all_bundles_name {
            // There is no `trusted_ca` form of several trust domains that keeps each one's
            // roots to its own IDs: always the SPIFFE validator.
            (!bundles.is_empty()).then(|| spiffe_validation_context(name, &bundles))
        } else {
            None
        };
        match found {
            Some(s) => out.secrets.push(s),
            None => out.unknown.push(name.clone()),
        }
    }
    out
}

/// Refuses requests this service cannot or will not serve: another resource type, too many or
/// too long names.
fn check_request(req: &DiscoveryRequest) -> Result<(), Status> {
    // An empty type is taken as the Secret type (only Envoy's wildcard LDS/CDS leave it out,
    // and no other type is served here).
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
        return Err(Status::invalid_argument(format!(
            "unsupported type_url {}: this Secret Discovery Service serves {SECRET_TYPE_URL} only",
            sigil::text::quote_for_display(&req.type_url)
        )));
    }
    if req.resource_names.len() > MAX_RESOURCE_NAMES {
        return Err(Status::invalid_argument(format!(
            "{} resource names requested; at most {MAX_RESOURCE_NAMES} may be",
            req.resource_names.len()
        )));
    }
    let mut total = 0;
    for name in &req.resource_names {
        if name.len() > MAX_RESOURCE_NAME_BYTES {
            return Err(Status::invalid_argument(format!(
                "resource name {} is longer than {MAX_RESOURCE_NAME_BYTES} bytes",
                sigil::text::quote_for_display(name)
            )));
        }
        total += name.len();
    }
    if total > MAX_RESOURCE_NAMES_BYTES {
        return Err(Status::invalid_argument(format!(
            "the resource names requested total {total} bytes; at most {MAX_RESOURCE_NAMES_BYTES} may be"
        )));
    }
    Ok(())
}

/// A request's names as a set (empty names are ignored, as SPIRE does).
fn name_set(names: Vec<String>) -> BTreeSet<String> {
    names.into_iter().filter(|n| !n.is_empty()).collect()
}

/// The first few of `names`, for a log line.
fn names_for_log(names: &[String]) -> Vec<String> {
    const SHOWN: usize = 8;
    let mut out: Vec<String> = names
        .iter()
        .take(SHOWN)
        .map(|n| sigil::text::quote_for_display(n))
        .collect();
    if names.len() > SHOWN {
        out.push(format!("… ({} names)", names.len()));
    }
    out
}

/// A set of resources' identity (their encoding is deterministic: no maps).
fn fingerprint(resources: &[Any]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for r in resources {
        r.type_url.hash(&mut h);
        r.value.hash(&mut h);
    }
    h.finish()
}

/// A response's version: its resources' fingerprint, so equal contents have equal versions.
fn version_of(fingerprint: u64) -> String {
    format!("{fingerprint:016x}")
}

/// The last response a stream sent.
struct Sent {
    version: String,
    nonce: String,
    fingerprint: u64,
}

/// Why a waiting stream woke up.
enum Woke {
    /// The agent's cache changed.
    Changed,
    /// A request came (None: the client closed its side); boxed, as it is large.
    Request(Box<Option<Result<DiscoveryRequest, Status>>>),
    /// The agent is shutting down, or the call is over.
    End,
}

/// The state of one StreamSecrets stream between two responses.
struct Streamer {
    state: Arc<AgentState>,
    attestor: Arc<WorkloadAttestor>,
    config: Arc<SdsConfig>,
    caller: Caller,
    requests: Requests,
    /// Wakes the stream when a change concerns its caller.
    sub: Subscription,
    /// The caller's view key at the last look (None: look whatever the key, e.g. after the
    /// names or the validator changed).
    last_key: Option<u64>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// The names of the last request that counted (None before the first one).
    names: Option<BTreeSet<String>>,
    /// From the last node description received.
    validator: Validator,
    /// The last response.
    sent: Option<Sent>,
    /// Responses sent (the next nonce).
    responses: u64,
    /// The version whose rejection was logged last.
    rejection_logged: Option<String>,
    /// Look at the cache before waiting again.
    look_now: bool,
    /// The names changed: answer even when the resources are the same as last sent.
    answer: bool,
    /// An error status ended the stream.
    done: bool,
    /// Counts the stream while it lives (held for its Drop).
    _gauge: StreamGauge,
}

impl Streamer {
    /// The stream's next response (None ends it).
    async fn next(mut self) -> Option<(Result<DiscoveryResponse, Status>, Self)> {
        if self.done {
            return None;
        }
        loop {
            if std::mem::take(&mut self.look_now) {
                let answer = std::mem::take(&mut self.answer);
                match attest_again_if_hash_wanted(&self.attestor, &mut self.caller, STREAM).await {
                    Ok(true) => self
                        .sub
                        .update(&mut self.caller.selectors, self.caller.exe_hash_skipped),
                    Ok(false) => {}
                    Err(s) => return self.end(s),
                }
                if answer {
                    self.last_key = None;
                }
                let seen = look_changed(&self.state, &self.caller, &sds_view, &mut self.last_key);
                // An unchanged view sends nothing, like Pending.
                match seen.unwrap_or(Watch::Pending) {
                    Watch::NoIdentity => {
                        tracing::info!(pid = self.caller.pid, selectors = %self.caller.selectors, stream = STREAM, "no identity for the caller any more; ending the stream with PermissionDenied");
                        return self.end(Status::permission_denied(NO_IDENTITY));
                    }
                    // Sent when the SVID arrives (a change).
                    Watch::Pending => {}
                    Watch::Unavailable(why) => return self.end(Status::unavailable(why)),
                    Watch::Send(view) => {
                        if let Some(response) = self.respond_if_changed(&view, answer) {
                            if let Err(s) = self.caller.recheck() {
                                tracing::info!(pid = self.caller.pid, stream = STREAM, status = %s.message(), "the calling process is gone or changed; ending the stream");
                                return self.end(s);
                            }
                            return Some((Ok(response), self));
                        }
                    }
                }
            }
            let woke = tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|s| *s) => Woke::End,
                r = self.requests.next() => Woke::Request(Box::new(r)),
                _ = self.sub.changed() => Woke::Changed,
            };
            let request = match woke {
                Woke::End => return None,
                Woke::Changed => {
                    self.look_now = true;
                    continue;
                }
                Woke::Request(r) => *r,
            };
            match request {
                // Envoy closed its side: the call is over.
                None => return None,
                Some(Err(s)) => {
                    tracing::debug!(pid = self.caller.pid, status = %s, "SDS request stream failed");
                    return self.end(s);
                }
                Some(Ok(req)) => {
                    if let Err(s) = self.on_request(req) {
                        tracing::info!(pid = self.caller.pid, status = %s.message(), "bad SDS request; ending the stream");
                        return self.end(s);
                    }
                }
            }
        }
    }

    /// Takes in one request: an acknowledgement, a rejection, stale, or new names.
    fn on_request(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        check_request(&req)?;
        let pid = self.caller.pid;
        if let Some(sent) = &self.sent {
            if req.response_nonce != sent.nonce {
                tracing::debug!(pid, nonce = %sigil::text::echo(&req.response_nonce), expected = %sent.nonce, "SDS request with a stale nonce; ignored");
                return Ok(());
            }
            // xDS signals a rejection with error_detail; its version_info is then the last one
            // applied.
            if req.error_detail.is_some() || req.version_info != sent.version {
                if self.rejection_logged.as_deref() != Some(sent.version.as_str()) {
                    let message = req
                        .error_detail
                        .as_ref()
                        .map_or("(no error detail; another version applied)", |e| {
                            e.message.as_str()
                        });
                    tracing::warn!(
                        pid,
                        version = %sent.version,
                        applied_version = %sigil::text::echo(&req.version_info),
                        resource_names = ?names_for_log(&req.resource_names),
                        error = %sigil::text::echo(message),
                        "Envoy rejected the secrets sent by SDS (NACK); this version is not sent again, the next change is"
                    );
                    self.rejection_logged = Some(sent.version.clone());
                }
            } else {
                tracing::debug!(pid, version = %sent.version, "SDS response acknowledged");
            }
        }
        if let Some(node) = &req.node {
            let v = validator_for(node, self.config.disable_spiffe_cert_validation);
            if v != self.validator {
                self.validator = v;
                self.look_now = true;
                self.last_key = None;
            }
        }
        let names = name_set(req.resource_names);
        if self.names.as_ref() != Some(&names) {
            tracing::debug!(pid, resource_names = ?names, "SDS resources requested");
            self.names = Some(names);
            self.look_now = true;
            self.answer = true;
        }
        Ok(())
    }

    /// The response to send for `view`, if any: when the resources differ from the last ones
    /// sent, or `answer` (the names changed) and there is something to send.
    fn respond_if_changed(&mut self, view: &View, answer: bool) -> Option<DiscoveryResponse> {
        let names = self.names.as_ref()?;
        let resolved = resolve(view, names, &self.config, self.validator);
        if answer && !resolved.unknown.is_empty() {
            tracing::debug!(pid = self.caller.pid, unknown = ?names_for_log(&resolved.unknown), "SDS resources the caller has none of (not its SPIFFE IDs, trust domains or default names); left out");
        }
        if resolved.secrets.is_empty() {
            return None;
        }
        let fingerprint = fingerprint(&resolved.secrets);
        if !answer && self.sent.as_ref().map(|s| s.fingerprint) == Some(fingerprint) {
            return None;
        }
        self.responses += 1;
        let sent = Sent {
            version: version_of(fingerprint),
            nonce: self.responses.to_string(),
            fingerprint,
        };
        tracing::debug!(pid = self.caller.pid, version = %sent.version, nonce = %sent.nonce, resources = resolved.secrets.len(), "SDS response sent");
        let response = DiscoveryResponse {
            version_info: sent.version.clone(),
            resources: resolved.secrets,
            type_url: SECRET_TYPE_URL.into(),
            nonce: sent.nonce.clone(),
            ..Default::default()
        };
        self.sent = Some(sent);
        Some(response)
    }

    /// Sends `status` and ends the stream.
    fn end(mut self, status: Status) -> Option<(Result<DiscoveryResponse, Status>, Self)> {
        self.done = true;
        Some((Err(status), self))
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SecretDiscovery {
    type DeltaSecretsStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
    type StreamSecretsStream = SdsStream;

    async fn delta_secrets(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "DeltaSecrets (incremental xDS) is not implemented by sigil-agent: set the SDS config source's api_type to GRPC (state of the world), not DELTA_GRPC",
        ))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let caller = self.api.attest(&req).await?;
        let stream = self.open(caller, Box::pin(req.into_inner())).await?;
        Ok(Response::new(stream))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        check_request(req.get_ref())?;
        let caller = self.api.attest(&req).await?;
        let req = req.into_inner();
        self.fetch(&caller, req).await.map(Response::new)
    }
}

impl SecretDiscovery {
    /// FetchSecrets for an attested `caller`: unlike a stream, which may wait for a name to
    /// appear, a name the caller has nothing for is InvalidArgument (as SPIRE answers).
    async fn fetch(
        &self,
        caller: &Caller,
        req: DiscoveryRequest,
    ) -> Result<DiscoveryResponse, Status> {
        let validator = req.node.as_ref().map_or(Validator::Spiffe, |n| {
            validator_for(n, self.config.disable_spiffe_cert_validation)
        });
        let view = match look(self.api.state(), caller, &sds_view) {
            Watch::NoIdentity => return Err(Status::permission_denied(NO_IDENTITY)),
            Watch::Pending => {
                return Err(Status::unavailable(
                    "the caller's SVID is still being minted (or the agent has not received its entries yet); retry shortly",
                ))
            }
            Watch::Unavailable(why) => return Err(Status::unavailable(why)),
            Watch::Send(view) => view,
        };
        let resolved = resolve(
            &view,
            &name_set(req.resource_names),
            &self.config,
            validator,
        );
        if !resolved.unknown.is_empty() {
            return Err(Status::invalid_argument(format!(
                "the caller has no secret named {}: request its SPIFFE IDs, the trust domains it may use (spiffe://<td>), or {:?}, {:?}, {:?}",
                names_for_log(&resolved.unknown).join(", "),
                self.config.default_svid_name,
                self.config.default_bundle_name,
                self.config.default_all_bundles_name,
            )));
        }
        caller.recheck()?;
        Ok(DiscoveryResponse {
            version_info: version_of(fingerprint(&resolved.secrets)),
            resources: resolved.secrets,
            type_url: SECRET_TYPE_URL.into(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests;
