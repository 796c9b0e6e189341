//! The outbox conformance suite: events appear once, in order, resumable from any
//! cursor while writers commit concurrently; a late commit is never skipped; cursors are
//! checked; commits wake subscribers. SQLite always, Postgres when
//! `PATCHPORT_TEST_DATABASE_URL` is set.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

use patchport_store::meta::{EventCursor, EventRecord, StoreErrorKind};

#[tokio::test]
async fn events_appear_once_in_order_and_resume_from_any_cursor() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        let head = s.head_cursor().await.unwrap();
        let (none, same) = s.read_events(None, 10).await.unwrap();
        assert!(none.is_empty(), "{l}");
        assert_eq!(same, head, "{l}");
        base(s, "acme/llama", "v1", None).await;
        patch(s, "acme/qv", "1", "acme/llama", "v1", "qv").await;
        base(s, "acme/llama", "v2", Some("v1")).await;
        let j = s.lease_job("w", &[], LEASE).await.unwrap().unwrap();
        s.complete_job(j.job.id, j.job.fencing_token, succeeded())
            .await
            .unwrap();

        let all = all_events(&b).await;
        let got: Vec<(&str, &str)> = all
            .iter()
            .map(|e| (e.kind.as_str(), e.subject.as_str()))
            .collect();
        let port = "acme/qv:1@acme/llama:v2";
        assert_eq!(
            got,
            [
                ("base.published", "acme/llama:v1"),
                ("patch.pushed", "acme/qv:1"),
                ("base.published", "acme/llama:v2"),
                ("port.queued", port),
                ("port.started", port),
                ("port.completed", port),
            ],
            "{l}"
        );
        assert_eq!(all[5].detail.as_deref(), Some("succeeded"), "{l}");
        assert_eq!(all[4].job_id, Some(j.job.id), "{l}");
        // From the head taken first, everything; resuming one at a time, the same.
        settle(&b).await;
        let (from_head, _) = s.read_events(Some(&head), 100).await.unwrap();
        assert_eq!(from_head, all, "{l}");
        let mut cursor = head;
        let mut one_by_one = Vec::new();
        loop {
            let (page, next) = s.read_events(Some(&cursor), 1).await.unwrap();
            let Some(e) = page.into_iter().next() else {
                break;
            };
            assert_eq!(e.cursor, next, "{l}");
            one_by_one.push(e);
            cursor = next;
        }
        assert_eq!(one_by_one, all, "{l}");
        let bad = s
            .read_events(Some(&"nonsense".parse().unwrap()), 1)
            .await
            .unwrap_err();
        assert_eq!(bad.kind(), StoreErrorKind::InvalidArgument, "{l}");
    }
}

#[tokio::test]
async fn a_resuming_reader_misses_nothing_while_writers_commit_concurrently() {
    for b in backends().await {
        let s = b.store.clone();
        let l = b.label;
        base(&*s, "acme/llama", "v1", None).await;
        base(&*s, "acme/llama", "v2", Some("v1")).await;
        settle(&b).await;
        let start = s.head_cursor().await.unwrap();
        let mut writers = Vec::new();
        for w in 0..4 {
            let s = s.clone();
            writers.push(tokio::spawn(async move {
                for i in 0..10 {
                    patch(
                        &*s,
                        &format!("acme/w{w}p{i}"),
                        "1",
                        "acme/llama",
                        "v1",
                        &format!("{w}/{i}"),
                    )
                    .await;
                }
            }));
        }
        // The reader resumes from its last cursor with small pages while writers commit.
        let mut seen: BTreeMap<i64, EventRecord> = BTreeMap::new();
        let mut cursor = start.clone();
        let mut done = false;
        loop {
            let (page, next) = s.read_events(Some(&cursor), 3).await.unwrap();
            for e in page {
                seen.insert(e.id, e);
            }
            cursor = next;
            if done {
                settle(&b).await;
                let (rest, _) = s.read_events(Some(&cursor), 1_000).await.unwrap();
                for e in rest {
                    seen.insert(e.id, e);
                }
                break;
            }
            done = writers.iter().all(|w| w.is_finished());
            tokio::task::yield_now().await;
        }
        for w in writers {
            w.await.unwrap();
        }
        settle(&b).await;
        let (expected, _) = s.read_events(Some(&start), 10_000).await.unwrap();
        assert_eq!(expected.len(), 80, "{l}: 40 patch.pushed + 40 port.queued");
        let ids: Vec<i64> = seen.keys().copied().collect();
        let mut want: Vec<i64> = expected.iter().map(|e| e.id).collect();
        want.sort_unstable();
        assert_eq!(ids, want, "{l}");
    }
}

