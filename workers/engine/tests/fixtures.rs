//! Every pair in `tests/fixtures/expectations.json` gets its verdict; every port is the
//! f64 math rounded once, matches PEFT's own merge within rounding, and leaves every other
//! tensor bit-identical to the new base.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::*;
use patchport_engine::{PortOptions, PortReport, Verdict, port_dirs};
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};

fn old_base_of(patch: &Path) -> PathBuf {
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(patch.join("adapter_config.json")).unwrap()).unwrap();
    let name = cfg["base_model_name_or_path"].as_str().unwrap();
    fixtures().join(name.strip_prefix("fixtures/").unwrap())
}

fn run(patch_rel: &str, base_rel: &str, out: &Path) -> PortReport {
    let patch = fixtures().join(patch_rel);
    let opts = PortOptions {
        merged: true,
        new_base_name: Some(format!("fixtures/{base_rel}")),
        new_base_revision: Some("rev-test".to_owned()),
        ..PortOptions::default()
    };
    port_dirs(
        &old_base_of(&patch),
        &fixtures().join(base_rel),
        &patch,
        out,
        &opts,
    )
    .unwrap_or_else(|e| panic!("{patch_rel} -> {base_rel}: {e:#?}"))
}

/// What one merged model's comparison found.
#[derive(Debug, Default)]
struct Check {
    target_elems: usize,
    exact: usize,
    worst_vs_exact: f64,
    worst_vs_peft: f64,
    worst_vs_peft_plain: f64,
}

/// Checks `merged` (a model directory) against the new base and the f64 reference, and
/// against PEFT's merge when given.
fn check_merged(patch: &Path, base: &Path, merged: &Path, peft: Option<&Path>) -> Check {
    let base_t = read_model(base);
    let merged_t = read_model(merged);
    let peft_t = peft.map(read_model);
    assert_eq!(
        base_t.keys().collect::<Vec<_>>(),
        merged_t.keys().collect::<Vec<_>>(),
        "the merged model has exactly the base's tensors"
    );
    let (targets, fifo) = targets(patch);
    let by_name: BTreeMap<String, &Target> = targets
        .iter()
        .map(|t| (format!("{}.weight", t.module), t))
        .collect();
    let mut check = Check::default();
    for (name, bt) in &base_t {
        let mt = &merged_t[name];
        assert_eq!(
            (mt.dtype, &mt.shape),
            (bt.dtype, &bt.shape),
            "{name}: dtype and shape"
        );
        let Some(t) = by_name.get(name) else {
            assert!(
                mt.bytes == bt.bytes,
                "{name}: not a target, must be bit-identical to the new base"
            );
            continue;
        };
        let d = delta(t, fifo);
        let terms = delta_terms(t, fifo);
        let rank = t.a.shape[0] as f64;
        let w = bt.values();
        let x = mt.values();
        let p = peft_t.as_ref().map(|p| p[name].values());
        let e = eps(bt.dtype);
        let size = elem_size(bt.dtype);
        for i in 0..w.len() {
            let exact = w[i] + d[i];
            let scale = w[i].abs() + d[i].abs();
            let got = &mt.bytes[i * size..(i + 1) * size];
            if got == round_once(bt.dtype, exact).as_slice() {
                check.exact += 1;
            } else {
                assert!(
                    ambiguous(bt.dtype, exact),
                    "{name}[{i}]: {} is not {exact} rounded once",
                    x[i]
                );
            }
            check.target_elems += 1;
            if scale > 0.0 {
                check.worst_vs_exact = check.worst_vs_exact.max((x[i] - exact).abs() / (e * scale));
                if let Some(p) = &p {
                    // PEFT computes B·A in f32 before adding (error up to about
                    // r·eps32·s·Σ|b·a|), then rounds the delta and the sum to the
                    // weight's dtype (2·eps·(|W| + |s·B·A|)).
                    let diff = (x[i] - p[i]).abs();
                    let bound = 2.0 * e * scale + rank * f64::from(f32::EPSILON) * terms[i];
                    check.worst_vs_peft = check.worst_vs_peft.max(diff / bound);
                    check.worst_vs_peft_plain = check.worst_vs_peft_plain.max(diff / (e * scale));
                }
            }
        }
    }
    assert_eq!(by_name.len(), targets.len());
    check
}

