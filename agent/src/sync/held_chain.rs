//! X509-SVID certificate chains as the cache holds them: compressed against a chain of the same
//! authority.
//!
//! An agent holds a chain per entry, 100,000 and more, and an authority's leaves share most of
//! their bytes: issuer name, algorithm and extension identifiers, the structure around the
//! names, validity times a few seconds apart, and any intermediate whole. LZ4 against a
//! dictionary (a chain held earlier) keeps what differs (key, signature, serial, names): about
//! half of a 560-byte leaf. Serving one decompresses it (well under a microsecond).
//!
//! [`ChainPacker`] picks the dictionary: the first chain it sees; when chains stop compressing
//! against it (a new authority, other names), a later chain replaces it. A chain that does not
//! compress is held as it is. Every compressed chain is checked to decompress to its original
//! bytes before it is held that way.

use std::borrow::Cow;
use std::sync::Arc;

/// A chain compressing to more than this share of its size is held as it is.
const MAX_PACKED_SHARE: f64 = 0.75;
/// After this many chains in a row held as they are, the next one becomes the dictionary.
const MISSES_BEFORE_NEW_DICTIONARY: u32 = 8;

/// A chain that others are compressed against.
#[derive(PartialEq, Eq)]
pub struct Dictionary(Box<[u8]>);

/// A certificate chain (DER certificates, concatenated), compressed or not.
#[derive(Clone, PartialEq, Eq)]
pub enum HeldChain {
    /// As received.
    Plain(Box<[u8]>),
    /// LZ4 block against `dictionary`; `len` bytes once decompressed.
    Packed {
        /// The compressed bytes.
        bytes: Box<[u8]>,
        /// The chain's length.
        len: u32,
        /// What it was compressed against.
        dictionary: Arc<Dictionary>,
    },
}

impl std::fmt::Debug for HeldChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeldChain::Plain(b) => write!(f, "HeldChain::Plain({} bytes)", b.len()),
            HeldChain::Packed { bytes, len, .. } => {
                write!(f, "HeldChain::Packed({} of {len} bytes)", bytes.len())
            }
        }
    }
}

impl HeldChain {
    /// The chain's bytes.
    pub fn der(&self) -> Cow<'_, [u8]> {
        match self {
            HeldChain::Plain(b) => Cow::Borrowed(b),
            // Checked to decompress when it was packed: the fallback is never taken.
            HeldChain::Packed {
                bytes,
                len,
                dictionary,
            } => Cow::Owned(unpack(bytes, *len, dictionary).unwrap_or_default()),
        }
    }

    /// The chain's length.
    pub fn len(&self) -> usize {
        match self {
            HeldChain::Plain(b) => b.len(),
            HeldChain::Packed { len, .. } => *len as usize,
        }
    }

    /// True for an empty chain.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn unpack(bytes: &[u8], len: u32, dictionary: &Dictionary) -> Option<Vec<u8>> {
    lz4_flex::block::decompress_with_dict(bytes, len as usize, &dictionary.0).ok()
}

/// Holds chains compressed against a dictionary it keeps current.
#[derive(Default)]
pub struct ChainPacker {
    dictionary: Option<Arc<Dictionary>>,
    /// Chains in a row that did not compress against the dictionary.
    misses: u32,
}

impl ChainPacker {
    /// A packer with no dictionary yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Holds `chain`: compressed against the current dictionary when that saves enough, else as
    /// it is (and after [`MISSES_BEFORE_NEW_DICTIONARY`] such chains in a row, or for the
    /// first chain, it becomes the dictionary).
    pub fn hold(&mut self, chain: Vec<u8>) -> HeldChain {
        let len = match u32::try_from(chain.len()) {
            Ok(len) if len > 0 => len,
            _ => return HeldChain::Plain(chain.into_boxed_slice()),
        };
        if self.misses >= MISSES_BEFORE_NEW_DICTIONARY {
            self.dictionary = None;
            self.misses = 0;
        }
        let dictionary = self
            .dictionary
            .get_or_insert_with(|| Arc::new(Dictionary(chain.clone().into_boxed_slice())));
        let packed = lz4_flex::block::compress_with_dict(&chain, &dictionary.0);
        if packed.len() as f64 > chain.len() as f64 * MAX_PACKED_SHARE
            || unpack(&packed, len, dictionary).as_deref() != Some(chain.as_slice())
        {
            self.misses += 1;
            return HeldChain::Plain(chain.into_boxed_slice());
        }
        self.misses = 0;
        HeldChain::Packed {
            bytes: packed.into_boxed_slice(),
            len,
            dictionary: dictionary.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Leaves of one authority, shaped like sigil-server's X509-SVIDs.
    fn leaves(n: usize) -> Vec<Vec<u8>> {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::OrganizationName, "SPIFFE");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        (0..n)
            .map(|i| {
                let key = rcgen::KeyPair::generate().expect("key");
                let mut p = rcgen::CertificateParams::new(vec![format!("w-{i}.example.org")])
                    .expect("params");
                p.subject_alt_names.push(rcgen::SanType::URI(
                    format!("spiffe://example.org/ns/sa-{i}")
                        .try_into()
                        .expect("uri"),
                ));
                p.distinguished_name
                    .push(rcgen::DnType::OrganizationName, "SPIRE");
                p.use_authority_key_identifier_extension = true;
                p.signed_by(&key, &issuer).expect("cert").der().to_vec()
            })
            .collect()
    }

    #[test]
    fn chains_of_one_authority_are_held_in_about_half_and_come_back_whole() {
        let mut packer = ChainPacker::new();
        let leaves = leaves(20);
        let held: Vec<HeldChain> = leaves.iter().map(|l| packer.hold(l.clone())).collect();
        for (leaf, h) in leaves.iter().zip(&held) {
            assert_eq!(h.der().as_ref(), leaf.as_slice());
            assert_eq!(h.len(), leaf.len());
        }
        for h in &held[1..] {
            let HeldChain::Packed { bytes, len, .. } = h else {
                panic!("not packed: {h:?}");
            };
            assert!(bytes.len() * 10 < *len as usize * 6, "{h:?}");
        }
    }

    #[test]
    fn chains_that_do_not_compress_are_held_as_they_are_then_replace_the_dictionary() {
        let mut packer = ChainPacker::new();
        let first = leaves(1).remove(0);
        assert!(matches!(
            packer.hold(first.clone()),
            HeldChain::Packed { .. }
        ));
        // Bytes with nothing in common with the dictionary nor with themselves.
        let noise = |seed: u64| -> Vec<u8> {
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            (0..600)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 56) as u8
                })
                .collect()
        };
        for i in 0..MISSES_BEFORE_NEW_DICTIONARY {
            let n = noise(u64::from(i) + 1);
            let h = packer.hold(n.clone());
            assert_eq!(h, HeldChain::Plain(n.into_boxed_slice()));
        }
        // The next chain becomes the dictionary (and packs against itself); the earlier
        // packed chain keeps its own.
        let next = noise(99);
        let h = packer.hold(next.clone());
        assert!(matches!(h, HeldChain::Packed { .. }), "{h:?}");
        assert_eq!(h.der().as_ref(), next.as_slice());
    }

    #[test]
    fn an_empty_chain_is_held_and_returned_empty() {
        let mut packer = ChainPacker::new();
        let h = packer.hold(Vec::new());
        assert!(h.is_empty());
        assert!(h.der().is_empty());
    }
}
