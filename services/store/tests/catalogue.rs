//! The catalogue conformance suite (versions, lineage, files, tensor indexes): every test runs against SQLite always and
//! against Postgres when `PATCHPORT_TEST_DATABASE_URL` is set (a fresh database each).

mod common;

use common::{audit, backends, name, new_base, new_patch, ver, vref};

use patchport_core::layout::TensorRecord;
use patchport_core::{Digest, VersionRef};
use patchport_store::meta::{BlobIndex, ListFilter, StoreErrorKind, VersionState};

#[tokio::test]
async fn base_versions_insert_get_list_and_lineage() {
    for b in backends().await {
        let s = &b.store;
        let (v1, created) = s
            .insert_base_version(new_base("acme/llama", "v1", None, "a"), &audit())
            .await
            .unwrap();
        assert!(created, "{}", b.label);
        assert_eq!(v1.parent, None);
        assert_eq!(v1.files.len(), 2);
        assert_eq!(v1.total_size, 3);
        let (v2, _) = s
            .insert_base_version(new_base("acme/llama", "v2", Some("v1"), "b"), &audit())
            .await
            .unwrap();
        assert_eq!(v2.parent, Some((ver("v1"), v1.digest)));
        // By digest, too.
        let by_digest = s
            .get_base_version(&name("acme/llama"), &VersionRef::Digest(v2.digest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(by_digest, v2);
        // A parent may be named by digest.
        let (v3, _) = s
            .insert_base_version(
                new_base("acme/llama", "v3", Some(&v2.digest.to_string()), "c"),
                &audit(),
            )
            .await
            .unwrap();
        assert_eq!(v3.parent.unwrap().0, ver("v2"));
        s.insert_base_version(new_base("acme/llama-2", "v1", None, "d"), &audit())
            .await
            .unwrap();
        s.insert_base_version(new_base("other/llama", "v1", None, "e"), &audit())
            .await
            .unwrap();
        let list = |prefix: &str| {
            let f = ListFilter {
                prefix: prefix.to_owned(),
                ..ListFilter::default()
            };
            let s = s.clone();
            async move {
                s.list_base_versions(&f)
                    .await
                    .unwrap()
                    .items
                    .iter()
                    .map(|r| format!("{}:{}", r.name, r.version))
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            list("acme/llama").await,
            ["acme/llama:v1", "acme/llama:v2", "acme/llama:v3"]
        );
        assert_eq!(list("acme").await.len(), 4, "{}", b.label);
        assert_eq!(list("").await.len(), 5);
        // `_` is not a wildcard.
        assert!(list("acm_").await.is_empty());
    }
}

#[tokio::test]
async fn versions_are_immutable_and_a_same_content_push_is_a_no_op() {
    for b in backends().await {
        let s = &b.store;
        let (first, _) = s
            .insert_base_version(new_base("acme/llama", "v1", None, "a"), &audit())
            .await
            .unwrap();
        let (again, created) = s
            .insert_base_version(new_base("acme/llama", "v1", None, "a"), &audit())
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(again, first);
        let err = s
            .insert_base_version(new_base("acme/llama", "v1", None, "other"), &audit())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::AlreadyExists, "{}", b.label);
        assert!(err.to_string().contains("acme/llama:v1"));
        let after = s
            .get_base_version(&name("acme/llama"), &vref("v1"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after, first);
        // Unknown parent: NotFound, and nothing inserted.
        let err = s
            .insert_base_version(new_base("acme/llama", "v9", Some("v8"), "z"), &audit())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::NotFound);
        assert!(
            s.get_base_version(&name("acme/llama"), &vref("v9"))
                .await
                .unwrap()
                .is_none()
        );
    }
}

#[tokio::test]
async fn concurrent_inserts_of_one_version_agree() {
    for b in backends().await {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let s = b.store.clone();
            tasks.push(tokio::spawn(async move {
                s.insert_base_version(new_base("acme/llama", "v1", None, "a"), &audit())
                    .await
            }));
        }
        let mut created = 0;
        for t in tasks {
            let (_, c) = t.await.unwrap().unwrap();
            created += usize::from(c);
        }
        assert_eq!(created, 1, "{}", b.label);
    }
}

#[tokio::test]
async fn patch_versions_pin_their_base() {
    for b in backends().await {
        let s = &b.store;
        let (base, _) = s
            .insert_base_version(new_base("acme/llama", "v1", None, "a"), &audit())
            .await
            .unwrap();
        let (p, created) = s
            .insert_patch_version(new_patch("acme/qv", "1", "acme/llama", "v1", "p"), &audit())
            .await
            .unwrap();
        assert!(created);
        assert_eq!(p.base_digest, base.digest);
        assert_eq!(p.base_version, ver("v1"));
        let err = s
            .insert_patch_version(new_patch("acme/qv", "2", "acme/llama", "v7", "p"), &audit())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::NotFound, "{}", b.label);
        let err = s
            .insert_patch_version(
                new_patch("acme/qv", "1", "acme/llama", "v1", "other"),
                &audit(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::AlreadyExists);
        let got = s
            .get_patch_version(&name("acme/qv"), &VersionRef::Digest(p.digest))
            .await
            .unwrap();
        assert_eq!(got, Some(p.clone()));
        let listed = s.list_patch_versions(&ListFilter::default()).await.unwrap();
        assert_eq!(listed.items, vec![p.clone()]);
        assert!(listed.next.is_none());
        // Listing by base digest: only the patches trained on that base.
        let (other, _) = s
            .insert_base_version(new_base("acme/llama", "v2", None, "b"), &audit())
            .await
            .unwrap();
        let on = |digest| ListFilter {
            on_base: Some(digest),
            ..ListFilter::default()
        };
        assert_eq!(
            s.list_patch_versions(&on(base.digest)).await.unwrap().items,
            vec![p]
        );
        assert!(
            s.list_patch_versions(&on(other.digest))
                .await
                .unwrap()
                .items
                .is_empty(),
            "{}",
            b.label
        );
    }
}

#[tokio::test]
async fn yanked_versions_leave_listings_but_stay_readable() {
    for b in backends().await {
        let s = &b.store;
        s.insert_base_version(new_base("acme/llama", "v1", None, "a"), &audit())
            .await
            .unwrap();
        let y = s
            .yank_base_version(&name("acme/llama"), &vref("v1"), "bad weights", &audit())
            .await
            .unwrap();
        assert_eq!(y.state, VersionState::Yanked);
        assert_eq!(y.yank_reason.as_deref(), Some("bad weights"));
        assert!(
            s.list_base_versions(&ListFilter::default())
                .await
                .unwrap()
                .items
                .is_empty()
        );
        let all = ListFilter {
            include_yanked: true,
            ..ListFilter::default()
        };
        assert_eq!(
            s.list_base_versions(&all).await.unwrap().items.len(),
            1,
            "{}",
            b.label
        );
        assert!(
            s.get_base_version(&name("acme/llama"), &vref("v1"))
                .await
                .unwrap()
                .is_some()
        );
        let err = s
            .yank_base_version(&name("acme/llama"), &vref("v2"), "", &audit())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::NotFound);
    }
}

#[tokio::test]
async fn blob_indexes_are_stored_once() {
    for b in backends().await {
        let s = &b.store;
        let blob = Digest::of(b"blob");
        assert!(s.get_blob_index(&blob).await.unwrap().is_none());
        let ix = BlobIndex {
            json_len: 120,
            tensors: vec![TensorRecord {
                name: "model.layers.0.self_attn.q_proj.weight".into(),
                dtype: "BF16".into(),
                shape: vec![64, 64],
                begin: 128,
                end: 128 + 64 * 64 * 2,
                digest: Digest::of(b"t"),
                non_finite: 0,
            }],
        };
        s.put_blob_index(&blob, &ix).await.unwrap();
        s.put_blob_index(&blob, &ix).await.unwrap();
        assert_eq!(
            s.get_blob_index(&blob).await.unwrap(),
            Some(ix),
            "{}",
            b.label
        );
        let empty = Digest::of(b"empty");
        let none = BlobIndex {
            json_len: 2,
            tensors: vec![],
        };
        s.put_blob_index(&empty, &none).await.unwrap();
        assert_eq!(s.get_blob_index(&empty).await.unwrap(), Some(none));
    }
}