fn assert_adapter_ported(patch: &Path, out: &Path, base_rel: &str) {
    let want = std::fs::read(patch.join("adapter_model.safetensors")).unwrap();
    let got = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    assert!(
        want == got,
        "the ported adapter's tensors are the patch's bytes"
    );
    let old: serde_json::Value =
        serde_json::from_slice(&std::fs::read(patch.join("adapter_config.json")).unwrap()).unwrap();
    let new: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        new["base_model_name_or_path"],
        format!("fixtures/{base_rel}").as_str()
    );
    assert_eq!(new["revision"], "rev-test");
    for (k, v) in old.as_object().unwrap() {
        if k != "base_model_name_or_path" && k != "revision" {
            assert_eq!(&new[k], v, "adapter_config.json field {k} is kept");
        }
    }
    if patch.join("README.md").exists() {
        assert_eq!(
            std::fs::read(patch.join("README.md")).unwrap(),
            std::fs::read(out.join("README.md")).unwrap()
        );
    }
}

/// The merged model's files mirror the new base's: the same names, every other file
/// (the shard index among them) copied byte for byte, and every safetensors file with the
/// base's metadata and tensors (names, dtypes, shapes), the patch's targets after all
/// the others (the layout that lets a registry hash the shared beginning once).
fn assert_layout_like_base(base: &Path, merged: &Path, patch: &Path) {
    let targets: BTreeSet<String> = targets(patch)
        .0
        .iter()
        .map(|t| format!("{}.weight", t.module))
        .collect();
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(base), names(merged));
    for n in names(base) {
        let b = std::fs::read(base.join(&n)).unwrap();
        let m = std::fs::read(merged.join(&n)).unwrap();
        if !n.ends_with(".safetensors") {
            assert!(b == m, "{n}: copied byte for byte");
            continue;
        }
        let (_, bh) = SafeTensors::read_metadata(&b).unwrap();
        let (_, mh) = SafeTensors::read_metadata(&m).unwrap();
        assert_eq!(bh.metadata(), mh.metadata(), "{n}: metadata");
        let described = |h: &Metadata| -> BTreeMap<String, (Dtype, Vec<usize>)> {
            h.tensors()
                .into_iter()
                .map(|(k, t)| (k, (t.dtype, t.shape.clone())))
                .collect()
        };
        assert_eq!(described(&bh), described(&mh), "{n}: tensors");
        let mut order: Vec<(usize, String)> = mh
            .tensors()
            .into_iter()
            .map(|(k, t)| (t.data_offsets.0, k))
            .collect();
        order.sort();
        if let Some(first) = order.iter().position(|(_, k)| targets.contains(k)) {
            assert!(
                order[first..].iter().all(|(_, k)| targets.contains(k)),
                "{n}: the merged tensors come after every other tensor: {order:?}"
            );
        }
    }
}

#[test]
fn every_fixture_pair_gets_its_verdict() {
    let exp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("expectations.json")).unwrap())
            .unwrap();
    let pairs = exp.as_object().unwrap();
    assert!(pairs.len() >= 10);
    for (pair, want) in pairs {
        let (patch_rel, base_rel) = pair.split_once(" -> ").unwrap();
        let out = tempfile::tempdir().unwrap();
        let report = run(patch_rel, base_rel, out.path());
        match want["verdict"].as_str().unwrap() {
            "refused" => {
                let reason = want["reason"].as_str().unwrap();
                assert_eq!(report.verdict, Verdict::Refused, "{pair}: {report:#?}");
                assert!(
                    report
                        .refusals
                        .iter()
                        .any(|r| r.kind.as_str().contains(reason)
                            || r.subject.to_lowercase().contains(reason)),
                    "{pair}: no refusal names {reason:?}: {:#?}",
                    report.refusals
                );
                assert!(
                    std::fs::read_dir(out.path()).unwrap().next().is_none(),
                    "{pair}: a refused port writes nothing"
                );
            }
            "ported" => {
                assert_eq!(
                    report.verdict,
                    Verdict::Ported,
                    "{pair}: {:#?}",
                    report.refusals
                );
                let patch = fixtures().join(patch_rel);
                let base = fixtures().join(base_rel);
                let merged = out.path().join("merged");
                assert_adapter_ported(&patch, out.path(), base_rel);
                assert_layout_like_base(&base, &merged, &patch);
                let peft = fixtures().join(want["expected"].as_str().unwrap());
                let c = check_merged(&patch, &base, &merged, Some(&peft));
                eprintln!("{pair}: {c:?}");
                assert!(c.target_elems > 0);
                assert!(
                    c.exact as f64 >= 0.999 * c.target_elems as f64,
                    "{pair}: {c:?}"
                );
                assert!(c.worst_vs_exact <= 0.5 * 57.0, "{pair}: {c:?}");
                assert!(
                    c.worst_vs_peft <= 1.0,
                    "{pair}: PEFT differs by more than its rounding: {c:?}"
                );
                assert_eq!(report.diagnostics.modules.len(), targets(&patch).0.len());
                assert!(report.files.iter().any(|f| f.path == "adapter_config.json"));
            }
            other => panic!("{pair}: unknown verdict {other}"),
        }
    }
}

