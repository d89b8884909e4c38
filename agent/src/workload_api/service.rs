//! The five `SpiffeWorkloadAPI` RPCs.
//!
//! Every call: the `workload.spiffe.io: true` header (else InvalidArgument), then the caller is
//! attested from its pinned process (gone meanwhile, or running as another uid/gid than it
//! connected as → Unauthenticated; unreadable → PermissionDenied), its selectors matched to the
//! cached entries. The attestation ends by confirming the pin after its reads, so the answer that
//! follows at once is for the process that connected; every later stream message confirms it
//! again, and a stream whose process is gone ends with Unauthenticated (its connection may have
//! been passed on to another process).
//! Streams need no task of their own: each is polled by the connection that carries it, woken
//! by the agent's change counter; each message is the full state, sent only when it differs
//! from the last one.

use std::hash::{Hash as _, Hasher as _};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sigil::proto::workload as wl;
use sigil::proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use sigil::selector::SelectorSet;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::identities::{self, X509State};
use super::jwt::{JwtSvidCache, NodeLink};
use super::peer::PeerInfo;
use crate::attestor::{AttestError, ProcessPin, WorkloadAttestor};
use crate::cache::Cache;
use crate::client::ClientError;
use crate::worker::AgentState;

/// The header every Workload API call must carry (SPIFFE Workload Endpoint spec).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// The message SPIFFE clients match on when a caller has no identity.
pub const NO_IDENTITY: &str = "no identity issued";
/// The Unavailable message when every SVID of the caller has expired unrenewed.
pub const EXPIRED: &str = "the caller's X509-SVIDs have expired and the agent could not renew them (is sigil-server reachable and its CA valid?); retry later";
/// How long a first FetchX509SVID waits for an SVID that is being minted.
pub const FIRST_SVID_WAIT: Duration = Duration::from_secs(15);

/// An attested caller.
pub(super) struct Caller {
    pub(super) pid: i32,
    pub(super) selectors: SelectorSet,
    pub(super) pin: Arc<ProcessPin>,
    /// Peer credentials, to attest again.
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// `unix:sha256` was left out (no entry needed it when the caller was attested).
    pub(super) exe_hash_skipped: bool,
}

impl Caller {
    /// The process is still the one that connected, with the uid and gid it connected with (a
    /// reused PID, or a caller that has since run a setuid program, is refused).
    pub(super) fn recheck(&self) -> Result<(), Status> {
        self.pin.check().map_err(|e| not_the_caller(self.pid, &e))
    }
}

/// Unauthenticated: the process that connected is gone (its PID may name another process by
/// now) or runs as another user or group.
fn not_the_caller(pid: i32, e: &AttestError) -> Status {
    match e {
        AttestError::CredentialsChanged { .. } => Status::unauthenticated(e.to_string()),
        _ => gone(pid),
    }
}

fn gone(pid: i32) -> Status {
    Status::unauthenticated(format!(
        "the calling process (pid {pid}) has exited; its identity is not issued to another process"
    ))
}

/// What a watched stream should do after looking at the cache.
pub(super) enum Watch<M> {
    /// The caller has no identity: end the stream with PermissionDenied.
    NoIdentity,
    /// Nothing to send yet (an SVID is being minted).
    Pending,
    /// Nothing valid to send (the caller's SVIDs expired unrenewed): end the stream with
    /// Unavailable, which clients retry — the caller is entitled to an identity, so
    /// PermissionDenied ("no identity issued") would be false.
    Unavailable(&'static str),
    /// Send this (if it differs from the last message).
    Send(M),
}

struct Inner {
    state: Arc<AgentState>,
    attestor: Arc<WorkloadAttestor>,
    link: NodeLink,
    jwt: JwtSvidCache,
    /// Becomes true at agent shutdown: streams end so the server can drain.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// The Workload API service.
#[derive(Clone)]
pub struct WorkloadApi {
    inner: Arc<Inner>,
}

impl WorkloadApi {
    /// A service over the agent's state; JWT-SVIDs are minted through `link`; streams end when
    /// `shutdown` becomes true.
    pub fn new(
        state: Arc<AgentState>,
        attestor: Arc<WorkloadAttestor>,
        link: NodeLink,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                state,
                attestor,
                link,
                jwt: JwtSvidCache::new(),
                shutdown,
            }),
        }
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &crate::metrics::AgentMetrics {
        &self.inner.state.metrics
    }

