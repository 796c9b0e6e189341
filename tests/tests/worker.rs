//! The worker side of a port: everything read through the registry's gRPC API, merged
//! tensors uploaded as blobs, the merged model described as blob ranges that compose
//! into exactly the offline `--merged` bytes.

use patchport_client::{FileSource, NoProgress};
use patchport_core::Digest;
use patchport_core::layout::DeclaredFile;
use patchport_core::port::RefusalKind;
use patchport_engine::Device;
use patchport_proto::v1;
use patchport_tests::{Backend, TestRegistry, base, fixtures, patch, push_fixture, read_tree};

async fn job(client: &patchport_client::Client, patch_ref: &str, target: &str) -> v1::Job {
    let get = |r: &str| v1::GetVersionRequest {
        reference: r.to_owned(),
    };
    let patch = client
        .registry()
        .get_patch_version(get(patch_ref))
        .await
        .unwrap()
        .into_inner();
    let b = patch.base.clone().unwrap();
    let source = client
        .registry()
        .get_base_version(get(&format!("{}@{}", b.name, b.digest)))
        .await
        .unwrap()
        .into_inner();
    let target = client
        .registry()
        .get_base_version(get(target))
        .await
        .unwrap()
        .into_inner();
    v1::Job {
        job_id: "test".into(),
        patch: Some(patch),
        source_base: Some(source),
        target_base: Some(target),
        merged: true,
        ..Default::default()
    }
}