#[test]
fn ports_onto_f16_and_bf16_bases_exactly() {
    for (patch_rel, base_rel) in [
        ("llama-micro/patches/lora-qv", "llama-micro/v2-f16"),
        ("llama-micro/patches/lora-all-rslora", "llama-micro/v2-bf16"),
        ("llama-micro/patches/lora-patterns", "llama-micro/v2-f16"),
    ] {
        let out = tempfile::tempdir().unwrap();
        let report = run(patch_rel, base_rel, out.path());
        assert_eq!(report.verdict, Verdict::Ported, "{:#?}", report.refusals);
        let c = check_merged(
            &fixtures().join(patch_rel),
            &fixtures().join(base_rel),
            &out.path().join("merged"),
            None,
        );
        eprintln!("{patch_rel} -> {base_rel}: {c:?}");
        assert!(c.exact as f64 >= 0.999 * c.target_elems as f64, "{c:?}");
    }
}

#[test]
fn a_sharded_base_gives_a_sharded_merge_equal_to_the_unsharded_one() {
    let patch = "llama-micro/patches/lora-qv";
    let sharded = tempfile::tempdir().unwrap();
    let whole = tempfile::tempdir().unwrap();
    assert_eq!(
        run(patch, "llama-micro/v2-sharded", sharded.path()).verdict,
        Verdict::Ported
    );
    assert_eq!(
        run(patch, "llama-micro/v2", whole.path()).verdict,
        Verdict::Ported
    );
    let merged = sharded.path().join("merged");
    assert_layout_like_base(
        &fixtures().join("llama-micro/v2-sharded"),
        &merged,
        &fixtures().join(patch),
    );
    assert!(merged.join("model.safetensors.index.json").exists());
    let a = read_model(&merged);
    let b = read_model(&whole.path().join("merged"));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        assert!(
            t.bytes == b[name].bytes,
            "{name}: sharded and unsharded merges differ"
        );
    }
}

#[test]
fn diagnostics_match_a_direct_computation() {
    let patch = fixtures().join("llama-micro/patches/lora-qv");
    let out = tempfile::tempdir().unwrap();
    let report = run("llama-micro/patches/lora-qv", "llama-micro/v2", out.path());
    let old = read_model(&fixtures().join("llama-micro/v1"));
    let new = read_model(&fixtures().join("llama-micro/v2"));
    let (targets, _) = targets(&patch);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1e-12);
    let (mut tdd, mut trr, mut too, mut tdr) = (0.0, 0.0, 0.0, 0.0);
    for t in &targets {
        let name = format!("{}.weight", t.module);
        let d = delta(t, false);
        let w_old = old[&name].values();
        let w_new = new[&name].values();
        let (mut dd, mut rr, mut oo, mut dr) = (0.0, 0.0, 0.0, 0.0);
        for i in 0..d.len() {
            let r = w_new[i] - w_old[i];
            dd += d[i] * d[i];
            rr += r * r;
            oo += w_old[i] * w_old[i];
            dr += d[i] * r;
        }
        let m = report
            .diagnostics
            .modules
            .iter()
            .find(|m| m.module == t.module)
            .unwrap();
        assert!(close(m.base_drift, (rr / oo).sqrt()), "{m:?}");
        assert!(close(m.patch_size, (dd / oo).sqrt()), "{m:?}");
        assert!(close(m.cosine, dr / (dd * rr).sqrt()), "{m:?}");
        assert!(close(m.drift_to_patch, (rr / dd).sqrt()), "{m:?}");
        assert!(!m.unchanged);
        (tdd, trr, too, tdr) = (tdd + dd, trr + rr, too + oo, tdr + dr);
    }
    let total = &report.diagnostics.total;
    assert_eq!(total.module, "total");
    assert!(close(total.base_drift, (trr / too).sqrt()), "{total:?}");
    assert!(close(total.cosine, tdr / (tdd * trr).sqrt()), "{total:?}");

    // Porting onto the base the patch was trained on: no drift.
    let same = tempfile::tempdir().unwrap();
    let r = run("llama-micro/patches/lora-qv", "llama-micro/v1", same.path());
    assert!(
        r.diagnostics
            .modules
            .iter()
            .all(|m| m.base_drift == 0.0 && m.cosine == 0.0)
    );
    assert!(r.diagnostics.total.patch_size > 0.0);
}