    /// The agent's state.
    pub(super) fn state(&self) -> &Arc<AgentState> {
        &self.inner.state
    }

    /// The workload attestor.
    pub(super) fn attestor(&self) -> &Arc<WorkloadAttestor> {
        &self.inner.attestor
    }

    /// Becomes true at agent shutdown.
    pub(super) fn shutdown(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }

    /// Attests the caller of `req` (each Workload API RPC has checked the security header
    /// before).
    pub(super) async fn attest<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let peer = req.extensions().get::<PeerInfo>().cloned().ok_or_else(|| {
            Status::unauthenticated("the caller's credentials are unavailable on this connection")
        })?;
        let pin = peer.pin.map_err(|why| {
            self.inner.state.metrics.workload_attest_failures.inc();
            Status::unauthenticated(format!("cannot identify the calling process: {why}"))
        })?;
        let (uid, gid) = (peer.uid, peer.gid);
        // /proc on the blocking pool, then the kubelet (k8s attestor), then the pin again.
        let result = self
            .inner
            .attestor
            .attest_async(pin.clone(), uid, gid)
            .await;
        match result {
            Ok(a) => {
                tracing::debug!(pid = a.pid, uid, selectors = %a.selectors, "workload attested");
                Ok(Caller {
                    pid: a.pid,
                    selectors: a.selectors,
                    pin,
                    uid,
                    gid,
                    exe_hash_skipped: a.exe_hash_skipped,
                })
            }
            Err(e @ (AttestError::Gone { .. } | AttestError::CredentialsChanged { .. })) => {
                self.inner.state.metrics.workload_attest_failures.inc();
                tracing::debug!(error = %e, "workload attestation: not the process that connected");
                Err(not_the_caller(pin.pid, &e))
            }
            Err(e @ AttestError::Task(_)) => Err(Status::internal(e.to_string())),
            Err(e) => {
                self.inner.state.metrics.workload_attest_failures.inc();
                tracing::warn!(error = %e, "workload attestation failed");
                Err(Status::permission_denied(format!(
                    "could not attest the calling process: {e}"
                )))
            }
        }
    }

    /// A watched stream: its first message is looked up here, before the response starts, so
    /// a cached SVID leaves with the response headers and a caller without identity gets
    /// PermissionDenied as the call's status. Later messages are computed inside the stream's
    /// own poll (no task or channel per stream: an agent holds one stream per workload, and
    /// each would cost a few KiB): woken by the agent's change counter, it re-reads the cache
    /// and yields the new full state when it differs from the last one sent.
    async fn watch<M, F>(
        &self,
        caller: Caller,
        what: &'static str,
        build: F,
    ) -> Result<WatchStream<M>, Status>
    where
        M: prost::Message + Send + 'static,
        F: Fn(&Cache, &SelectorSet) -> Watch<M> + Send + Sync + 'static,
    {
        let state = self.inner.state.clone();
        // Subscribed before the first look, so no change between the two is missed.
        let mut changes = state.changes.subscribe();
        changes.borrow_and_update();
        let mut watcher = Watcher {
            _gauge: StreamGauge::new(&state),
            state,
            attestor: self.inner.attestor.clone(),
            caller,
            what,
            build,
            changes,
            shutdown: self.inner.shutdown.clone(),
            last: None,
            first: None,
            look_now: false,
            pending: false,
            pending_deadline: tokio::time::Instant::now() + FIRST_SVID_WAIT,
            done: false,
        };
        // An entry needing `unix:sha256` may have arrived since the caller was attested.
        watcher.attest_again_if_hash_wanted().await?;
        match look(&watcher.state, &watcher.caller, &watcher.build).await {
            Watch::NoIdentity => {
                tracing::info!(pid = watcher.caller.pid, selectors = %watcher.caller.selectors, stream = what, "no identity for the caller; PermissionDenied");
                return Err(Status::permission_denied(NO_IDENTITY));
            }
            Watch::Pending => watcher.pending = true,
            Watch::Unavailable(why) => return Err(Status::unavailable(why)),
            Watch::Send(msg) => {
                // No re-check here: the attestation ended by confirming the pin, and nothing
                // but an in-memory cache read lies between that and this answer. Every later
                // message is re-checked.
                watcher.last = Some(fingerprint(&msg));
                watcher.first = Some(msg);
                tracing::debug!(
                    pid = watcher.caller.pid,
                    stream = what,
                    "Workload API first message sent"
                );
            }
        }
        Ok(Box::pin(futures::stream::unfold(watcher, Watcher::next)))
    }
}