/// Leases the one queued job (the port of the fixture's patch onto v2) as worker `w1`.
async fn lease_one(client: &patchport_client::Client) -> v1::Job {
    client
        .workers()
        .lease_job(v1::LeaseJobRequest {
            worker_id: "w1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs
        .pop()
        .expect("the port of the patch onto v2 is queued")
}

#[tokio::test]
async fn a_remote_port_composes_into_the_offline_bytes() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let f = fixtures().join("llama-micro");
    client
        .push_dir(&f.join("v1"), &base("acme/llama", "v1", None), &NoProgress)
        .await
        .unwrap();
    client
        .push_dir(
            &f.join("v2-sharded"),
            &base("acme/llama", "v2", Some("v1")),
            &NoProgress,
        )
        .await
        .unwrap();
    for p in ["lora-qv", "dora"] {
        client
            .push_dir(
                &f.join("patches").join(p),
                &patch(&format!("acme/{p}"), "1", "acme/llama:v1"),
                &NoProgress,
            )
            .await
            .unwrap();
    }

    let result = patchport_worker::port_job(
        &client,
        &job(&client, "acme/lora-qv:1", "acme/llama:v2").await,
        Device::Cpu,
    )
    .await
    .unwrap();
    assert!(result.refusals.is_empty());
    assert_eq!(result.diagnostics.as_ref().unwrap().modules.len(), 4);
    // Small blobs ride with the completion (the registry stores them before verifying);
    // without a CompleteJob here, store them as it would.
    assert!(!result.inline_blobs.is_empty());
    for b in &result.inline_blobs {
        client.upload_bytes(b.clone()).await.unwrap();
    }

    let offline = tempfile::tempdir().unwrap();
    let opts = patchport_engine::PortOptions {
        merged: true,
        ..Default::default()
    };
    patchport_engine::port_dirs(
        &f.join("v1"),
        &f.join("v2-sharded"),
        &f.join("patches/lora-qv"),
        offline.path(),
        &opts,
    )
    .unwrap();
    let want = read_tree(&offline.path().join("merged"));
    let out = tempfile::tempdir().unwrap();
    assert_eq!(result.merged_files.len(), want.len());
    let mut composed = 0;
    for declared in &result.merged_files {
        let bytes = &want[declared.path()];
        let mut file = v1::FileEntry::from(declared);
        if let DeclaredFile::Composed { size, .. } = declared {
            composed += 1;
            assert!(
                file.digest.is_empty(),
                "the registry, not the worker, hashes composed files"
            );
            assert_eq!(*size, bytes.len() as u64);
            file.digest = Digest::of(bytes).to_string();
        }
        if file.segments.is_empty() {
            client
                .download_file(&file, FileSource::Blob, out.path(), &NoProgress)
                .await
                .unwrap();
            continue;
        }
        // Not recorded yet (the registry composes recorded files): put the declared
        // pieces together from their blobs and compare with the offline file's digest.
        let mut composed_bytes = Vec::new();
        for seg in &file.segments {
            let Some(v1::segment::Source::Blob(r)) = &seg.source else {
                panic!("a worker declares composed files as blob ranges");
            };
            let mut stream = client
                .blobs()
                .read_file(v1::ReadFileRequest {
                    digest: r.digest.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut blob = Vec::new();
            while let Some(chunk) = stream.message().await.unwrap() {
                blob.extend_from_slice(&chunk.data);
            }
            composed_bytes
                .extend_from_slice(&blob[r.offset as usize..(r.offset + r.length) as usize]);
        }
        assert_eq!(Digest::of(&composed_bytes).to_string(), file.digest);
        std::fs::write(out.path().join(&file.path), composed_bytes).unwrap();
    }
    assert!(composed >= 1);
    assert_eq!(read_tree(out.path()), want);

    // The adapter: the patch's tensor blob, the config re-pointed.
    let adapter = tempfile::tempdir().unwrap();
    for file in &result.adapter_files {
        client
            .download_file(&file.into(), FileSource::Blob, adapter.path(), &NoProgress)
            .await
            .unwrap();
    }
    let got = read_tree(adapter.path());
    let orig = read_tree(&f.join("patches/lora-qv"));
    assert!(got["adapter_model.safetensors"] == orig["adapter_model.safetensors"]);
    let cfg: serde_json::Value = serde_json::from_slice(&got["adapter_config.json"]).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "acme/llama:v2");

    // A refusal is a result, not an error, and stores nothing.
    let refused = patchport_worker::port_job(
        &client,
        &job(&client, "acme/dora:1", "acme/llama:v2").await,
        Device::Cpu,
    )
    .await
    .unwrap();
    assert_eq!(refused.refusals[0].kind, RefusalKind::Dora);
    assert!(refused.adapter_files.is_empty() && refused.merged_files.is_empty());
}

/// A small patch's files ride with its lease (`Job.patch_file_bytes`): a worker that holds
/// them reads nothing of the patch from the registry (every read of the patch's blobs
/// fails here), and bytes that do not match their file's digest are not used (the worker
/// reads that file instead, which fails here).
#[tokio::test]
async fn a_port_uses_the_patch_bytes_of_its_lease_and_only_verified_ones() {
    let (reg, faults, _files) = patchport_tests::faults::faulty_registry().await;
    let client = reg.client().await.unwrap();
    let f = fixtures().join("llama-micro");
    let patch_dir = f.join("patches/lora-qv");
    client
        .push_dir(&f.join("v1"), &base("acme/llama", "v1", None), &NoProgress)
        .await
        .unwrap();
    client
        .push_dir(
            &patch_dir,
            &patch("acme/lora-qv", "1", "acme/llama:v1"),
            &NoProgress,
        )
        .await
        .unwrap();
    // Publishing v2 queues the port; its lease carries the patch's files, in order.
    client
        .push_dir(
            &f.join("v2-sharded"),
            &base("acme/llama", "v2", Some("v1")),
            &NoProgress,
        )
        .await
        .unwrap();
    let mut job = lease_one(&client).await;
    let files = job.patch.as_ref().unwrap().files.clone();
    let on_disk: Vec<bytes::Bytes> = files
        .iter()
        .map(|e| bytes::Bytes::from(std::fs::read(patch_dir.join(&e.path)).unwrap()))
        .collect();
    assert_eq!(job.patch_file_bytes, on_disk);
    for e in &files {
        let hex = e.digest.parse::<Digest>().unwrap().hex();
        faults.fail_matching(patchport_tests::faults::Op::Get, &hex, None);
        faults.fail_matching(patchport_tests::faults::Op::GetRange, &hex, None);
    }

    let result = patchport_worker::port_job(&client, &job, Device::Cpu)
        .await
        .expect("the patch came with the lease");
    assert!(result.refusals.is_empty());
    assert_eq!(result.diagnostics.as_ref().unwrap().modules.len(), 4);
    assert_eq!(faults.injected(), 0, "the worker read the patch's blobs");

    let weights = files
        .iter()
        .position(|e| e.path.ends_with(".safetensors"))
        .unwrap();
    let len = job.patch_file_bytes[weights].len();
    job.patch_file_bytes[weights] = bytes::Bytes::from(vec![0u8; len]);
    assert!(
        patchport_worker::port_job(&client, &job, Device::Cpu)
            .await
            .is_err(),
        "bytes that do not match their digest were used"
    );
    assert!(
        faults.injected() > 0,
        "the worker did not read the file itself"
    );
}

/// One LeaseJob call takes up to `max_jobs` jobs, each with its own fence; one
/// CompleteJobs call records several completions in one transaction and answers each on
/// its own: a stale fence or a malformed completion refuses only itself.
#[tokio::test]
async fn a_batch_of_completions_is_answered_one_by_one() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    let f = fixtures().join("llama-micro");
    client
        .push_dir(&f.join("v1"), &base("acme/llama", "v1", None), &NoProgress)
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    patchport_tests::push_distinct_patches(&client, "acme", 3, tmp.path())
        .await
        .unwrap();
    client
        .push_dir(
            &f.join("v2"),
            &base("acme/llama", "v2", Some("v1")),
            &NoProgress,
        )
        .await
        .unwrap();
    let lease = |max_jobs| v1::LeaseJobRequest {
        worker_id: "w1".into(),
        max_jobs,
        ..Default::default()
    };
    let jobs = client
        .workers()
        .lease_job(lease(2))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 2, "max_jobs 2 of 3 queued");
    let last = client
        .workers()
        .lease_job(lease(64))
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(last.len(), 1, "the one left");
    let ids: std::collections::BTreeSet<&str> = jobs
        .iter()
        .chain(&last)
        .map(|j| j.job_id.as_str())
        .collect();
    assert_eq!(ids.len(), 3, "each job leased once");

    let mut completions = Vec::new();
    for j in jobs.iter().chain(&last) {
        let r = patchport_worker::port_job(&client, j, Device::Cpu)
            .await
            .unwrap();
        completions.push(r.into_request(j.job_id.clone(), j.fencing_token));
    }
    completions[1].fencing_token += 1;
    let mut malformed = completions[2].clone();
    malformed.job_id = "not-a-job".into();
    completions.push(malformed);
    let results = client
        .workers()
        .complete_jobs(v1::CompleteJobsRequest {
            completions: completions.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<(String, tonic::Code)> = results
        .iter()
        .map(|r| (r.job_id.clone(), tonic::Code::from(r.code)))
        .collect();
    assert_eq!(
        codes,
        [
            (completions[0].job_id.clone(), tonic::Code::Ok),
            (
                completions[1].job_id.clone(),
                tonic::Code::FailedPrecondition
            ),
            (completions[2].job_id.clone(), tonic::Code::Ok),
            ("not-a-job".to_owned(), tonic::Code::InvalidArgument),
        ]
    );
    assert!(
        results[1].message.contains("lease lost"),
        "{}",
        results[1].message
    );
    assert!(
        results[3].message.contains("job_id"),
        "{}",
        results[3].message
    );

    let state = |job: &v1::Job| {
        let c = client.clone();
        let name = job.patch.as_ref().unwrap().name.clone();
        async move {
            c.ports()
                .get_port(v1::GetPortRequest {
                    reference: format!("{name}:1@acme/llama:v2"),
                })
                .await
                .unwrap()
                .into_inner()
                .state
        }
    };
    let all: Vec<&v1::Job> = jobs.iter().chain(&last).collect();
    assert_eq!(state(all[0]).await, v1::PortState::Succeeded as i32);
    assert_eq!(
        state(all[1]).await,
        v1::PortState::Running as i32,
        "the stale completion changed its port"
    );
    assert_eq!(state(all[2]).await, v1::PortState::Succeeded as i32);

    // More completions than one call may carry: refused whole, nothing recorded.
    let mut late = completions[1].clone();
    late.fencing_token -= 1;
    let too_many = client
        .workers()
        .complete_jobs(v1::CompleteJobsRequest {
            completions: vec![late.clone(); 65],
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
    assert!(
        too_many.message().contains("at most 64"),
        "{}",
        too_many.message()
    );
    assert_eq!(state(all[1]).await, v1::PortState::Running as i32);
    // The live fence completes it, through the same call.
    let results = client
        .workers()
        .complete_jobs(v1::CompleteJobsRequest {
            completions: vec![late],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(tonic::Code::from(results[0].code), tonic::Code::Ok);
    assert_eq!(state(all[1]).await, v1::PortState::Succeeded as i32);
}

/// PrepareComposed: only the holder of a lease may ask the registry to hash a composed
/// file's beginning, every range must lie within a stored blob, and a beginning already
/// kept (or being hashed) is not hashed again.
#[tokio::test]
async fn prepare_composed_is_for_the_lease_holder_and_stored_ranges() {
    let reg = TestRegistry::start(Backend::Embedded).await.unwrap();
    let client = reg.client().await.unwrap();
    push_fixture(&client, "llama-micro/v1", &base("acme/llama", "v1", None)).await;
    let qv = patch("acme/qv", "1", "acme/llama:v1");
    push_fixture(&client, "llama-micro/patches/lora-qv", &qv).await;
    let v2 = base("acme/llama", "v2", Some("v1"));
    push_fixture(&client, "llama-micro/v2", &v2).await;
    let job = lease_one(&client).await;
    let model = job
        .target_base
        .as_ref()
        .unwrap()
        .files
        .iter()
        .find(|f| f.path == "model.safetensors")
        .unwrap()
        .clone();
    let file = |offset: u64, length: u64| v1::ComposedPrefix {
        header: bytes::Bytes::from_static(b"a header"),
        ranges: vec![v1::BlobRange {
            digest: model.digest.clone(),
            offset,
            length,
        }],
    };
    let prepare = |fencing_token: i64, files: Vec<v1::ComposedPrefix>| {
        let client = client.clone();
        let job_id = job.job_id.clone();
        async move {
            client
                .workers()
                .prepare_composed(v1::PrepareComposedRequest {
                    job_id,
                    fencing_token,
                    files,
                })
                .await
        }
    };
    let stale = prepare(job.fencing_token + 1, vec![file(0, 1000)])
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    let beyond = prepare(job.fencing_token, vec![file(model.size - 10, 11)])
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), tonic::Code::FailedPrecondition, "{beyond:?}");
    assert!(beyond.message().contains("is not stored"), "{beyond:?}");
    let many = prepare(job.fencing_token, vec![file(0, 1); 65])
        .await
        .unwrap_err();
    assert_eq!(many.code(), tonic::Code::InvalidArgument, "{many:?}");
    let first = prepare(job.fencing_token, vec![file(0, 1000)])
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.hashing_bytes, 8 + 1000);
    let again = prepare(job.fencing_token, vec![file(0, 1000)])
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.hashing_bytes, 0, "kept or being hashed already");
}
