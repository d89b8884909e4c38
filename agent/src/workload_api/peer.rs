//! Accepted Workload API connections, with the caller pinned at accept time.
//!
//! The kernel records the peer's credentials (SO_PEERCRED: pid, uid, gid) when it connects. The
//! PID is only a number: if the caller exits, the number can be reused by another process. So
//! the process is pinned as soon as the connection is accepted (its PID plus its start time,
//! which a reused PID does not share), attestation reads /proc through that pin, and the pin is
//! checked again before the answer leaves.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::Connected;

use crate::attestor::ProcessPin;

/// Who is on the other end of a Workload API connection, as the kernel and /proc said at accept.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Effective uid at connect time (kernel-provided).
    pub uid: u32,
    /// Effective gid at connect time (kernel-provided).
    pub gid: u32,
    /// Caller's pid, if the kernel gave one.
    pub pid: Option<i32>,
    /// The pinned process, or why it could not be pinned (the caller already exited, or the
    /// kernel gave no pid).
    pub pin: Result<Arc<ProcessPin>, String>,
}

/// A Unix stream whose peer was identified when it was accepted.
#[derive(Debug)]
pub struct PeerStream {
    stream: UnixStream,
    info: PeerInfo,
}

impl PeerStream {
    /// Reads the peer credentials and pins the process.
    pub fn accept(stream: UnixStream) -> io::Result<Self> {
        let cred = stream.peer_cred()?;
        let pid = cred.pid();
        let pin = match pid {
            Some(pid) if pid > 0 => ProcessPin::pin(pid)
                .map(Arc::new)
                .map_err(|e| e.to_string()),
            _ => Err("the kernel reported no process id for the caller".to_string()),
        };
        Ok(Self {
            stream,
            info: PeerInfo {
                uid: cred.uid(),
                gid: cred.gid(),
                pid,
                pin,
            },
        })
    }
}

/// The accepted connections of `listener`, each with its [`PeerInfo`]. A connection whose
/// credentials cannot be read is dropped (logged) rather than ending the server.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<PeerStream>> {
    tokio_stream::wrappers::UnixListenerStream::new(listener).filter_map(|conn| match conn {
        Ok(stream) => match PeerStream::accept(stream) {
            Ok(s) => Some(Ok(s)),
            Err(e) => {
                tracing::warn!(error = %e, "Workload API: cannot read the caller's credentials; connection dropped");
                None
            }
        },
        Err(e) => {
            // Accept errors (EMFILE...) are transient: log and keep serving.
            tracing::warn!(error = %e, "Workload API: accept failed");
            None
        }
    })
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
