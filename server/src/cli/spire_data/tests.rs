use proptest::prelude::*;
use serde_json::json;

use super::*;

const NOW: i64 = 1_800_000_000;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").expect("trust domain")
}

fn id(path: &str) -> Value {
    json!({"trust_domain": "example.org", "path": path})
}

/// An entry as `spire-server entry show -output json` prints it (protojson, proto names,
/// unpopulated fields, 64-bit numbers as strings).
fn shown(spiffe: &str, parent: &str, selectors: Value) -> Value {
    json!({
        "id": "5a0c8d7e-0000-4000-8000-000000000001",
        "spiffe_id": id(spiffe),
        "parent_id": id(parent),
        "selectors": selectors,
        "x509_svid_ttl": 3600,
        "federates_with": [],
        "admin": false,
        "downstream": false,
        "expires_at": "0",
        "dns_names": [],
        "revision_number": "0",
        "store_svid": false,
        "jwt_svid_ttl": 300,
        "hint": "",
        "created_at": "1764752000"
    })
}

fn sel(t: &str, v: &str) -> Value {
    json!({"type": t, "value": v})
}

fn show_file(entries: Vec<Value>) -> Value {
    json!({"entries": entries, "next_page_token": ""})
}

fn read(doc: &Value) -> SpireImport {
    let format = detect(doc, FormatArg::Auto).expect("format");
    read_spire(doc, format, &td(), NOW).expect("readable file")
}

fn only_refusal(doc: &Value) -> Refusal {
    let i = read(doc);
    assert!(i.planned.is_empty(), "{:?}", i.planned);
    assert_eq!(i.refused.len(), 1, "{:?}", i.refused);
    i.refused[0].reason.clone()
}

#[test]
fn formats_are_told_apart_per_file() {
    let show = show_file(vec![shown("/w", "/node", json!([sel("unix", "uid:1")]))]);
    assert_eq!(
        detect(&show, FormatArg::Auto).ok(),
        Some(DataFormat::SpireShow)
    );

    let common = json!({"entries": [{"spiffe_id": "spiffe://example.org/w",
        "parent_id": "spiffe://example.org/node", "selectors": [sel("unix", "uid:1")]}]});
    assert_eq!(
        detect(&common, FormatArg::Auto).ok(),
        Some(DataFormat::Sigil),
        "the forms both share mean the same: read as Sigil's"
    );
    assert_eq!(
        detect(&common, FormatArg::Spire).ok(),
        Some(DataFormat::SpireCreate)
    );

    for marker in [
        json!({"entryExpiry": 0}),
        json!({"store_svid": false}),
        json!({"entry_id": "x"}),
        json!({"revision_number": 3}),
        json!({"created_at": 1}),
        json!({"Admin": true}),
        json!({"parent_id": "spiffe://example.org/spire/server"}),
    ] {
        let mut doc = common.clone();
        for (k, v) in marker.as_object().expect("object") {
            doc["entries"][0][k] = v.clone();
        }
        assert_eq!(
            detect(&doc, FormatArg::Auto).ok(),
            Some(DataFormat::SpireCreate),
            "{marker}"
        );
    }

    let mut sigil = common.clone();
    sigil["entries"][0]["selectors"] = json!(["unix:uid:1"]);
    assert_eq!(
        detect(&sigil, FormatArg::Auto).ok(),
        Some(DataFormat::Sigil)
    );
    assert_eq!(
        detect(&json!([{"spiffe_id": "x"}]), FormatArg::Auto).ok(),
        Some(DataFormat::Sigil)
    );

    let mut mixed = sigil.clone();
    mixed["entries"][0]["store_svid"] = json!(false);
    let err = detect(&mixed, FormatArg::Auto).expect_err("mixed");
    assert!(
        err.to_string().contains("mixes formats") && err.to_string().contains("store_svid"),
        "{err}"
    );
    assert_eq!(
        detect(&mixed, FormatArg::Sigil).ok(),
        Some(DataFormat::Sigil)
    );
}

