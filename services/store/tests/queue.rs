//! The queue conformance suite: fan-out, leases, fencing, retries, affinity,
//! priorities, requests, queue positions and cancellation through the fence. Every test
//! runs against SQLite always and against Postgres when `PATCHPORT_TEST_DATABASE_URL` is
//! set (a fresh database each).

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use patchport_core::port::{METHOD_VERSION, PortDiagnostics, Refusal, RefusalKind};
use patchport_store::meta::{self, JobOutcome, Page, PortState, StoreErrorKind};

#[tokio::test]
async fn publishing_a_base_queues_a_port_for_every_patch_on_its_ancestors() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        base(s, "acme/llama", "v0", None).await;
        base(s, "acme/llama", "v1", Some("v0")).await;
        base(s, "other/model", "v1", None).await;
        patch(s, "acme/old", "1", "acme/llama", "v0", "old").await;
        for i in 0..4 {
            patch(
                s,
                &format!("acme/p{i}"),
                "1",
                "acme/llama",
                "v1",
                &format!("p{i}"),
            )
            .await;
        }
        // Two versions with identical content: two port rows, one job.
        patch(s, "acme/twin", "1", "acme/llama", "v1", "twin").await;
        patch(s, "acme/twin", "2", "acme/llama", "v1", "twin").await;
        patch(s, "other/x", "1", "other/model", "v1", "x").await;
        assert!(
            s.list_ports_onto(&name("acme/llama"), &vref("v1"), &Page::ALL)
                .await
                .unwrap()
                .items
                .len()
                == 1,
            "{l}: v0 patch caught up onto v1"
        );

        let v2 = base(s, "acme/llama", "v2", Some("v1")).await;
        let ports = s
            .list_ports_onto(&name("acme/llama"), &vref("v2"), &Page::ALL)
            .await
            .unwrap()
            .items;
        let names: Vec<String> = ports
            .iter()
            .map(|p| format!("{}:{}", p.patch_name, p.patch_version))
            .collect();
        assert_eq!(
            names,
            [
                "acme/old:1",
                "acme/p0:1",
                "acme/p1:1",
                "acme/p2:1",
                "acme/p3:1",
                "acme/twin:1",
                "acme/twin:2"
            ],
            "{l}"
        );
        let jobs: BTreeSet<i64> = ports.iter().map(|p| p.job_id.unwrap()).collect();
        assert_eq!(jobs.len(), 6, "{l}: the twins share a job");
        assert_eq!(ports[5].job_id, ports[6].job_id, "{l}");
        for p in &ports {
            assert_eq!(p.state, PortState::Queued, "{l}");
            assert_eq!(p.method_version, METHOD_VERSION, "{l}");
            let job = s.get_job(p.job_id.unwrap()).await.unwrap().unwrap();
            assert_eq!(job.target_base_digest, v2, "{l}");
            assert_eq!(job.source_base_digest, p.source_base_digest, "{l}");
            assert_eq!(
                job.job_key,
                format!(
                    "port:{}:{}:{}:{METHOD_VERSION}",
                    p.patch_digest, p.source_base_digest, v2
                ),
                "{l}"
            );
            assert_eq!(
                (job.state, job.max_attempts),
                (PortState::Queued, MAX_ATTEMPTS),
                "{l}"
            );
        }

        // Idempotent: the same publish again creates nothing.
        let before = all_events(&b).await.len();
        assert!(
            !s.insert_base_version(
                new_base("acme/llama", "v2", Some("v1"), "acme/llamav2"),
                &audit()
            )
            .await
            .unwrap()
            .1
        );
        patch(s, "acme/p0", "1", "acme/llama", "v1", "p0").await;
        assert_eq!(
            s.list_ports_onto(&name("acme/llama"), &vref("v2"), &Page::ALL)
                .await
                .unwrap()
                .items
                .len(),
            7,
            "{l}"
        );
        assert_eq!(all_events(&b).await.len(), before, "{l}");

        // Catch-up: a patch pushed onto v1 is queued onto v2 but not onto a yanked v3.
        base(s, "acme/llama", "v3", Some("v2")).await;
        s.yank_base_version(&name("acme/llama"), &vref("v3"), "bad", &audit())
            .await
            .unwrap();
        let n3 = s
            .list_ports_onto(&name("acme/llama"), &vref("v3"), &Page::ALL)
            .await
            .unwrap()
            .items
            .len();
        patch(s, "acme/late", "1", "acme/llama", "v1", "late").await;
        let onto2 = s
            .list_ports_onto(&name("acme/llama"), &vref("v2"), &Page::ALL)
            .await
            .unwrap()
            .items;
        assert_eq!(onto2.len(), 8, "{l}");
        assert_eq!(onto2[7].patch_name, name("acme/late"), "{l}");
        assert_eq!(
            s.list_ports_onto(&name("acme/llama"), &vref("v3"), &Page::ALL)
                .await
                .unwrap()
                .items
                .len(),
            n3,
            "{l}"
        );

        // The events of the v2 publish: base.published, then one port.queued per port.
        let ev = all_events(&b).await;
        let at = ev
            .iter()
            .position(|e| e.kind.as_str() == "base.published" && e.subject == "acme/llama:v2")
            .unwrap();
        let queued: Vec<&str> = ev[at + 1..at + 8]
            .iter()
            .map(|e| e.subject.as_str())
            .collect();
        assert!(
            ev[at + 1..at + 8]
                .iter()
                .all(|e| e.kind.as_str() == "port.queued"),
            "{l}"
        );
        assert_eq!(queued[0], "acme/old:1@acme/llama:v2", "{l}");
        assert!(
            ev.iter()
                .any(|e| e.kind.as_str() == "patch.pushed" && e.subject == "acme/late:1"),
            "{l}"
        );
    }
}

