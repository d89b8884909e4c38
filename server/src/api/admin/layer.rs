//! The one path every admin RPC takes ([`AdminService::call`]): caller's uid, handler, audit
//! event, entry gauge, bounded error message, metrics. Handlers only do their work and say what
//! they acted on ([`Outcome`]); an [`Rpc`] says how the layer treats each method.

use std::borrow::Cow;
use std::future::Future;
use std::time::Instant;

use tonic::transport::server::UdsConnectInfo;
use tonic::{Code, Request, Response, Status};

use super::{AdminService, AdminState, MAX_MESSAGE_CHARS};
use crate::datastore::EntryFilter;

/// How the layer treats one RPC.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rpc {
    /// The gRPC method name: the `method` label of the admin metrics.
    method: &'static str,
    /// What the audit log records of it.
    audit: Audit,
    /// The call may change the number of entries: the `entries` gauge is refreshed after it.
    changes_entries: bool,
}

/// What the audit log records of an RPC.
#[derive(Debug, Clone, Copy)]
enum Audit {
    /// Nothing: a read.
    None,
    /// One event with this action, whatever the outcome.
    Call(&'static str),
    /// One event per item with action `item` (the handler's [`Outcome::items`]), and one with
    /// action `call` only if the call fails as a whole (then no item was stored).
    Batch {
        call: &'static str,
        item: &'static str,
    },
}

impl Rpc {
    /// A read: measured, not audited.
    pub(super) const fn read(method: &'static str) -> Self {
        Self {
            method,
            audit: Audit::None,
            changes_entries: false,
        }
    }

    /// A mutation audited as `action`, with the object the handler names.
    pub(super) const fn audited(method: &'static str, action: &'static str) -> Self {
        Self {
            audit: Audit::Call(action),
            ..Self::read(method)
        }
    }

    /// A batch mutation: each item is audited as `item`; the call as `call` if it fails whole.
    pub(super) const fn batch(
        method: &'static str,
        call: &'static str,
        item: &'static str,
    ) -> Self {
        Self {
            audit: Audit::Batch { call, item },
            ..Self::read(method)
        }
    }

    /// Refreshes the `entries` gauge after the call.
    pub(super) const fn changing_entries(self) -> Self {
        Self {
            changes_entries: true,
            ..self
        }
    }
}

/// What a handler hands to the layer: its result and what the audit events name.
pub(super) struct Outcome<T> {
    /// The response, or the error returned to the caller.
    pub(super) result: Result<T, Status>,
    /// The object of the call's audit event: as the caller named it, or as the handler
    /// resolved it (a created entry's ID). Unused for reads.
    pub(super) object: String,
    /// A batch's per-item audit events: object and outcome.
    pub(super) items: Vec<(String, Result<(), Status>)>,
}

impl<T> Outcome<T> {
    /// `result`, audited as acting on `object`.
    pub(super) fn new(result: Result<T, Status>, object: impl Into<String>) -> Self {
        Self {
            result,
            object: object.into(),
            items: Vec::new(),
        }
    }
}

impl<T> From<Result<T, Status>> for Outcome<T> {
    /// A read's result: there is no object to audit.
    fn from(result: Result<T, Status>) -> Self {
        Self::new(result, String::new())
    }
}

impl AdminService {
    /// Runs `handler` on the request as `rpc` says: audit events, entry gauge, error message
    /// bounded to [`MAX_MESSAGE_CHARS`], then the request's status code and latency recorded.
    pub(super) async fn call<'s, Req, T, O, Fut>(
        &'s self,
        rpc: Rpc,
        req: Request<Req>,
        handler: impl FnOnce(&'s AdminState, Req) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: Future<Output = O>,
        O: Into<Outcome<T>>,
    {
        let start = Instant::now();
        let uid = caller_uid(&req);
        let outcome: Outcome<T> = handler(&self.state, req.into_inner()).await.into();
        match rpc.audit {
            Audit::None => {}
            Audit::Call(action) => audit(uid, action, &outcome.object, &outcome.result),
            Audit::Batch { call, item } => {
                if outcome.result.is_err() {
                    audit(uid, call, &outcome.object, &outcome.result);
                }
                for (object, result) in &outcome.items {
                    audit(uid, item, object, result);
                }
            }
        }
        if rpc.changes_entries {
            refresh_entry_gauge(&self.state).await;
        }
        let result = outcome.result.map_err(bound_message);
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.state
            .metrics
            .observe_admin(rpc.method, code, start.elapsed());
        result.map(Response::new)
    }
}

/// Sets the `entries` gauge from the datastore; a failed count leaves it as it was.
async fn refresh_entry_gauge(state: &AdminState) {
    if let Ok(n) = state.datastore.count_entries(&EntryFilter::default()).await {
        state.metrics.entries.set(n as i64);
    }
}

/// The caller's uid from the Unix socket's peer credentials, if known.
fn caller_uid<T>(req: &Request<T>) -> Option<u32> {
    req.extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid())
}

/// Writes one audit event; `object` (what the action was applied to, as the caller named it)
/// is truncated, so is the error message.
fn audit<T>(uid: Option<u32>, action: &str, object: &str, result: &Result<T, Status>) {
    let outcome = match result {
        Ok(_) => "ok".to_string(),
        Err(s) => format!(
            "{:?}: {}",
            s.code(),
            sigil::text::truncate_for_display(s.message(), MAX_MESSAGE_CHARS)
        ),
    };
    let object = sigil::text::echo(object);
    match uid {
        Some(uid) => {
            tracing::info!(target: "sigil::audit", caller_uid = uid, action, object = %object, result = %outcome, "admin action")
        }
        None => {
            tracing::info!(target: "sigil::audit", caller_uid = "unknown", action, object = %object, result = %outcome, "admin action")
        }
    }
}

/// Truncates an error message longer than [`MAX_MESSAGE_CHARS`] (one that echoes a long value
/// without bounding it), keeping its code.
pub(super) fn bound_message(s: Status) -> Status {
    match sigil::text::truncate_for_display(s.message(), MAX_MESSAGE_CHARS) {
        Cow::Borrowed(_) => s,
        Cow::Owned(short) => Status::new(s.code(), short),
    }
}