#[test]
fn spire_entries_map_onto_sigil_entries() {
    let mut federated = shown(
        "/web",
        "/node/a",
        json!([sel("unix", "uid:1000"), sel("unix", "path:/usr/bin/web")]),
    );
    federated["federates_with"] = json!(["other.org"]);
    federated["dns_names"] = json!(["web.example.org"]);
    federated["hint"] = json!("internal");
    federated["downstream"] = json!(true);
    let doc = show_file(vec![
        shown(
            "/node/a",
            "/spire/server",
            json!([sel("k8s_psat", "cluster:c1")]),
        ),
        shown(
            "/k8s-web",
            "/spire/agent/k8s_psat/c1/0d0c5d1e-1111-4222-8333-444455556666",
            json!([sel("k8s", "ns:prod"), sel("k8s", "sa:web")]),
        ),
        federated,
    ]);
    let i = read(&doc);
    assert!(i.refused.is_empty(), "{:?}", i.refused);
    let e = &i.planned;
    assert_eq!(e.len(), 3);
    assert_eq!(e[0].entry.spiffe_id, "spiffe://example.org/node/a");
    assert_eq!(e[0].entry.parent_id, "spiffe://example.org/sigil/server");
    assert_eq!(
        e[1].entry.parent_id,
        "spiffe://example.org/sigil/agent/k8s_psat/c1/0d0c5d1e-1111-4222-8333-444455556666"
    );
    assert_eq!(e[2].index, 2);
    assert_eq!(e[2].entry.x509_svid_ttl, 3600);
    assert_eq!(e[2].entry.jwt_svid_ttl, 300);
    assert_eq!(e[2].entry.federates_with, ["other.org"]);
    assert_eq!(e[2].entry.dns_names, ["web.example.org"]);
    assert_eq!(e[2].entry.hint, "internal");
    assert!(e[2].entry.downstream && !e[2].entry.admin);
    let sels: Vec<String> = e[2]
        .entry
        .selectors
        .iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    assert_eq!(sels, ["unix:uid:1000", "unix:path:/usr/bin/web"]);
    assert!(e[2].entry.id.is_empty(), "SPIRE's entry id is not kept");
}

#[test]
fn create_input_is_read_as_spire_reads_it() {
    // Go's encoding/json matches names case-insensitively; entryExpiry is camelCase there.
    let doc = json!({"entries": [
        {"selectors": [{"Type": "unix", "VALUE": "uid:1111"}], "spiffe_id": "spiffe://example.org/Blog",
         "parent_id": "spiffe://example.org/spire/server", "x509_svid_ttl": 200,
         "ENTRYEXPIRY": 0, "Admin": true},
        {"selectors": [sel("unix", "uid:1")], "spiffe_id": "spiffe://example.org/old",
         "parent_id": "spiffe://example.org/node", "entryExpiry": NOW - 1}
    ]});
    let i = read(&doc);
    assert_eq!(i.format, DataFormat::SpireCreate);
    assert_eq!(i.planned.len(), 1);
    let e = &i.planned[0].entry;
    assert_eq!(e.spiffe_id, "spiffe://example.org/Blog");
    assert_eq!(e.parent_id, "spiffe://example.org/sigil/server");
    assert_eq!(e.x509_svid_ttl, 200);
    assert!(e.admin);
    assert_eq!(i.refused[0].reason, Refusal::Expired(NOW - 1));
    assert_eq!(
        i.refused[0].spiffe_id.as_deref(),
        Some("spiffe://example.org/old")
    );
}

