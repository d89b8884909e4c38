//! What the agent benches share: X509-SVIDs shaped like the server's.

/// `n` P-256 keys (PKCS#8 DER, as the agent generates them) with an X509-SVID leaf each, signed
/// by one throwaway CA the way sigil-server signs them: subject `C=US, O=SPIRE, CN=<dns>`, URI
/// SAN `spiffe://example.org/ns-<i % 100>/sa-<i % 5000>/w-<i>`, DNS SAN `w-<i>.example.org`,
/// key usage, extended key usages, AKI, a random 16-byte serial.
pub fn keys_and_leaves(n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(
        rcgen::DnType::CountryName,
        rcgen::DnValue::PrintableString("US".try_into().unwrap()),
    );
    ca.distinguished_name
        .push(rcgen::DnType::OrganizationName, "SPIFFE");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    (0..n)
        .map(|i| {
            let key = rcgen::KeyPair::generate().unwrap();
            let dns = format!("w-{i}.example.org");
            let id = format!("spiffe://example.org/ns-{}/sa-{}/w-{i}", i % 100, i % 5000);
            let mut p = rcgen::CertificateParams::default();
            let serial: [u8; 16] = rand::random();
            p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
            p.subject_alt_names = vec![
                rcgen::SanType::URI(id.as_str().try_into().unwrap()),
                rcgen::SanType::DnsName(dns.as_str().try_into().unwrap()),
            ];
            p.distinguished_name.push(
                rcgen::DnType::CountryName,
                rcgen::DnValue::PrintableString("US".try_into().unwrap()),
            );
            p.distinguished_name
                .push(rcgen::DnType::OrganizationName, "SPIRE");
            p.distinguished_name.push(rcgen::DnType::CommonName, dns);
            p.is_ca = rcgen::IsCa::ExplicitNoCa;
            p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.use_authority_key_identifier_extension = true;
            let leaf = p.signed_by(&key, &issuer).unwrap();
            (key.serialize_der(), leaf.der().to_vec())
        })
        .collect()
}