#[tokio::test]
async fn lease_heartbeat_complete_and_the_fence() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        base(s, "acme/llama", "v1", None).await;
        patch(s, "acme/qv", "1", "acme/llama", "v1", "qv").await;
        patch(s, "acme/qv", "2", "acme/llama", "v1", "qv").await;
        base(s, "acme/llama", "v2", Some("v1")).await;

        let leased = s.lease_job("w1", &[], LEASE).await.unwrap().unwrap();
        let job = &leased.job;
        assert_eq!(
            (job.state, job.attempts, job.fencing_token),
            (PortState::Running, 1, 1),
            "{l}"
        );
        assert_eq!(job.lease_owner.as_deref(), Some("w1"), "{l}");
        assert_eq!(leased.ports.len(), 2, "{l}");
        assert!(
            leased.ports.iter().all(|p| p.state == PortState::Running),
            "{l}"
        );
        assert!(
            s.lease_job("w2", &[], LEASE).await.unwrap().is_none(),
            "{l}: one job, leased"
        );
        assert!(
            !s.heartbeat(job.id, job.fencing_token, LEASE).await.unwrap(),
            "{l}"
        );

        // The lease expires (a tiny renewal, then the reaper); w2 takes the job over.
        s.heartbeat(job.id, job.fencing_token, Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(s.reap_expired(meta::now_millis()).await.unwrap(), 1, "{l}");
        assert_eq!(
            s.get_job(job.id).await.unwrap().unwrap().state,
            PortState::Queued,
            "{l}"
        );
        let again = lease_soon(s, "w2").await;
        assert_eq!(
            (again.job.id, again.job.fencing_token, again.job.attempts),
            (job.id, 2, 2),
            "{l}"
        );

        // The dead attempt's writes are refused.
        for err in [
            s.heartbeat(job.id, 1, LEASE).await.err(),
            s.complete_job(job.id, 1, succeeded()).await.err(),
            s.fail_job(job.id, 1, "boom", true).await.err(),
            s.release_job(job.id, 1).await.err(),
        ] {
            let err = err.expect("stale fencing token accepted");
            assert_eq!(err.kind(), StoreErrorKind::FailedPrecondition, "{l}");
            assert!(err.to_string().contains("lease lost"), "{l}: {err}");
        }

        let diagnostics = PortDiagnostics::default();
        let done = s
            .complete_job(
                job.id,
                2,
                JobOutcome::Succeeded {
                    adapter_files: vec![],
                    merged_files: vec![],
                    diagnostics: diagnostics.clone(),
                    evaluation: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            (done.state, done.lease_owner),
            (PortState::Succeeded, None),
            "{l}"
        );
        for p in s.job_ports(job.id).await.unwrap() {
            assert_eq!(p.state, PortState::Succeeded, "{l}");
            assert_eq!(p.diagnostics.as_ref(), Some(&diagnostics), "{l}");
            assert_eq!(p.attempts, 2, "{l}");
            assert!(p.finished_at.is_some(), "{l}");
        }
        // Exactly once: a second complete, even with the live token, is refused.
        assert_eq!(
            s.complete_job(job.id, 2, succeeded())
                .await
                .unwrap_err()
                .kind(),
            StoreErrorKind::FailedPrecondition
        );
        assert!(
            s.lease_job("w1", &[], LEASE).await.unwrap().is_none(),
            "{l}"
        );
        let ev = all_events(&b).await;
        let completed: Vec<&str> = ev
            .iter()
            .filter(|e| e.kind.as_str() == "port.completed")
            .map(|e| e.subject.as_str())
            .collect();
        assert_eq!(
            completed,
            ["acme/qv:1@acme/llama:v2", "acme/qv:2@acme/llama:v2"],
            "{l}"
        );

        // A third version with the same content shares the finished result.
        patch(s, "acme/qv", "3", "acme/llama", "v1", "qv").await;
        let p3 = s
            .get_port(
                &name("acme/qv"),
                &vref("3"),
                &name("acme/llama"),
                &vref("v2"),
                METHOD_VERSION,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (p3.state, p3.job_id),
            (PortState::Succeeded, Some(job.id)),
            "{l}"
        );
    }
}