#[test]
fn what_sigil_cannot_honour_is_refused_with_the_reason() {
    let unix = || json!([sel("unix", "uid:1")]);
    let cases: Vec<(Value, &str)> = vec![
        (shown("/w", "/spire/agent/join_token/abc", unix()), "join-token agent"),
        (shown("/w", "/spire/agent/x509pop/0123", unix()), "SHA-1"),
        (shown("/w", "/spire/agent/aws_iid/123/i-1", unix()), "\"aws_iid\""),
        (shown("/w", "/spire/agent/k8s_psat/only-cluster", unix()), "k8s_psat"),
        (shown("/w", "/spire/other", unix()), "reserved /spire path"),
        (shown("/w", "/n", json!([sel("docker", "label:app:web")])), "docker attestor has no key \"label\""),
        (shown("/w", "/n", json!([sel("systemd", "fragment_path:/x")])), "no key \"fragment_path\""),
        (shown("/w", "/n", json!([sel("aws_iid", "tag:x")])), "no Sigil attestor produces type \"aws_iid\""),
        (shown("/w", "/n", json!([sel("unix", "uid:abc")])), "decimal number"),
        (
            shown("/w", "/spire/server", json!([sel("x509pop", &format!("ca:fingerprint:{}", "a".repeat(40)))])),
            "SHA-1 of the CA certificate",
        ),
        (
            shown("/w", "/n", json!([sel("spiffe_id", "spiffe://example.org/spire/agent/join_token/t")])),
            "selector spiffe_id spiffe://example.org/spire/agent/join_token/t is a SPIRE join-token agent",
        ),
        (
            shown("/w", "/spire/server", json!([sel("x509pop", "san:dns:node1")])),
            "x509pop:// URI SANs",
        ),
        (shown("/w", "/n", json!([])), "no selectors"),
        (shown("/w", "/n", json!([sel("unix", " uid:1")])), "control characters or leading"),
    ];
    for (entry, needle) in cases {
        let reason = only_refusal(&show_file(vec![entry.clone()])).to_string();
        assert!(reason.contains(needle), "{entry}: {reason}");
    }

    let parent = "spiffe://example.org/spire/agent/join_token/t1";
    let alias = shown(
        "/node-a",
        "/spire/agent/join_token/t1",
        json!([sel("spiffe_id", parent)]),
    );
    assert_eq!(
        only_refusal(&show_file(vec![alias])),
        Refusal::JoinTokenAlias {
            alias: "spiffe://example.org/node-a".into(),
            token: "t1".into()
        }
    );

    let mut e = shown("/w", "/n", unix());
    e["store_svid"] = json!(true);
    assert_eq!(only_refusal(&show_file(vec![e])), Refusal::StoreSvid);
    let mut e = shown("/w", "/n", unix());
    e["expires_at"] = json!((NOW + 60).to_string());
    assert_eq!(only_refusal(&show_file(vec![e])), Refusal::Expiry(NOW + 60));
    let mut e = shown("/w", "/n", unix());
    e["x509_svid_ttl"] = json!(30);
    assert!(matches!(
        only_refusal(&show_file(vec![e])),
        Refusal::Ttl {
            field: "x509_svid_ttl",
            ..
        }
    ));
    let mut e = shown("/w", "/n", unix());
    e["jwt_svid_ttl"] = json!(-5);
    assert!(only_refusal(&show_file(vec![e]))
        .to_string()
        .contains("negative"));
    let mut e = shown("/w", "/n", unix());
    e["federates_with"] = json!(["not a domain"]);
    assert!(matches!(
        only_refusal(&show_file(vec![e])),
        Refusal::FederatesWith { .. }
    ));

    let mut other = shown("/w", "/n", unix());
    other["spiffe_id"]["trust_domain"] = json!("other.org");
    let reason = only_refusal(&show_file(vec![other])).to_string();
    assert_eq!(
        reason,
        "spiffe_id spiffe://other.org/w is in trust domain other.org, this server's is example.org"
    );
    let mut other = shown("/w", "/n", unix());
    other["parent_id"]["trust_domain"] = json!("other.org");
    assert!(matches!(
        only_refusal(&show_file(vec![other])),
        Refusal::TrustDomain {
            field: "parent_id",
            ..
        }
    ));
}

#[test]
fn a_refused_entry_does_not_hide_the_others() {
    let doc = show_file(vec![
        shown("/a", "/n", json!([sel("unix", "uid:1")])),
        shown("/b", "/n", json!([sel("docker", "image_id:x")])),
        json!("not an entry"),
        shown("/c", "/n", json!([sel("unix", "gid:2")])),
    ]);
    let i = read(&doc);
    let planned: Vec<usize> = i.planned.iter().map(|p| p.index).collect();
    let refused: Vec<usize> = i.refused.iter().map(|r| r.index).collect();
    assert_eq!(planned, [0, 3]);
    assert_eq!(refused, [1, 2]);
    assert_eq!(
        i.refused[0].spiffe_id.as_deref(),
        Some("spiffe://example.org/b")
    );
    assert_eq!(i.refused[1].spiffe_id, None);
}