/// A server stream of the Workload API: full-state messages, or an error status that ends it.
pub type WatchStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// Counts an open stream in the agent's metrics for as long as it lives.
pub(super) struct StreamGauge(Arc<AgentState>);

impl StreamGauge {
    pub(super) fn new(state: &Arc<AgentState>) -> Self {
        state.metrics.workload_streams.inc();
        Self(state.clone())
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.metrics.workload_streams.dec();
    }
}

/// Why a waiting stream woke up.
enum Woke {
    /// The agent's cache changed.
    Changed,
    /// The agent is shutting down: end the stream quietly.
    End,
    /// The caller's first SVID is still not minted after [`FIRST_SVID_WAIT`].
    FirstSvidLate,
}

/// The state of one watched stream between two messages.
struct Watcher<M, F> {
    state: Arc<AgentState>,
    attestor: Arc<WorkloadAttestor>,
    caller: Caller,
    what: &'static str,
    build: F,
    changes: tokio::sync::watch::Receiver<u64>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Fingerprint of the last message sent (None: nothing sent yet).
    last: Option<u64>,
    /// The first message, looked up before the stream started.
    first: Option<M>,
    /// The cache changed since the last look.
    look_now: bool,
    /// The last look found the caller's SVID still being minted.
    pending: bool,
    /// When a caller still waiting for its first SVID gets Unavailable.
    pending_deadline: tokio::time::Instant,
    /// An error status ended the stream.
    done: bool,
    /// Counts the stream while it lives (held for its Drop).
    _gauge: StreamGauge,
}

impl<M, F> Watcher<M, F>
where
    M: prost::Message,
    F: Fn(&Cache, &SelectorSet) -> Watch<M>,
{
    /// The stream's next item (None ends it): waits for a change, then sends the new state if
    /// it differs from the last one.
    async fn next(mut self) -> Option<(Result<M, Status>, Self)> {
        if self.done {
            return None;
        }
        if let Some(msg) = self.first.take() {
            return Some((Ok(msg), self));
        }
        loop {
            if std::mem::take(&mut self.look_now) {
                self.changes.borrow_and_update();
                self.pending = false;
                if let Err(s) = self.attest_again_if_hash_wanted().await {
                    return self.end(s);
                }
                match look(&self.state, &self.caller, &self.build).await {
                    Watch::NoIdentity => {
                        tracing::info!(pid = self.caller.pid, selectors = %self.caller.selectors, stream = self.what, "no identity for the caller any more; ending the stream with PermissionDenied");
                        return self.end(Status::permission_denied(NO_IDENTITY));
                    }
                    Watch::Pending => self.pending = true,
                    Watch::Unavailable(why) => return self.end(Status::unavailable(why)),
                    Watch::Send(msg) => {
                        let fp = fingerprint(&msg);
                        if self.last != Some(fp) {
                            let first = self.last.is_none();
                            // Every message goes only to the process that connected: the
                            // stream's fd may have been passed on, or inherited by a child,
                            // after that process exited.
                            if let Err(s) = self.caller.recheck() {
                                tracing::info!(pid = self.caller.pid, stream = self.what, status = %s.message(), "the calling process is gone or changed; ending the stream");
                                return self.end(s);
                            }
                            tracing::debug!(
                                pid = self.caller.pid,
                                stream = self.what,
                                first,
                                "Workload API update sent"
                            );
                            self.last = Some(fp);
                            return Some((Ok(msg), self));
                        }
                    }
                }
            }
            let waiting_first = self.pending && self.last.is_none();
            let deadline = self.pending_deadline;
            let woke = tokio::select! {
                r = self.changes.changed() => if r.is_ok() { Woke::Changed } else { Woke::End },
                _ = self.shutdown.wait_for(|s| *s) => Woke::End,
                _ = tokio::time::sleep_until(deadline), if waiting_first => Woke::FirstSvidLate,
            };
            match woke {
                Woke::Changed => self.look_now = true,
                Woke::End => return None,
                Woke::FirstSvidLate => {
                    return self.end(Status::unavailable(
                        "the caller's SVID is still being minted (is sigil-server reachable?); retry shortly",
                    ))
                }
            }
        }
    }

    /// [`attest_again_if_hash_wanted`] for this stream's caller.
    async fn attest_again_if_hash_wanted(&mut self) -> Result<(), Status> {
        attest_again_if_hash_wanted(&self.attestor, &mut self.caller, self.what).await
    }

    /// Sends `status` and ends the stream.
    fn end(mut self, status: Status) -> Option<(Result<M, Status>, Self)> {
        self.done = true;
        Some((Err(status), self))
    }
}