#[tokio::test]
async fn retries_back_off_until_max_attempts_then_fail_and_incompatible_is_final() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        base(s, "acme/llama", "v1", None).await;
        patch(s, "acme/flaky", "1", "acme/llama", "v1", "flaky").await;
        base(s, "acme/llama", "v2", Some("v1")).await;
        for attempt in 1..=MAX_ATTEMPTS {
            let j = lease_soon(s, "w").await;
            assert_eq!(j.job.attempts, attempt, "{l}");
            let before = meta::now_millis();
            let after = s
                .fail_job(j.job.id, j.job.fencing_token, "cuda oom", true)
                .await
                .unwrap();
            assert_eq!(after.last_error.as_deref(), Some("cuda oom"), "{l}");
            if attempt < MAX_ATTEMPTS {
                assert_eq!(after.state, PortState::Queued, "{l}");
                let ceiling = policy().ceiling_millis(attempt);
                assert!(
                    after.run_after >= before && after.run_after <= meta::now_millis() + ceiling,
                    "{l}"
                );
                assert_eq!(
                    s.job_ports(j.job.id).await.unwrap()[0].state,
                    PortState::Queued,
                    "{l}"
                );
            } else {
                assert_eq!(after.state, PortState::Failed, "{l}");
                let port = &s.job_ports(j.job.id).await.unwrap()[0];
                assert_eq!(
                    (port.state, port.error.as_deref()),
                    (PortState::Failed, Some("cuda oom")),
                    "{l}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(s.lease_job("w", &[], LEASE).await.unwrap().is_none(), "{l}");
        let ev = all_events(&b).await;
        let kinds: Vec<&str> = ev
            .iter()
            .filter(|e| e.kind.as_str().starts_with("port."))
            .map(|e| e.kind.as_str())
            .collect();
        assert_eq!(
            kinds,
            [
                "port.queued",
                "port.started",
                "port.queued",
                "port.started",
                "port.queued",
                "port.started",
                "port.failed"
            ],
            "{l}"
        );

        // A non-retryable error fails at once; a refusal is final.
        patch(s, "acme/bad", "1", "acme/llama", "v1", "bad").await;
        let j = lease_soon(s, "w").await;
        assert_eq!(
            s.fail_job(j.job.id, j.job.fencing_token, "corrupt blob", false)
                .await
                .unwrap()
                .state,
            PortState::Failed,
            "{l}"
        );
        patch(s, "acme/dora", "1", "acme/llama", "v1", "dora").await;
        let j = lease_soon(s, "w").await;
        let refusals = vec![Refusal::new(
            RefusalKind::Dora,
            "dora",
            "DoRA cannot be ported".to_owned(),
        )];
        let done = s
            .complete_job(
                j.job.id,
                j.job.fencing_token,
                JobOutcome::Incompatible {
                    refusals: refusals.clone(),
                },
            )
            .await
            .unwrap();
        assert_eq!(
            (done.state, done.attempts),
            (PortState::Incompatible, 1),
            "{l}"
        );
        let port = &s.job_ports(j.job.id).await.unwrap()[0];
        assert_eq!(
            (port.state, &port.refusals),
            (PortState::Incompatible, &refusals),
            "{l}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(s.lease_job("w", &[], LEASE).await.unwrap().is_none(), "{l}");

        // Reaping out of attempts fails the job; release does not spend an attempt.
        patch(s, "acme/slow", "1", "acme/llama", "v1", "slow").await;
        let j = lease_soon(s, "w").await;
        let released = s.release_job(j.job.id, j.job.fencing_token).await.unwrap();
        assert_eq!(
            (released.state, released.attempts),
            (PortState::Queued, 0),
            "{l}"
        );
        for _ in 0..MAX_ATTEMPTS {
            let j = lease_soon(s, "w").await;
            s.heartbeat(j.job.id, j.job.fencing_token, Duration::ZERO)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert_eq!(s.reap_expired(meta::now_millis()).await.unwrap(), 1, "{l}");
        }
        let job = s.get_job(j.job.id).await.unwrap().unwrap();
        assert_eq!(
            (job.state, job.attempts),
            (PortState::Failed, MAX_ATTEMPTS),
            "{l}"
        );
        assert_eq!(job.last_error.as_deref(), Some("lease expired"), "{l}");
    }
}

#[tokio::test]
async fn priority_then_affinity_to_the_loaded_base_then_age() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        base(s, "acme/a", "v1", None).await;
        base(s, "acme/b", "v1", None).await;
        for i in 0..3 {
            patch(
                s,
                &format!("acme/pa{i}"),
                "1",
                "acme/a",
                "v1",
                &format!("a{i}"),
            )
            .await;
        }
        patch(s, "acme/pb", "1", "acme/b", "v1", "b").await;
        base(s, "acme/a", "v2", Some("v1")).await;
        let b2 = base(s, "acme/b", "v2", Some("v1")).await;
        let job_of = |ports: Vec<meta::PortRecord>, n: &str| {
            ports
                .into_iter()
                .find(|p| p.patch_name == name(n))
                .unwrap()
                .job_id
                .unwrap()
        };
        let a_ports = s
            .list_ports_onto(&name("acme/a"), &vref("v2"), &Page::ALL)
            .await
            .unwrap()
            .items;
        let (pa0, pa1, pa2) = (
            job_of(a_ports.clone(), "acme/pa0"),
            job_of(a_ports.clone(), "acme/pa1"),
            job_of(a_ports, "acme/pa2"),
        );
        let pb = job_of(
            s.list_ports_onto(&name("acme/b"), &vref("v2"), &Page::ALL)
                .await
                .unwrap()
                .items,
            "acme/pb",
        );
        s.set_job_priority(pa2, 10).await.unwrap();
        s.set_job_priority(pa1, 5).await.unwrap();

        // Higher priorities first; within a priority a worker holding b:v2 gets b's job
        // before older ones.
        let mut order = Vec::new();
        while let Some(j) = s.lease_job("w", &[b2], LEASE).await.unwrap() {
            order.push(j.job.id);
        }
        assert_eq!(order, [pa2, pa1, pb, pa0], "{l}");
        assert_eq!(
            s.set_job_priority(-1, 1).await.unwrap_err().kind(),
            StoreErrorKind::NotFound
        );
    }
}

