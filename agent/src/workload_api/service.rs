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
//! only by the cache changes that concern its caller ([`crate::sync::watchers`]); it reads the
//! latest published snapshot, builds a message only when its view's key changed
//! ([`identities::view_key`]), and sends it only when it differs from the last one: each message
//! is the full state.

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
use crate::sync::cache::Snapshot;
use crate::sync::client::ClientError;
use crate::sync::watchers::Subscription;
use crate::sync::worker::AgentState;
use crate::workload_attestor::{AttestError, ProcessPin, WorkloadAttestor};

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
    /// Shared with the stream's registration ([`crate::sync::watchers`]).
    pub(super) selectors: Arc<SelectorSet>,
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
                    selectors: Arc::new(a.selectors),
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
            Err(e @ (AttestError::Task(_) | AttestError::HashNotComputed)) => {
                Err(Status::internal(e.to_string()))
            }
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
    /// each would cost a few KiB): woken by the changes that concern its caller, it reads the
    /// latest snapshot and yields the new full state when it differs from the last one sent.
    async fn watch<M, F>(
        &self,
        caller: Caller,
        what: &'static str,
        build: F,
    ) -> Result<WatchStream<M>, Status>
    where
        M: prost::Message + Send + 'static,
        F: Fn(&Snapshot, &SelectorSet) -> Watch<M> + Send + Sync + 'static,
    {
        let state = self.inner.state.clone();
        let mut caller = caller;
        // An entry needing `unix:sha256` may have arrived since the caller was attested.
        attest_again_if_hash_wanted(&self.inner.attestor, &mut caller, what).await?;
        // Subscribed before the first look, so no change between the two is missed.
        let sub = state
            .watchers
            .subscribe(&mut caller.selectors, caller.exe_hash_skipped);
        let mut watcher = Watcher {
            _gauge: StreamGauge::new(&state),
            state,
            attestor: self.inner.attestor.clone(),
            caller,
            what,
            build,
            sub,
            shutdown: self.inner.shutdown.clone(),
            last_key: None,
            last: None,
            first: None,
            look_now: false,
            pending: false,
            pending_deadline: tokio::time::Instant::now() + FIRST_SVID_WAIT,
            done: false,
        };
        let first = look_changed(
            &watcher.state,
            &watcher.caller,
            &watcher.build,
            &mut watcher.last_key,
        );
        match first.unwrap_or(Watch::Pending) {
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
    /// Wakes the stream when a change concerns its caller.
    sub: Subscription,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// The view key of the last look (None: none yet, or look again whatever the key).
    last_key: Option<u64>,
    /// Fingerprint of the last message sent (None: nothing sent yet).
    last: Option<u64>,
    /// The first message, looked up before the stream started.
    first: Option<M>,
    /// A change concerned the caller since the last look.
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
    F: Fn(&Snapshot, &SelectorSet) -> Watch<M>,
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
                if let Err(s) = self.attest_again_if_hash_wanted().await {
                    return self.end(s);
                }
                let seen = look_changed(&self.state, &self.caller, &self.build, &mut self.last_key);
                // An unchanged view: the last look's outcome stands.
                let Some(seen) = seen else {
                    continue;
                };
                self.pending = false;
                match seen {
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
                _ = self.sub.changed() => Woke::Changed,
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

    /// [`attest_again_if_hash_wanted`] for this stream's caller, registering its new selectors.
    async fn attest_again_if_hash_wanted(&mut self) -> Result<(), Status> {
        if attest_again_if_hash_wanted(&self.attestor, &mut self.caller, self.what).await? {
            self.sub
                .update(&mut self.caller.selectors, self.caller.exe_hash_skipped);
        }
        Ok(())
    }

    /// Sends `status` and ends the stream.
    fn end(mut self, status: Status) -> Option<(Result<M, Status>, Self)> {
        self.done = true;
        Some((Err(status), self))
    }
}

/// The caller was attested without `unix:sha256` (no entry needed it) and now an entry does:
/// attest it again, so that entry can match on its open `stream` (true: attested again). Err
/// only when the process is gone; another failure keeps the selectors it has (they were right).
pub(super) async fn attest_again_if_hash_wanted(
    attestor: &Arc<WorkloadAttestor>,
    caller: &mut Caller,
    stream: &str,
) -> Result<bool, Status> {
    if !caller.exe_hash_skipped || !attestor.exe_hash_wanted() {
        return Ok(false);
    }
    // Boxed: the attestation's future (with a kubelet request when the k8s attestor is on) is
    // several KiB, and awaited inline it would be part of every open stream's state for as long
    // as the stream lives, although it runs only when an entry starts needing the hash.
    Box::pin(attest_again(attestor, caller, stream)).await
}

/// [`attest_again_if_hash_wanted`] once it is wanted.
async fn attest_again(
    attestor: &Arc<WorkloadAttestor>,
    caller: &mut Caller,
    stream: &str,
) -> Result<bool, Status> {
    match attestor
        .attest_async(caller.pin.clone(), caller.uid, caller.gid)
        .await
    {
        Ok(a) => {
            tracing::debug!(pid = a.pid, selectors = %a.selectors, stream, "workload attested again: an entry now needs its executable's hash");
            caller.selectors = Arc::new(a.selectors);
            caller.exe_hash_skipped = a.exe_hash_skipped;
            Ok(true)
        }
        Err(AttestError::Gone { pid }) => Err(gone(pid)),
        Err(e) => {
            tracing::debug!(pid = caller.pid, error = %e, "attesting the workload again failed; keeping its selectors");
            Ok(false)
        }
    }
}

/// FetchX509SVID's view of the cache for a caller with `selectors`.
fn x509_svid_watch(cache: &Snapshot, selectors: &SelectorSet) -> Watch<wl::X509svidResponse> {
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
pub(super) fn look<M>(
    state: &AgentState,
    caller: &Caller,
    build: &impl Fn(&Snapshot, &SelectorSet) -> Watch<M>,
) -> Watch<M> {
    look_in(&state.snapshot(), caller, build)
}

fn look_in<M>(
    cache: &Snapshot,
    caller: &Caller,
    build: &impl Fn(&Snapshot, &SelectorSet) -> Watch<M>,
) -> Watch<M> {
    if cache.has_snapshot() {
        build(cache, &caller.selectors)
    } else {
        // Just started: "no identity" would be a lie until entries arrive.
        Watch::Pending
    }
}

/// [`look`], unless the caller's view is the same as at the last look (`last_key`, updated):
/// then `None`, and nothing is built or encoded.
pub(super) fn look_changed<M>(
    state: &AgentState,
    caller: &Caller,
    build: &impl Fn(&Snapshot, &SelectorSet) -> Watch<M>,
    last_key: &mut Option<u64>,
) -> Option<Watch<M>> {
    let cache = state.snapshot();
    let key = identities::view_key(&cache, &caller.selectors, now_unix());
    if *last_key == Some(key) {
        return None;
    }
    *last_key = Some(key);
    Some(look_in(&cache, caller, build))
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
        let mut tainted_kids = Vec::new();
        let targets: Vec<(String, i64, String, String)> = {
            let cache = self.inner.state.snapshot();
            if let Some(b) = cache.bundle() {
                tainted_kids.clone_from(&b.tainted_jwt_kids);
            }
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
                    &tainted_kids,
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
            let cache = self.inner.state.snapshot();
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
mod tests;