/// The caller was attested without `unix:sha256` (no entry needed it) and now an entry does:
/// attest it again, so that entry can match on its open `stream`. Err only when the process is
/// gone; another failure keeps the selectors it has (they were right).
pub(super) async fn attest_again_if_hash_wanted(
    attestor: &Arc<WorkloadAttestor>,
    caller: &mut Caller,
    stream: &str,
) -> Result<(), Status> {
    if !caller.exe_hash_skipped || !attestor.exe_hash_wanted() {
        return Ok(());
    }
    match attestor
        .attest_async(caller.pin.clone(), caller.uid, caller.gid)
        .await
    {
        Ok(a) => {
            tracing::debug!(pid = a.pid, selectors = %a.selectors, stream, "workload attested again: an entry now needs its executable's hash");
            caller.selectors = a.selectors;
            caller.exe_hash_skipped = a.exe_hash_skipped;
            Ok(())
        }
        Err(AttestError::Gone { pid }) => Err(gone(pid)),
        Err(e) => {
            tracing::debug!(pid = caller.pid, error = %e, "attesting the workload again failed; keeping its selectors");
            Ok(())
        }
    }
}

/// FetchX509SVID's view of the cache for a caller with `selectors`.
fn x509_svid_watch(cache: &Cache, selectors: &SelectorSet) -> Watch<wl::X509svidResponse> {
    match identities::x509_svid_state(cache, selectors, now_unix()) {
        X509State::NoIdentity => Watch::NoIdentity,
        X509State::Pending => Watch::Pending,
        X509State::Expired => Watch::Unavailable(EXPIRED),
        X509State::Ready { response, .. } => Watch::Send(response),
    }
}

/// A bundles stream's view: `None` is "no identity"; a message without bundles waits (the
/// agent holds none yet).
fn bundles_watch<M>(msg: Option<M>, is_empty: impl FnOnce(&M) -> bool) -> Watch<M> {
    match msg {
        None => Watch::NoIdentity,
        Some(m) if is_empty(&m) => Watch::Pending,
        Some(m) => Watch::Send(m),
    }
}

/// What the cache holds for `caller` now.
pub(super) async fn look<M>(
    state: &AgentState,
    caller: &Caller,
    build: &impl Fn(&Cache, &SelectorSet) -> Watch<M>,
) -> Watch<M> {
    let cache = state.cache.read().await;
    if cache.has_snapshot() {
        build(&cache, &caller.selectors)
    } else {
        // Just started: "no identity" would be a lie until entries arrive.
        Watch::Pending
    }
}