#[tokio::test]
async fn a_batch_lease_takes_jobs_in_order_and_a_batch_completion_refuses_only_stale_fences() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        base(s, "acme/llama", "v1", None).await;
        for i in 0..5 {
            patch(
                s,
                &format!("acme/p{i}"),
                "1",
                "acme/llama",
                "v1",
                &format!("p{i}"),
            )
            .await;
        }
        base(s, "acme/llama", "v2", Some("v1")).await;
        let ports = s
            .list_ports_onto(&name("acme/llama"), &vref("v2"), &Page::ALL)
            .await
            .unwrap()
            .items;
        let mut fifo: Vec<i64> = ports.iter().filter_map(|p| p.job_id).collect();
        fifo.sort_unstable();
        s.set_job_priority(fifo[4], 10).await.unwrap();

        assert!(
            s.lease_jobs("w1", &[], LEASE, 0).await.unwrap().is_empty(),
            "{l}"
        );
        let first = s.lease_jobs("w1", &[], LEASE, 3).await.unwrap();
        let ids: Vec<i64> = first.iter().map(|j| j.job.id).collect();
        assert_eq!(ids, [fifo[4], fifo[0], fifo[1]], "{l}: priority, then age");
        for j in &first {
            assert_eq!(
                (j.job.state, j.job.attempts, j.job.fencing_token),
                (PortState::Running, 1, 1),
                "{l}"
            );
            assert_eq!(j.job.lease_owner.as_deref(), Some("w1"), "{l}");
            assert!(j.ports.iter().all(|p| p.state == PortState::Running), "{l}");
        }
        let rest = s.lease_jobs("w2", &[], LEASE, 64).await.unwrap();
        let ids: Vec<i64> = rest.iter().map(|j| j.job.id).collect();
        assert_eq!(ids, [fifo[2], fifo[3]], "{l}: what is left, once");
        assert!(
            s.lease_jobs("w3", &[], LEASE, 8).await.unwrap().is_empty(),
            "{l}"
        );

        // One completion of the batch has a stale token: it alone is refused, and its
        // job stays as it was.
        let results = s
            .complete_jobs(vec![
                (first[0].job.id, 1, succeeded()),
                (first[1].job.id, 7, succeeded()),
                (
                    first[2].job.id,
                    1,
                    JobOutcome::Incompatible {
                        refusals: vec![Refusal::new(
                            RefusalKind::Dora,
                            "dora",
                            "DoRA cannot be ported".to_owned(),
                        )],
                    },
                ),
            ])
            .await
            .unwrap();
        assert_eq!(results.len(), 3, "{l}");
        // A recorded completion answers what it changed: no read after it is needed.
        let done = results[0].as_ref().unwrap();
        assert_eq!(done.job.state, PortState::Succeeded, "{l}");
        assert_eq!(done.lease_owner, "w1", "{l}");
        assert!(
            !done.ports.is_empty()
                && done.ports.iter().all(|p| p.job_id == Some(first[0].job.id)
                    && p.state == PortState::Succeeded
                    && p.started_at.is_some()),
            "{l}: {:?}",
            done.ports
        );
        let stale = results[1].as_ref().unwrap_err();
        assert_eq!(stale.kind(), StoreErrorKind::FailedPrecondition, "{l}");
        assert!(stale.to_string().contains("lease lost"), "{l}: {stale}");
        assert_eq!(
            results[2].as_ref().unwrap().job.state,
            PortState::Incompatible,
            "{l}"
        );
        let untouched = s.get_job(first[1].job.id).await.unwrap().unwrap();
        assert_eq!(
            (untouched.state, untouched.lease_owner.as_deref()),
            (PortState::Running, Some("w1")),
            "{l}"
        );
        assert!(
            s.job_ports(first[1].job.id)
                .await
                .unwrap()
                .iter()
                .all(|p| p.state == PortState::Running && p.diagnostics.is_none()),
            "{l}"
        );
        // Its live token still completes it, and exactly once.
        assert!(
            s.complete_job(first[1].job.id, 1, succeeded())
                .await
                .is_ok(),
            "{l}"
        );
        let again = s
            .complete_jobs(vec![(first[0].job.id, 1, succeeded())])
            .await
            .unwrap();
        assert_eq!(
            again[0].as_ref().unwrap_err().kind(),
            StoreErrorKind::FailedPrecondition,
            "{l}"
        );
        let completed = all_events(&b)
            .await
            .iter()
            .filter(|e| e.kind.as_str() == "port.completed")
            .count();
        assert_eq!(
            completed, 3,
            "{l}: one port.completed per recorded completion"
        );
    }
}

