//! The task-llama fixture: the accuracies and per-item log-probabilities transformers +
//! PEFT compute, reproduced; the gate's verdicts for the small and the large drift; and
//! the drift-risk score ranking them before any evaluation.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use patchport_eval::{
    ArmResult, Device, EvalSet, Evaluator, ItemScore, Outcome, VerdictPolicy, evaluate_dir, verdict,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/task-llama")
}

fn eval_set() -> EvalSet {
    let bytes = std::fs::read(fixture().join("eval.jsonl")).expect("read eval.jsonl");
    EvalSet::parse(&bytes).expect("the fixture's eval set parses")
}

/// The six arms of results.json, computed once for all tests of this file.
fn arms() -> &'static HashMap<&'static str, ArmResult> {
    static ARMS: OnceLock<HashMap<&'static str, ArmResult>> = OnceLock::new();
    ARMS.get_or_init(|| {
        let set = eval_set();
        let lora = fixture().join("patches/lora-qvo");
        let mut out = HashMap::new();
        for (key, base, patch) in [
            ("v1 zero-shot", "v1", false),
            ("v1+LoRA(v1)", "v1", true),
            ("v2 zero-shot", "v2", false),
            ("v2+LoRA(v1) ported", "v2", true),
            ("v2-drift zero-shot", "v2-drift", false),
            ("v2-drift+LoRA(v1) ported", "v2-drift", true),
        ] {
            let arm = evaluate_dir(
                &fixture().join(base),
                patch.then_some(lora.as_path()),
                &set,
                &Device::Cpu,
            )
            .unwrap_or_else(|e| panic!("{key}: {e}"));
            out.insert(key, arm);
        }
        out
    })
}

fn results() -> serde_json::Value {
    let bytes = std::fs::read(fixture().join("results.json")).expect("read results.json");
    serde_json::from_slice(&bytes).expect("results.json")
}

#[test]
fn reproduces_the_six_accuracies_exactly() {
    let results = results();
    let expected = results["accuracy"].as_object().expect("accuracy");
    assert_eq!(expected.len(), 6);
    for (key, acc) in expected {
        let acc = acc.as_f64().expect("a number");
        let arm = &arms()[key.as_str()];
        assert_eq!(arm.n, 305, "{key}");
        let want = (acc * 305.0).round() as usize;
        assert_eq!(arm.correct, Some(want), "{key}: correct items");
        assert_eq!(arm.accuracy, Some(want as f64 / 305.0), "{key}");
    }
}

#[test]
fn v2_ported_logprobs_match_peft_within_1e_3() {
    let arm = &arms()["v2+LoRA(v1) ported"];
    let text = std::fs::read_to_string(fixture().join("scores_v2_ported.jsonl")).expect("read");
    let mut max_diff: f64 = 0.0;
    let mut count = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        let index = v["index"].as_u64().expect("index") as usize;
        let want: Vec<f64> = v["logprobs"]
            .as_array()
            .expect("logprobs")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect();
        let ItemScore::Choice { logprobs, .. } = &arm.items[index] else {
            panic!("item {index} is not multiple choice");
        };
        assert_eq!(logprobs.len(), want.len(), "item {index}");
        for (got, want) in logprobs.iter().zip(&want) {
            max_diff = max_diff.max((got - want).abs());
        }
        count += 1;
    }
    assert_eq!(count, 305);
    eprintln!("max |logprob - PEFT| over 305 x 3 scores: {max_diff:.3e}");
    assert!(max_diff < 1e-3, "max diff {max_diff}");
}

#[test]
fn batched_scores_equal_the_unbatched_reference_on_all_305_items() {
    // The arm's scores come from packed prefix-tree batches of many items (prompt once,
    // shared prompt beginnings once, each choice attending to its own path only); the
    // reference runs one item at a time, each choice on the prompt's KV cache.
    let set = eval_set();
    let ev = Evaluator::load(
        &fixture().join("v2"),
        Some(&fixture().join("patches/lora-qvo")),
        &Device::Cpu,
    )
    .expect("load");
    let batched: Vec<Vec<f64>> = arms()["v2+LoRA(v1) ported"]
        .items
        .iter()
        .map(|s| match s {
            ItemScore::Choice { logprobs, .. } => logprobs.clone(),
            ItemScore::Completion { .. } => panic!("choice expected"),
        })
        .collect();
    let reference = common::unbatched_scores(&ev, &set);
    let d = common::max_abs_diff(&batched, &reference);
    eprintln!("max |batched - unbatched| over 305 x 3 scores: {d:.3e}");
    assert!(d <= 1e-5, "max diff {d}");
}