/// A message's identity, to send only changes (maps encode in key order: deterministic).
fn fingerprint<M: prost::Message>(msg: &M) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    msg.encode_to_vec().hash(&mut h);
    h.finish()
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(SECURITY_HEADER) {
        Some(v) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

pub(super) use sigil::clock::now_unix;

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = WatchStream<wl::X509svidResponse>;
    type FetchX509BundlesStream = WatchStream<wl::X509BundlesResponse>;
    type FetchJWTBundlesStream = WatchStream<wl::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<wl::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        let caller = self.attest(&req).await?;
        let stream = self.watch(caller, "x509_svid", x509_svid_watch).await?;
        Ok(Response::new(stream))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<wl::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&req)?;
        let caller = self.attest(&req).await?;
        let stream = self
            .watch(caller, "x509_bundles", |cache, sel| {
                bundles_watch(identities::x509_bundles(cache, sel), |m| {
                    m.bundles.is_empty()
                })
            })
            .await?;
        Ok(Response::new(stream))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<wl::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        let caller = self.attest(&req).await?;
        let stream = self
            .watch(caller, "jwt_bundles", |cache, sel| {
                bundles_watch(identities::jwt_bundles(cache, sel), |m| {
                    m.bundles.is_empty()
                })
            })
            .await?;
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<wl::JwtsvidRequest>,
    ) -> Result<Response<wl::JwtsvidResponse>, Status> {
        check_header(&req)?;
        let audience = super::jwt::requested_audiences(&req.get_ref().audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let caller = self.attest(&req).await?;
        let want = req.into_inner();
        let targets: Vec<(String, i64, String, String)> = {
            let cache = self.inner.state.cache.read().await;
            if !cache.has_snapshot() {
                return Err(Status::unavailable(
                    "the agent has not received its entries from sigil-server yet; retry shortly",
                ));
            }
            identities::matching_entries(&cache, &caller.selectors)
                .into_iter()
                .filter(|e| want.spiffe_id.is_empty() || e.spiffe_id.to_string() == want.spiffe_id)
                .map(|e| {
                    (
                        e.id.clone(),
                        e.revision,
                        e.spiffe_id.to_string(),
                        e.hint.clone(),
                    )
                })
                .collect()
        };
        if targets.is_empty() {
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        let serial = self.inner.state.identity.read().await.serial_hex.clone();
        let now = now_unix();
        let mut svids = Vec::with_capacity(targets.len());
        let mut hints = std::collections::HashSet::new();
        for (entry_id, revision, spiffe_id, hint) in targets {
            if !hint.is_empty() && !hints.insert(hint.clone()) {
                continue;
            }
            let token = self
                .inner
                .jwt
                .get(
                    &self.inner.link,
                    &serial,
                    (&entry_id, revision),
                    &audience,
                    now,
                )
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, entry_id = %entry_id, "JWT-SVID minting failed");
                    match &e {
                        // The server refused the request itself: retrying will not help.
                        ClientError::Rpc { status, .. }
                            if status.code() == tonic::Code::InvalidArgument =>
                        {
                            Status::invalid_argument(format!(
                                "sigil-server refused the JWT-SVID request: {}",
                                status.message()
                            ))
                        }
                        _ => Status::unavailable(format!("could not mint the JWT-SVID: {e}")),
                    }
                })?;
            svids.push(wl::Jwtsvid {
                spiffe_id,
                svid: token,
                hint,
            });
        }
        caller.recheck()?;
        Ok(Response::new(wl::JwtsvidResponse { svids }))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<wl::ValidateJwtsvidRequest>,
    ) -> Result<Response<wl::ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        let r = req.get_ref();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // Any local process may validate tokens, but it must be identifiable (as in SPIRE).
        let caller = self.attest(&req).await?;
        let r = req.into_inner();
        let invalid =
            |e: &dyn std::fmt::Display| Status::invalid_argument(format!("invalid JWT-SVID: {e}"));
        let subject = sigil::jwt::jwt_svid_subject_unverified(&r.svid).map_err(|e| invalid(&e))?;
        let td = subject.trust_domain();
        let bundle = {
            let cache = self.inner.state.cache.read().await;
            let b = identities::bundle_for(&cache, td.name()).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "invalid JWT-SVID: no bundle for trust domain \"{}\"",
                    td.name()
                ))
            })?;
            let mut bundle = sigil::bundle::Bundle::new(td.clone());
            bundle.jwt_authorities = sigil::bundle::Bundle::jwt_authorities_from_json(&b.jwks_json)
                .map_err(|e| Status::internal(format!("held JWT bundle is unusable: {e}")))?;
            bundle
        };
        let claims = sigil::jwt::validate_jwt_svid(&r.svid, &r.audience, &bundle)
            .map_err(|e| invalid(&e))?;
        caller.recheck()?;
        Ok(Response::new(wl::ValidateJwtsvidResponse {
            spiffe_id: claims.subject.to_string(),
            claims: Some(json_object_to_struct(claims.all)),
        }))
    }
}

