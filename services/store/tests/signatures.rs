//! The signatures conformance suite: a subject's signature is stored once (later
//! signers find the first one) unless replaced. SQLite always, Postgres when
//! `PATCHPORT_TEST_DATABASE_URL` is set.

mod common;

use common::backends;
use patchport_store::meta::SignatureRecord;

fn record(subject: &str, sig: &str) -> SignatureRecord {
    SignatureRecord {
        subject: subject.to_owned(),
        model_sig: sig.to_owned(),
        provenance: Some(format!("prov-{sig}")),
        key_hint: "ab".repeat(32),
        created_at: 7,
    }
}

#[tokio::test]
async fn a_signature_is_kept_once_unless_replaced() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        assert_eq!(
            s.get_signature("base:acme/l:v1").await.unwrap(),
            None,
            "{l}"
        );
        let first = record("base:acme/l:v1", "one");
        assert_eq!(s.put_signature(&first, false).await.unwrap(), first, "{l}");
        // A second signer (another replica, a backfill) gets the first signature back.
        let second = record("base:acme/l:v1", "two");
        assert_eq!(s.put_signature(&second, false).await.unwrap(), first, "{l}");
        assert_eq!(
            s.get_signature("base:acme/l:v1").await.unwrap(),
            Some(first),
            "{l}"
        );
        // A port's completion replaces what a reader may have signed meanwhile.
        assert_eq!(s.put_signature(&second, true).await.unwrap(), second, "{l}");
        let unsigned = SignatureRecord {
            provenance: None,
            ..record("patch:acme/q:1", "three")
        };
        assert_eq!(
            s.put_signature(&unsigned, false).await.unwrap(),
            unsigned,
            "{l}"
        );
    }
}