#[test]
fn v2_ported_confusion_matches_the_readme() {
    let set = eval_set();
    let arm = &arms()["v2+LoRA(v1) ported"];
    let mut counts: HashMap<(usize, usize), usize> = HashMap::new();
    for (item, score) in set.items().iter().zip(&arm.items) {
        let patchport_eval::Item::MultipleChoice { label, .. } = item else {
            panic!("multiple choice");
        };
        let ItemScore::Choice { prediction, .. } = score else {
            panic!("choice score");
        };
        *counts.entry((*label, *prediction)).or_default() += 1;
    }
    let want = [
        ((0, 0), 39),
        ((0, 1), 1),
        ((1, 0), 5),
        ((1, 1), 105),
        ((2, 0), 12),
        ((2, 1), 5),
        ((2, 2), 138),
    ];
    assert_eq!(counts, want.into_iter().collect());
}

#[test]
fn verdicts_of_the_small_and_the_large_drift() {
    let a = arms();
    let policy = VerdictPolicy::default();
    let reference = &a["v1+LoRA(v1)"];
    let small = verdict(
        reference,
        &a["v2 zero-shot"],
        &a["v2+LoRA(v1) ported"],
        &policy,
    )
    .expect("verdict");
    let large = verdict(
        reference,
        &a["v2-drift zero-shot"],
        &a["v2-drift+LoRA(v1) ported"],
        &policy,
    )
    .expect("verdict");
    eprintln!(
        "v2: {:?} delta {:+.4} se {:.4} threshold {:.4} gain {:+.4}",
        small.verdict, small.delta, small.standard_error, small.threshold, small.gain_over_base
    );
    eprintln!(
        "v2-drift: {:?} delta {:+.4} se {:.4} threshold {:.4} gain {:+.4}",
        large.verdict, large.delta, large.standard_error, large.threshold, large.gain_over_base
    );
    // 288/305 vs 282/305: −6 items, just beyond max(1 point, 2 paired standard errors).
    assert!((small.delta - (-6.0 / 305.0)).abs() < 1e-12);
    // 7 items lost, 1 won: SE 0.0092, threshold max(0.01, 0.0184) = 0.0184 < 0.0197.
    assert!(small.standard_error > 0.009 && small.standard_error < 0.0095);
    assert_eq!(small.verdict, Outcome::Regressed);
    assert!((small.gain_over_base - (282.0 - 189.0) / 305.0).abs() < 1e-12);
    // 288/305 vs 202/305.
    assert!((large.delta - (-86.0 / 305.0)).abs() < 1e-12);
    assert_eq!(large.verdict, Outcome::Regressed);
    assert!(large.gain_over_base > 0.0);
}

#[test]
fn drift_risk_ranks_the_large_drift_higher() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lora = fixture().join("patches/lora-qvo");
    let risk = |base: &str| {
        let report = patchport_engine::port_dirs(
            &fixture().join("v1"),
            &fixture().join(base),
            &lora,
            &dir.path().join(base),
            &patchport_engine::PortOptions::default(),
        )
        .expect("port");
        let t = &report.diagnostics.total;
        let r = report.diagnostics.risk();
        eprintln!(
            "{base}: drift {:.4} patch {:.4} drift/patch {:.3} cosine {:+.4} risk {r:.4}",
            t.base_drift, t.patch_size, t.drift_to_patch, t.cosine
        );
        r
    };
    let small = risk("v2");
    let large = risk("v2-drift");
    assert!((0.0..=1.0).contains(&small) && (0.0..=1.0).contains(&large));
    assert!(large > small + 0.2, "risk v2 {small} vs v2-drift {large}");
}

/// The risk of every ported scenario of `tests/fixtures/expectations.json` (no eval set
/// there: risk only), as a markdown table on stderr (`--nocapture`).
#[test]
fn drift_risk_of_the_fixture_scenarios() {
    let root = fixture().join("..");
    let bytes = std::fs::read(root.join("expectations.json")).expect("expectations.json");
    let exp: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    let dir = tempfile::tempdir().expect("tempdir");
    eprintln!("| scenario | drift | patch | drift/patch | cosine | risk |");
    eprintln!("|---|---|---|---|---|---|");
    for (i, (key, v)) in exp.as_object().expect("object").iter().enumerate() {
        if v["verdict"] != "ported" {
            continue;
        }
        let (patch, base) = key.split_once(" -> ").expect("PATCH -> BASE");
        let family = base.split('/').next().expect("family");
        let report = patchport_engine::port_dirs(
            &root.join(family).join("v1"),
            &root.join(base),
            &root.join(patch),
            &dir.path().join(i.to_string()),
            &patchport_engine::PortOptions::default(),
        )
        .expect("port");
        let t = &report.diagnostics.total;
        let risk = report.diagnostics.risk();
        assert!((0.0..1.0).contains(&risk), "{key}: {risk}");
        eprintln!(
            "| {key} | {:.4} | {:.4} | {:.3} | {:+.4} | {risk:.3} |",
            t.base_drift, t.patch_size, t.drift_to_patch, t.cosine
        );
    }
}