#[tokio::test]
async fn concurrent_workers_never_lease_the_same_job() {
    const JOBS: usize = 24;
    for b in backends().await {
        let s = b.store.clone();
        base(&*s, "acme/llama", "v1", None).await;
        for i in 0..JOBS {
            patch(
                &*s,
                &format!("acme/p{i}"),
                "1",
                "acme/llama",
                "v1",
                &format!("p{i}"),
            )
            .await;
        }
        base(&*s, "acme/llama", "v2", Some("v1")).await;
        let mut tasks = Vec::new();
        for w in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                // Half the workers lease in batches of 3.
                loop {
                    let batch = s
                        .lease_jobs(&format!("w{w}"), &[], LEASE, 1 + 2 * (w % 2))
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        break;
                    }
                    got.extend(batch.iter().map(|j| j.job.id));
                    tokio::task::yield_now().await;
                }
                got
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let distinct: BTreeSet<i64> = all.iter().copied().collect();
        assert_eq!((all.len(), distinct.len()), (JOBS, JOBS), "{}", b.label);
    }
}

#[tokio::test]
async fn cancelling_ports_cancels_or_stops_their_job() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        base(s, "acme/llama", "v1", None).await;
        patch(s, "acme/q", "1", "acme/llama", "v1", "q").await;
        patch(s, "acme/r", "1", "acme/llama", "v1", "r").await;
        patch(s, "acme/r", "2", "acme/llama", "v1", "r").await;
        base(s, "acme/llama", "v2", Some("v1")).await;
        let cancel = |n: &'static str, v: &'static str| async move {
            s.cancel_port(
                &name(n),
                &vref(v),
                &name("acme/llama"),
                &vref("v2"),
                METHOD_VERSION,
                &audit(),
            )
            .await
        };
        // A queued job with its only port cancelled is cancelled.
        let q = cancel("acme/q", "1").await.unwrap();
        assert_eq!(q.state, PortState::Cancelled, "{l}");
        assert_eq!(
            s.get_job(q.job_id.unwrap()).await.unwrap().unwrap().state,
            PortState::Cancelled,
            "{l}"
        );
        assert_eq!(
            cancel("acme/q", "1").await.unwrap_err().kind(),
            StoreErrorKind::FailedPrecondition
        );
        // A running job keeps going while one of its ports still wants it; then it is
        // cancelled through its fence: the heartbeat says so, and nothing the worker sends
        // later is accepted.
        let j = s.lease_job("w", &[], LEASE).await.unwrap().unwrap();
        cancel("acme/r", "1").await.unwrap();
        assert!(
            !s.heartbeat(j.job.id, j.job.fencing_token, LEASE)
                .await
                .unwrap(),
            "{l}"
        );
        cancel("acme/r", "2").await.unwrap();
        assert!(
            s.heartbeat(j.job.id, j.job.fencing_token, LEASE)
                .await
                .unwrap(),
            "{l}"
        );
        assert_eq!(
            s.get_job(j.job.id).await.unwrap().unwrap().state,
            PortState::Cancelled,
            "{l}"
        );
        for late in [
            s.complete_job(j.job.id, j.job.fencing_token, succeeded())
                .await
                .map(|_| ()),
            s.fail_job(j.job.id, j.job.fencing_token, "late", true)
                .await
                .map(|_| ()),
            s.release_job(j.job.id, j.job.fencing_token)
                .await
                .map(|_| ()),
        ] {
            assert_eq!(
                late.unwrap_err().kind(),
                StoreErrorKind::FailedPrecondition,
                "{l}"
            );
        }
        for (n, v) in [("acme/r", "1"), ("acme/r", "2")] {
            let p = s
                .get_port(
                    &name(n),
                    &vref(v),
                    &name("acme/llama"),
                    &vref("v2"),
                    METHOD_VERSION,
                )
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                p.state,
                PortState::Cancelled,
                "{l}: a late complete left {n}:{v} alone"
            );
        }
        assert!(s.lease_job("w", &[], LEASE).await.unwrap().is_none(), "{l}");
    }
}

