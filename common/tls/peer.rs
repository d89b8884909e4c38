//! What handlers learn of the peer: the verified client X509-SVID of the connection.

#[cfg(doc)]
use super::incoming;
use crate::spiffe_id::SpiffeId;
use crate::x509::X509Error;

/// The verified X509-SVID a peer presented on this connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSvid {
    /// The SPIFFE ID of the leaf.
    pub spiffe_id: SpiffeId,
    /// The leaf's serial number, lowercase hex (as the server's CA records it).
    pub serial_hex: String,
    /// The leaf's NotAfter, Unix seconds.
    pub not_after: i64,
}

impl PeerSvid {
    /// Reads the SPIFFE ID, serial and expiry of a leaf X509-SVID.
    pub fn from_leaf_der(leaf_der: &[u8]) -> Result<PeerSvid, X509Error> {
        let spiffe_id = crate::x509::check_x509_svid(leaf_der)?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(leaf_der).map_err(|e| X509Error::Der {
                index: 0,
                reason: e.to_string(),
            })?;
        let serial_hex = cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(PeerSvid {
            spiffe_id,
            serial_hex,
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// The client SVID of the connection `req` arrived on: `None` without a client certificate
/// (or outside a TLS connection from [`incoming`]). The chain was verified in the handshake.
pub fn peer_svid<T>(req: &tonic::Request<T>) -> Option<PeerSvid> {
    let certs = req.peer_certs()?;
    let leaf = certs.first()?;
    PeerSvid::from_leaf_der(leaf).ok()
}