/// JSON claims as a protobuf `Struct`.
fn json_object_to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(json_object_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_become_a_protobuf_struct() {
        let claims: serde_json::Value = serde_json::json!({
            "sub": "spiffe://example.org/a", "aud": ["x", "y"], "exp": 1700000000, "nested": {"ok": true}, "none": null
        });
        let serde_json::Value::Object(map) = claims else {
            panic!("object")
        };
        let s = json_object_to_struct(map);
        use prost_types::value::Kind;
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://example.org/a".into()))
        );
        assert_eq!(
            s.fields["exp"].kind,
            Some(Kind::NumberValue(1_700_000_000.0))
        );
        let Some(Kind::ListValue(l)) = &s.fields["aud"].kind else {
            panic!("aud list")
        };
        assert_eq!(l.values.len(), 2);
        let Some(Kind::StructValue(n)) = &s.fields["nested"].kind else {
            panic!("nested")
        };
        assert_eq!(n.fields["ok"].kind, Some(Kind::BoolValue(true)));
        assert_eq!(s.fields["none"].kind, Some(Kind::NullValue(0)));
    }

    /// Agent state over `cache` (the agent's own SVID is a throwaway).
    fn state_with(cache: Cache) -> Arc<AgentState> {
        let td: sigil::TrustDomain = "example.org".parse().unwrap();
        let (identity, _) = crate::storage::tests::identity(&td, "/sigil/agent/test");
        Arc::new(AgentState::new(td, identity, cache))
    }

    /// A caller with `selectors`, pinned to this test process (alive throughout).
    fn caller(selectors: &[&str]) -> Caller {
        let pid = std::process::id() as i32;
        Caller {
            pid,
            selectors: identities::tests::selectors(selectors),
            pin: Arc::new(ProcessPin::pin(pid).unwrap()),
            uid: 0,
            gid: 0,
            exe_hash_skipped: false,
        }
    }

    /// The X.509 SVID stream [`WorkloadApi::fetch_x509svid`] opens for `caller`.
    async fn x509_stream(
        state: &Arc<AgentState>,
        shutdown: tokio::sync::watch::Receiver<bool>,
        caller: Caller,
    ) -> Result<WatchStream<wl::X509svidResponse>, Status> {
        x509_stream_with(state, shutdown, caller, Arc::new(WorkloadAttestor::new())).await
    }

    /// [`x509_stream`] with the given attestor.
    async fn x509_stream_with(
        state: &Arc<AgentState>,
        shutdown: tokio::sync::watch::Receiver<bool>,
        caller: Caller,
        attestor: Arc<WorkloadAttestor>,
    ) -> Result<WatchStream<wl::X509svidResponse>, Status> {
        let roots = state.identity.read().await.chain_der.clone();
        let api = WorkloadApi::new(
            state.clone(),
            attestor,
            // Never dialled: these tests make no JWT calls.
            NodeLink::new(
                "127.0.0.1:1".into(),
                state.trust_domain.clone(),
                Arc::new(sigil::tls::IdentityStore::empty()),
                Arc::new(sigil::tls::TrustStore::new(&roots).unwrap()),
            ),
            shutdown,
        );
        api.watch(caller, "x509_svid", x509_svid_watch).await
    }

    fn ids(m: &wl::X509svidResponse) -> Vec<String> {
        m.svids.iter().map(|s| s.spiffe_id.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn stream_sends_changes_only_and_ends_when_the_identity_goes() {
        use identities::tests::{cache_with, entry};
        use tokio_stream::StreamExt as _;
        let state = state_with(cache_with(vec![entry("a", 1, &["unix:uid:7"], "")], &["a"]));
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let mut s = x509_stream(&state, shutdown, caller(&["unix:uid:7"]))
            .await
            .unwrap();
        assert_eq!(state.metrics.workload_streams.get(), 1);
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(ids(&first), ["spiffe://example.org/w/a"]);

        // A change that leaves this caller's message as it was: nothing is sent.
        state.notify_changed();
        let quiet = tokio::time::timeout(Duration::from_secs(60), s.next()).await;
        assert!(quiet.is_err(), "an unchanged state was re-sent: {quiet:?}");

        // A second matching entry: the next message carries both.
        *state.cache.write().await = cache_with(
            vec![
                entry("a", 1, &["unix:uid:7"], ""),
                entry("b", 2, &["unix:uid:7"], ""),
            ],
            &["a", "b"],
        );
        state.notify_changed();
        let both = s.next().await.unwrap().unwrap();
        assert_eq!(
            ids(&both),
            ["spiffe://example.org/w/a", "spiffe://example.org/w/b"]
        );

        // Every entry gone: PermissionDenied "no identity issued", then the stream ends.
        *state.cache.write().await = cache_with(vec![entry("c", 3, &["unix:uid:8"], "")], &["c"]);
        state.notify_changed();
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(err.message(), NO_IDENTITY);
        assert!(s.next().await.is_none());
        drop(s);
        assert_eq!(state.metrics.workload_streams.get(), 0, "gauge back to 0");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_attested_without_the_exe_hash_gets_entries_that_need_it() {
        use crate::attestor::tests::{sha256_hex, FakeProc, EXE_BYTES};
        use identities::tests::{cache_with, entry};
        use tokio_stream::StreamExt as _;
        let state = state_with(cache_with(vec![entry("a", 1, &["unix:uid:7"], "")], &["a"]));
        let fake = FakeProc::new();
        // Wired as the agent does: the attestor reads the cache's flag.
        let flag = state.cache.read().await.exe_hash_flag();
        let attestor = Arc::new(fake.attestor().with_exe_hash_flag(flag));
        let pin = Arc::new(fake.pin());
        let a = attestor.attest_async(pin.clone(), 7, 7).await.unwrap();
        assert!(a.exe_hash_skipped, "no entry needs the hash yet");
        let caller = Caller {
            pid: a.pid,
            selectors: a.selectors,
            pin,
            uid: 7,
            gid: 7,
            exe_hash_skipped: true,
        };
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let mut s = x509_stream_with(&state, shutdown, caller, attestor)
            .await
            .unwrap();
        assert_eq!(
            ids(&s.next().await.unwrap().unwrap()),
            ["spiffe://example.org/w/a"]
        );

        // An entry on the executable's hash arrives (and its SVID): the open stream gets it.
        let sha = format!("unix:sha256:{}", sha256_hex(EXE_BYTES));
        {
            let mut cache = state.cache.write().await;
            cache
                .apply_sync(sigil::proto::node::SyncResponse {
                    upserted: vec![entry("b", 2, &["unix:uid:7", &sha], "")],
                    revision: 2,
                    ..Default::default()
                })
                .unwrap();
            // Valid for an hour from now: an expired SVID is never served.
            let now = now_unix();
            for p in cache.make_csrs(&["b".to_string()]).unwrap() {
                assert!(cache.store_svid(p, vec![b"b".to_vec()], now + 3600, now));
            }
        }
        state.notify_changed();
        let both = tokio::time::timeout(Duration::from_secs(60), s.next())
            .await
            .expect("the stream sent the new entry")
            .unwrap()
            .unwrap();
        assert_eq!(
            ids(&both),
            ["spiffe://example.org/w/a", "spiffe://example.org/w/b"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_whose_svid_never_arrives_gets_unavailable_after_the_wait() {
        use identities::tests::{cache_with, entry};
        use tokio_stream::StreamExt as _;
        // The entry matches, but no SVID is minted for it.
        let state = state_with(cache_with(vec![entry("a", 1, &["unix:uid:7"], "")], &[]));
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let mut s = x509_stream(&state, shutdown, caller(&["unix:uid:7"]))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert_eq!(started.elapsed(), FIRST_SVID_WAIT);
        assert!(s.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn streams_end_quietly_at_shutdown_and_unknown_callers_are_refused() {
        use identities::tests::{cache_with, entry};
        use tokio_stream::StreamExt as _;
        let state = state_with(cache_with(vec![entry("a", 1, &["unix:uid:7"], "")], &["a"]));
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let refused = x509_stream(&state, shutdown.clone(), caller(&["unix:uid:9"])).await;
        let err = refused.err().expect("no identity for uid 9");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert_eq!(state.metrics.workload_streams.get(), 0);

        let mut s = x509_stream(&state, shutdown, caller(&["unix:uid:7"]))
            .await
            .unwrap();
        assert!(s.next().await.unwrap().is_ok());
        stop.send(true).unwrap();
        assert!(s.next().await.is_none(), "ended without an error status");
    }

    #[tokio::test]
    async fn svids_that_expire_unrenewed_end_the_stream_with_unavailable() {
        use identities::tests::{entry, now_unix};
        use tokio_stream::StreamExt as _;
        // An SVID that expires in 2 s and is never renewed (real time: expiry is wall-clock).
        let mut cache = Cache::new();
        cache
            .apply_sync(sigil::proto::node::SyncResponse {
                upserted: vec![entry("a", 1, &["unix:uid:7"], "")],
                full: true,
                snapshot_complete: true,
                revision: 1,
                ..Default::default()
            })
            .unwrap();
        let now = now_unix();
        let p = cache.make_csrs(&["a".into()]).unwrap().pop().unwrap();
        cache.store_svid(p, vec![b"a".to_vec()], now + 2, now);
        let state = state_with(cache);
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let waker = tokio::spawn(super::super::expiry::wake_streams_at_expiry(
            state.clone(),
            shutdown.clone(),
        ));
        let mut s = x509_stream(&state, shutdown.clone(), caller(&["unix:uid:7"]))
            .await
            .unwrap();
        assert!(s.next().await.unwrap().is_ok(), "valid at first");
        let end = tokio::time::timeout(Duration::from_secs(30), s.next())
            .await
            .expect("the stream noticed the expiry")
            .unwrap()
            .unwrap_err();
        assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
        assert_eq!(end.message(), EXPIRED);
        assert!(s.next().await.is_none());
        // A new call gets Unavailable at once, not an expired SVID.
        let err = x509_stream(&state, shutdown, caller(&["unix:uid:7"]))
            .await
            .err()
            .expect("no expired SVID served");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        waker.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn every_message_waits_for_the_connecting_process_to_be_there() {
        use identities::tests::{cache_with, entry};
        use tokio_stream::StreamExt as _;
        // The caller: a child process, pinned with the ids it runs as.
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let mut pin = ProcessPin::pin(pid).unwrap();
        pin.creds = Some(me);
        let caller = Caller {
            pid,
            selectors: identities::tests::selectors(&["unix:uid:7"]),
            pin: Arc::new(pin),
            uid: me.0,
            gid: me.1,
            exe_hash_skipped: false,
        };
        let state = state_with(cache_with(vec![entry("a", 1, &["unix:uid:7"], "")], &["a"]));
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let mut s = x509_stream(&state, shutdown, caller).await.unwrap();
        assert!(s.next().await.unwrap().is_ok());

        // It exits; its stream (held by another process now, say) gets the next change.
        child.kill().unwrap();
        child.wait().unwrap();
        *state.cache.write().await = cache_with(
            vec![
                entry("a", 1, &["unix:uid:7"], ""),
                entry("b", 2, &["unix:uid:7"], ""),
            ],
            &["a", "b"],
        );
        state.notify_changed();
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains(&format!("pid {pid}")), "{err:?}");
        assert!(s.next().await.is_none());
    }

    #[test]
    fn header_must_be_exactly_true() {
        let mut r = Request::new(());
        assert_eq!(
            check_header(&r).map_err(|s| s.code()),
            Err(tonic::Code::InvalidArgument)
        );
        r.metadata_mut()
            .insert(SECURITY_HEADER, "false".parse().expect("ascii"));
        assert_eq!(
            check_header(&r).map_err(|s| s.code()),
            Err(tonic::Code::InvalidArgument)
        );
        r.metadata_mut()
            .insert(SECURITY_HEADER, "true".parse().expect("ascii"));
        assert!(check_header(&r).is_ok());
    }
}