#[test]
fn malformed_input_gives_clear_errors() {
    for (doc, needle) in [
        (json!("x"), "found a string"),
        (json!({"entries": 3}), "found a number"),
        (json!({"items": []}), "without \"entries\""),
    ] {
        let err = detect(&doc, FormatArg::Auto).expect_err("not a data file");
        assert!(err.to_string().contains(needle), "{doc}: {err}");
    }
    let empty = json!({"entries": [], "next_page_token": ""});
    let format = detect(&empty, FormatArg::Auto).expect("format");
    assert!(matches!(
        read_spire(&empty, format, &td(), NOW),
        Err(DataFileError::Empty)
    ));

    let base = || shown("/w", "/n", json!([sel("unix", "uid:1")]));
    let with = |k: &str, v: Value| {
        let mut e = base();
        e[k] = v;
        show_file(vec![e])
    };
    for (doc, needle) in [
        (
            with("selectors", json!(["unix:uid:1"])),
            "expected an object, found a string",
        ),
        (
            with("selectors", json!([{"type": "unix"}])),
            "missing field `value`",
        ),
        (
            with(
                "selectors",
                json!([{"type": "unix", "value": "uid:1", "x": 1}]),
            ),
            "unknown field",
        ),
        (
            with("x509_svid_ttl", json!("soon")),
            "\"soon\" is not a whole number",
        ),
        (
            with("expires_at", json!("99999999999999999999999")),
            "not a whole number",
        ),
        (with("admin", json!("yes")), "invalid type"),
        (with("surprise", json!(1)), "unknown field `surprise`"),
        (
            with(
                "spiffe_id",
                json!({"trust_domain": "example.org", "path": "/w", "x": 1}),
            ),
            "unknown field",
        ),
        (
            with(
                "spiffe_id",
                json!({"trust_domain": "example.org", "path": 7}),
            ),
            "invalid type",
        ),
        (with("spiffeId", json!(id("/w"))), "given twice"),
        // Long input is echoed cut, with its length.
        (
            with("selectors", json!([{"type": "x".repeat(5000)}])),
            "(5011 bytes): missing field `value`",
        ),
        (with("admin", json!("y".repeat(5000))), "bytes)"),
    ] {
        let reason = only_refusal(&doc).to_string();
        assert!(
            reason.starts_with("not an entry of SPIRE's `entry show -output json`")
                && reason.contains(needle),
            "{doc}: {reason}"
        );
    }
    for (doc, needle) in [
        (with("spiffe_id", Value::Null), "spiffe_id is missing"),
        (
            with("spiffe_id", json!({"trust_domain": "", "path": "/w"})),
            "spiffe_id \"spiffe:///w\"",
        ),
        (
            with(
                "parent_id",
                json!({"trust_domain": "example.org", "path": "no-slash"}),
            ),
            "parent_id",
        ),
    ] {
        let reason = only_refusal(&doc).to_string();
        assert!(reason.contains(needle), "{doc}: {reason}");
    }
}

proptest! {
    /// Whatever the file holds, reading it returns (no panic), and every entry is either
    /// planned or refused.
    #[test]
    fn arbitrary_entries_never_panic(
        entries in prop::collection::vec(arbitrary_json(), 1..4),
        show in any::<bool>(),
    ) {
        let mut doc = json!({"entries": entries});
        if show {
            doc["next_page_token"] = json!("");
        }
        let format = detect(&doc, FormatArg::Spire).expect("an entries list");
        let i = read_spire(&doc, format, &td(), NOW).expect("non-empty");
        prop_assert_eq!(i.planned.len() + i.refused.len(), doc["entries"].as_array().map_or(0, Vec::len));
    }
}

/// JSON values shaped like entries: mostly the real field names with values of any type.
fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z0-9:/._ -]{0,24}".prop_map(Value::from),
        Just(json!("spiffe://example.org/spire/agent/k8s_psat/c/u")),
        Just(json!(id("/x"))),
        Just(json!([sel("unix", "uid:1")])),
    ];
    let key = prop_oneof![
        Just("spiffe_id".to_string()),
        Just("parent_id".to_string()),
        Just("selectors".to_string()),
        Just("x509_svid_ttl".to_string()),
        Just("expires_at".to_string()),
        Just("entryExpiry".to_string()),
        Just("federates_with".to_string()),
        "[a-zA-Z_]{1,12}",
    ];
    leaf.prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
