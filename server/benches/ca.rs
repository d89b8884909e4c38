//! CA signing benchmark: how close SVID issuance gets to the raw ECDSA P-256 rate.
//!
//! - `ring_ecdsa_p256_sign`: ring `EcdsaKeyPair::sign` (ASN.1 signature) of a 32-byte message,
//!   the floor every X509-SVID pays once;
//! - `sign_x509_svid`: issuance from a pre-made SubjectPublicKeyInfo (the SVID signing rate);
//! - `sign_x509_svid_csr`: the same from a PKCS#10 CSR (adds CSR parsing and its signature check);
//! - `mint_jwt_svid`: one ES256 JWT-SVID.
//!
//! Run: `cargo bench -p sigil-server --bench ca` (about 30 s). Results: BENCHMARKS.md.
#![allow(missing_docs)] // criterion's macros generate undocumented public functions.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use rcgen::{CertificateParams, KeyPair, PublicKeyData as _};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use sigil::TrustDomain;
use sigil_server::ca::{Ca, CaConfig};

fn bench_ca(c: &mut Criterion) {
    // (a) Raw ring ECDSA P-256.
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .expect("generate P-256 key");
    let raw = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .expect("load P-256 key");
    let msg = [0x5au8; 32];
    c.bench_function("ring_ecdsa_p256_sign", |b| {
        b.iter(|| raw.sign(&rng, black_box(&msg)).expect("sign"))
    });

    // The CA (self-signed P-256 root, the default).
    let dir = tempfile::tempdir().expect("tempdir");
    let td = TrustDomain::new("example.org").expect("trust domain");
    let ca = Ca::load_or_create(&CaConfig::new(td.clone(), dir.path().join("ca"))).expect("CA");
    let id = td.id("/ns/default/sa/web").expect("SPIFFE ID");
    let dns = vec!["web.default.svc".to_string()];
    let leaf = KeyPair::generate().expect("leaf key");
    let spki = leaf.subject_public_key_info();

    // (b) X509-SVID from a SubjectPublicKeyInfo.
    c.bench_function("sign_x509_svid", |b| {
        b.iter(|| {
            ca.sign_x509_svid(black_box(&spki), &id, &dns, None)
                .expect("sign")
        })
    });

    // (c) X509-SVID from a CSR.
    let csr = CertificateParams::default()
        .serialize_request(&leaf)
        .expect("CSR");
    c.bench_function("sign_x509_svid_csr", |b| {
        b.iter(|| {
            ca.sign_x509_svid_csr(black_box(csr.der()), &id, &dns, None)
                .expect("sign CSR")
        })
    });

    // (d) JWT-SVID.
    let aud = vec!["db".to_string()];
    c.bench_function("mint_jwt_svid", |b| {
        b.iter(|| ca.mint_jwt_svid(&id, black_box(&aud), None).expect("mint"))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = bench_ca
}
criterion_main!(benches);