/// Two transactions opened by hand: the one that takes its id first commits last. A plain
/// `id > cursor` reader skips it; the `(xid, id)` below `xmin` reader does not.
#[tokio::test]
async fn jobs_are_counted_by_state_for_the_queue_depth_gauge() {
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        let counts = |c: Vec<(PortState, u64)>| -> BTreeMap<&'static str, u64> {
            c.into_iter().map(|(s, n)| (s.as_str(), n)).collect()
        };
        // Every state is reported, zeros included, in lifecycle order.
        let empty = s.count_jobs_by_state().await.unwrap();
        assert_eq!(
            empty.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            PortState::ALL.to_vec(),
            "{l}"
        );
        assert!(empty.iter().all(|(_, n)| *n == 0), "{l}: {empty:?}");

        base(s, "acme/llama", "v1", None).await;
        for p in ["a", "b", "c"] {
            patch(s, &format!("acme/{p}"), "1", "acme/llama", "v1", p).await;
        }
        base(s, "acme/llama", "v2", Some("v1")).await;
        let c = counts(s.count_jobs_by_state().await.unwrap());
        assert_eq!(c["queued"], 3, "{l}: {c:?}");
        assert_eq!(c["running"], 0, "{l}: {c:?}");

        let j = s.lease_job("w", &[], LEASE).await.unwrap().unwrap();
        let c = counts(s.count_jobs_by_state().await.unwrap());
        assert_eq!((c["queued"], c["running"]), (2, 1), "{l}: {c:?}");

        s.complete_job(j.job.id, j.job.fencing_token, succeeded())
            .await
            .unwrap();
        let c = counts(s.count_jobs_by_state().await.unwrap());
        assert_eq!(
            (c["queued"], c["running"], c["succeeded"]),
            (2, 0, 1),
            "{l}: {c:?}"
        );
        assert_eq!(c.values().sum::<u64>(), 3, "{l}: {c:?}");
    }
}