#[tokio::test]
#[ignore = "needs PATCHPORT_TEST_DATABASE_URL; scripts/test.sh runs it when it is set"]
async fn postgres_a_transaction_that_commits_late_is_not_skipped() {
    let backends = backends().await;
    assert!(
        backends.iter().any(|b| b.pg.is_some()),
        "this test needs PATCHPORT_TEST_DATABASE_URL (a Postgres server)"
    );
    for b in backends {
        let Some(pool) = &b.pg else { continue };
        let s = b.store.as_ref();
        let insert = "INSERT INTO events (kind, subject, created_at) VALUES ('base.published', $1, 0) RETURNING id";
        let start = s.head_cursor().await.unwrap();
        let mut plain_cursor: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM events")
            .fetch_one(pool)
            .await
            .unwrap();

        let mut early = pool.begin().await.unwrap();
        let early_id: i64 = sqlx::query_scalar(insert)
            .bind("early")
            .fetch_one(&mut *early)
            .await
            .unwrap();
        let mut late = pool.begin().await.unwrap();
        let late_id: i64 = sqlx::query_scalar(insert)
            .bind("late")
            .fetch_one(&mut *late)
            .await
            .unwrap();
        assert!(early_id < late_id);
        late.commit().await.unwrap();

        // While `early` is open: the plain reader sees `late` and moves past `early`'s id.
        let plain: Vec<i64> = sqlx::query_scalar("SELECT id FROM events WHERE id > $1 ORDER BY id")
            .bind(plain_cursor)
            .fetch_all(pool)
            .await
            .unwrap();
        assert_eq!(plain, [late_id]);
        plain_cursor = late_id;
        let (page, cursor) = s.read_events(Some(&start), 100).await.unwrap();
        assert!(
            page.is_empty(),
            "held back below the open transaction: {page:?}"
        );

        early.commit().await.unwrap();
        let plain_after: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM events WHERE id > $1 ORDER BY id")
                .bind(plain_cursor)
                .fetch_all(pool)
                .await
                .unwrap();
        assert!(
            plain_after.is_empty(),
            "the plain id cursor skipped the late commit"
        );
        settle(&b).await;
        let (page, _) = s.read_events(Some(&cursor), 100).await.unwrap();
        let subjects: Vec<&str> = page.iter().map(|e| e.subject.as_str()).collect();
        assert_eq!(subjects, ["early", "late"]);
    }
}

#[tokio::test]
async fn cursors_zero_replays_malformed_is_invalid_and_past_the_end_is_out_of_range() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        base(s, "acme/llama", "v1", None).await;
        patch(s, "acme/q", "1", "acme/llama", "v1", "q").await;
        settle(&b).await;
        let zero: EventCursor = "0".parse().unwrap();
        let (all, head) = s.read_events(Some(&zero), 100).await.unwrap();
        assert_eq!(all.len(), 2, "{l}");
        assert_eq!(all[0].kind.as_str(), "base.published", "{l}");
        assert_eq!(head, s.head_cursor().await.unwrap(), "{l}");
        // At the head: nothing yet, and no error.
        assert!(
            s.read_events(Some(&head), 100).await.unwrap().0.is_empty(),
            "{l}"
        );
        for bad in ["x", "sq:", "pg:1", "sq:-x", "pg:a:b", "origin:1"] {
            let e = s
                .read_events(Some(&bad.parse().unwrap()), 10)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), StoreErrorKind::InvalidArgument, "{l}: {bad}");
        }
        // A cursor from a longer log (another or a restored database).
        let ahead: EventCursor = match l {
            "sqlite" => "sq:1000".parse().unwrap(),
            _ => {
                let h = head.to_string();
                let (_, id) = h.rsplit_once(':').unwrap();
                let x = h.split(':').nth(1).unwrap();
                format!("pg:{x}:{}", id.parse::<i64>().unwrap() + 1000)
                    .parse()
                    .unwrap()
            }
        };
        let e = s.read_events(Some(&ahead), 10).await.unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::OutOfRange, "{l}");
        assert!(e.to_string().contains("past the end"), "{l}: {e}");
    }
}

#[tokio::test]
async fn committed_events_wake_subscribers() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        let mut wake = s.event_wakeups();
        // The Postgres listener starts with the first subscriber: let it connect.
        tokio::time::sleep(Duration::from_millis(300)).await;
        wake.borrow_and_update();
        base(s, "acme/llama", "v1", None).await;
        tokio::time::timeout(Duration::from_secs(10), wake.changed())
            .await
            .unwrap_or_else(|_| panic!("{l}: no wake-up after a commit"))
            .unwrap();
        // A failed push appends nothing and wakes nobody (SQLite: rolled back in the hook).
        wake.borrow_and_update();
        s.insert_patch_version(
            new_patch("acme/q", "1", "acme/llama", "v404", "q"),
            &audit(),
        )
        .await
        .unwrap_err();
        if l == "sqlite" {
            assert!(
                !wake.has_changed().unwrap(),
                "{l}: a rollback woke subscribers"
            );
        }
    }
}
