//! Property tests for the parsers that take operator and network input: whatever the bytes, they
//! return an error or a value — never panic — and every accepted value prints back to itself.
//! They run in every test run; coverage-guided fuzzing (cargo-fuzz, nightly, outside CI) of the
//! HTTP/2 `:authority` adapter lives in `fuzz/`.

use proptest::prelude::*;

use crate::selector::Selector;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Strings biased towards the characters that matter to the SPIFFE-ID grammar.
fn id_like() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("spiffe://".to_string()),
        Just("/".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just(":".to_string()),
        Just("@".to_string()),
        Just("%2F".to_string()),
        Just("?".to_string()),
        Just("#".to_string()),
        "[a-zA-Z0-9._-]{0,12}",
        any::<char>().prop_map(|c| c.to_string()),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn spiffe_id_never_panics_and_round_trips(s in id_like()) {
        if let Ok(id) = SpiffeId::parse(&s) {
            prop_assert_eq!(id.to_string(), s.clone());
            prop_assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id.clone()));
            prop_assert!(s.len() <= crate::spiffe_id::MAX_ID_LEN);
            // Accepted IDs obey the character rules.
            prop_assert!(id.path().chars().all(|c| c == '/' || c.is_ascii_alphanumeric() || ".-_".contains(c)));
        }
        let _ = TrustDomain::new(&s);
    }

    #[test]
    fn arbitrary_unicode_never_panics(s in any::<String>()) {
        let _ = SpiffeId::parse(&s);
        let _ = TrustDomain::new(&s);
        let _ = Selector::parse(&s);
        let _ = crate::ttl::parse(&s);
    }

    #[test]
    fn selectors_round_trip(kind in "[a-z0-9_-]{1,10}", value in "[ -~]{1,40}") {
        match Selector::new(&kind, &value) {
            Ok(sel) => {
                let back = Selector::parse(&sel.to_string());
                prop_assert_eq!(back, Ok(sel));
            }
            // Only whitespace at either end of the value is refused for these inputs.
            Err(_) => prop_assert!(value.trim() != value),
        }
    }

    #[test]
    fn ttl_never_panics_and_formats_back(n in 1u64..(366 * 86_400)) {
        let d = std::time::Duration::from_secs(n);
        prop_assert_eq!(crate::ttl::parse(&crate::ttl::format(d)), Ok(d));
    }
}