#[tokio::test]
async fn request_port_queues_a_job_once_and_answers_at_once() {
    use patchport_core::port::PortOrigin;
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        base(s, "acme/llama", "v1", None).await;
        patch(s, "acme/q", "1", "acme/llama", "v1", "q").await;
        // A base pushed without a parent: no fan-out, only an explicit request ports.
        base(s, "acme/llama", "v9", None).await;
        base(s, "acme/other", "v1", None).await;
        let request = |bn: &'static str, bv: &'static str, p: u16| async move {
            s.request_port(
                &name("acme/q"),
                &vref("1"),
                &name(bn),
                &vref(bv),
                PortOrigin::Requested(p),
                &audit(),
            )
            .await
        };
        let port = request("acme/llama", "v9", 3).await.unwrap();
        assert_eq!(port.state, PortState::Queued, "{l}");
        assert_eq!(port.queue_position, Some(1), "{l}");
        let job = s.get_job(port.job_id.unwrap()).await.unwrap().unwrap();
        assert_eq!(job.priority, PortOrigin::Requested(3).job_priority(), "{l}");
        // Asking again returns the same port and queues nothing new.
        let again = request("acme/llama", "v9", 0).await.unwrap();
        assert_eq!((again.id, again.job_id), (port.id, port.job_id), "{l}");
        let queued: Vec<_> = all_events(&b)
            .await
            .into_iter()
            .filter(|e| e.kind.as_str() == "port.queued")
            .collect();
        assert_eq!(queued.len(), 1, "{l}");
        let payload: serde_json::Value =
            serde_json::from_str(queued[0].payload_json.as_deref().unwrap()).unwrap();
        assert_eq!(payload["state"], "queued", "{l}");
        assert_eq!(payload["patch"], "acme/q:1", "{l}");
        assert_eq!(payload["base_digest"], port.base_digest.to_string(), "{l}");
        // The patch's own base, another base name and unknown versions are refused.
        assert_eq!(
            request("acme/llama", "v1", 0).await.unwrap_err().kind(),
            StoreErrorKind::FailedPrecondition,
            "{l}"
        );
        assert_eq!(
            request("acme/other", "v1", 0).await.unwrap_err().kind(),
            StoreErrorKind::FailedPrecondition,
            "{l}"
        );
        assert_eq!(
            request("acme/llama", "v404", 0).await.unwrap_err().kind(),
            StoreErrorKind::NotFound,
            "{l}"
        );
        // A cancelled port asked for again is queued again, on the same row.
        s.cancel_port(
            &name("acme/q"),
            &vref("1"),
            &name("acme/llama"),
            &vref("v9"),
            METHOD_VERSION,
            &audit(),
        )
        .await
        .unwrap();
        let back = request("acme/llama", "v9", 0).await.unwrap();
        assert_eq!((back.id, back.state), (port.id, PortState::Queued), "{l}");
        let j = lease_soon(s, "w").await;
        assert_eq!(j.job.id, port.job_id.unwrap(), "{l}");
        s.complete_job(j.job.id, j.job.fencing_token, succeeded())
            .await
            .unwrap();
        let done = request("acme/llama", "v9", 0).await.unwrap();
        assert_eq!(
            done.state,
            PortState::Succeeded,
            "{l}: a done port is returned as it is"
        );
        let completed: Vec<_> = all_events(&b)
            .await
            .into_iter()
            .filter(|e| e.kind.as_str() == "port.completed")
            .collect();
        assert_eq!(completed.len(), 1, "{l}");
        let payload: serde_json::Value =
            serde_json::from_str(completed[0].payload_json.as_deref().unwrap()).unwrap();
        assert_eq!(payload["state"], "succeeded", "{l}");
        assert_eq!(payload["detail"], "succeeded", "{l}");
        assert_eq!(payload["risk"], 0.0, "{l}");
        assert_eq!(payload["refusal_kinds"], serde_json::json!([]), "{l}");
        assert_eq!(
            payload["patch_digest"],
            done.patch_digest.to_string(),
            "{l}"
        );
    }
}

#[tokio::test]
async fn requests_before_catch_up_before_fan_out_first_in_first_out_within() {
    use patchport_core::port::PortOrigin;
    for b in backends().await {
        let s = b.store.as_ref();
        let l = b.label;
        base(s, "acme/llama", "v1", None).await;
        for i in 0..3 {
            patch(
                s,
                &format!("acme/f{i}"),
                "1",
                "acme/llama",
                "v1",
                &format!("f{i}"),
            )
            .await;
        }
        base(s, "acme/llama", "v2", Some("v1")).await;
        // Pushed after v2: catch-up ports.
        patch(s, "acme/c0", "1", "acme/llama", "v1", "c0").await;
        patch(s, "acme/c1", "1", "acme/llama", "v1", "c1").await;
        // Explicit requests onto a base outside the lineage, and one that raises a
        // fan-out port already queued.
        base(s, "acme/llama", "v9", None).await;
        let req = |n: &'static str, bv: &'static str, p: u16| async move {
            s.request_port(
                &name(n),
                &vref("1"),
                &name("acme/llama"),
                &vref(bv),
                PortOrigin::Requested(p),
                &audit(),
            )
            .await
            .unwrap()
        };
        let r0 = req("acme/f0", "v9", 0).await;
        let r1 = req("acme/f1", "v9", 0).await;
        let raised = req("acme/f2", "v2", 5).await;
        let ports = s
            .list_ports_onto(&name("acme/llama"), &vref("v2"), &Page::ALL)
            .await
            .unwrap()
            .items;
        let job = |n: &str| {
            ports
                .iter()
                .find(|p| p.patch_name == name(n))
                .map(|p| (p.job_id.unwrap(), p.queue_position))
                .unwrap()
        };
        let expected = [
            raised.job_id.unwrap(),
            r0.job_id.unwrap(),
            r1.job_id.unwrap(),
            job("acme/c0").0,
            job("acme/c1").0,
            job("acme/f0").0,
            job("acme/f1").0,
        ];
        // Compat shows each queued port's place before anything is leased.
        assert_eq!(job("acme/c0").1, Some(4), "{l}");
        assert_eq!(job("acme/f1").1, Some(7), "{l}");
        assert_eq!(raised.queue_position, Some(1), "{l}");
        let mut order = Vec::new();
        while let Some(j) = s.lease_job("w", &[], LEASE).await.unwrap() {
            order.push(j.job.id);
        }
        assert_eq!(order, expected, "{l}");
        let leased = s
            .list_ports_onto(&name("acme/llama"), &vref("v2"), &Page::ALL)
            .await
            .unwrap()
            .items;
        assert!(
            leased.iter().all(|p| p.queue_position.is_none()),
            "{l}: running ports have no place"
        );
    }
}
