//! The port's contract beyond the fixtures' verdicts: the ported adapter reuses the
//! patch's bytes, NaN/Inf is refused, pre-flight names each kind of unportable patch,
//! and a merged model composed from the plan equals the offline `--merged` files.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{copy_dir, fixtures, read_tensors};
use patchport_core::Digest;
use patchport_core::port::{RefusalKind, ReusedTensor};
use patchport_engine::{
    DirSource, MergedSink, ModelSource, Piece, PortOptions, Verdict, port, port_dirs, preflight,
};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

fn llama(rel: &str) -> std::path::PathBuf {
    fixtures().join("llama-micro").join(rel)
}

/// Writes a PEFT adapter directory with f32 tensors.
fn write_adapter(dir: &Path, config: &str, tensors: &[(&str, Vec<usize>)]) {
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|i| (((i % 7) as f32 - 3.0) * 0.01).to_le_bytes())
                .collect();
            ((*name).to_owned(), bytes, shape.clone())
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))
        .unwrap();
}

fn lora_config(extra: &str) -> String {
    format!(
        r#"{{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj","v_proj"],
            "base_model_name_or_path":"fixtures/llama-micro/v1"{extra}}}"#
    )
}

fn refusal_kinds(patch: &Path, old: &Path, new: &Path) -> Vec<(RefusalKind, String)> {
    let pre = preflight(
        &DirSource::new(old).unwrap(),
        &DirSource::new(new).unwrap(),
        &DirSource::new(patch).unwrap(),
    )
    .unwrap();
    assert_eq!(pre.is_portable(), pre.refusals.is_empty());
    pre.refusals
        .into_iter()
        .map(|r| (r.kind, r.subject))
        .collect()
}

const Q: &str = "base_model.model.model.layers.0.self_attn.q_proj";

#[test]
fn preflight_names_each_unportable_patch() {
    type Case = (&'static str, String, Vec<(String, Vec<usize>)>, RefusalKind);
    let cases: Vec<Case> = vec![
        (
            "missing module",
            lora_config(""),
            vec![
                (
                    "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight".into(),
                    vec![4, 64],
                ),
                (
                    "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight".into(),
                    vec![64, 4],
                ),
            ],
            RefusalKind::MissingModule,
        ),
        (
            "B·A of the wrong shape",
            lora_config(""),
            vec![
                (format!("{Q}.lora_A.weight"), vec![4, 32]),
                (format!("{Q}.lora_B.weight"), vec![64, 4]),
            ],
            RefusalKind::Shape,
        ),
        (
            "rank that disagrees with the config",
            lora_config(""),
            vec![
                (format!("{Q}.lora_A.weight"), vec![2, 64]),
                (format!("{Q}.lora_B.weight"), vec![64, 2]),
            ],
            RefusalKind::Shape,
        ),
        (
            "DoRA magnitude without use_dora",
            lora_config(""),
            vec![
                (format!("{Q}.lora_A.weight"), vec![4, 64]),
                (format!("{Q}.lora_B.weight"), vec![64, 4]),
                (format!("{Q}.lora_magnitude_vector"), vec![64]),
            ],
            RefusalKind::Dora,
        ),
        (
            "a tensor that is no LoRA factor",
            lora_config(""),
            vec![
                (format!("{Q}.lora_A.weight"), vec![4, 64]),
                (format!("{Q}.lora_B.weight"), vec![64, 4]),
                ("base_model.model.something.else".into(), vec![3]),
            ],
            RefusalKind::UnknownTensor,
        ),
        (
            "lora_A without lora_B",
            lora_config(""),
            vec![(format!("{Q}.lora_A.weight"), vec![4, 64])],
            RefusalKind::UnknownTensor,
        ),
        (
            "a trained copy of lm_head without modules_to_save in the config",
            lora_config(""),
            vec![
                (format!("{Q}.lora_A.weight"), vec![4, 64]),
                (format!("{Q}.lora_B.weight"), vec![64, 4]),
                (
                    "base_model.model.lm_head.modules_to_save.weight".into(),
                    vec![320, 64],
                ),
            ],
            RefusalKind::ModulesToSave,
        ),
        (
            "lora_bias",
            lora_config(r#","lora_bias":true"#),
            vec![
                (format!("{Q}.lora_A.weight"), vec![4, 64]),
                (format!("{Q}.lora_B.weight"), vec![64, 4]),
            ],
            RefusalKind::LoraBias,
        ),
        (
            "PiSSA initialisation",
            lora_config(r#","init_lora_weights":"pissa""#),
            vec![
                (format!("{Q}.lora_A.weight"), vec![4, 64]),
                (format!("{Q}.lora_B.weight"), vec![64, 4]),
            ],
            RefusalKind::InitMethod,
        ),
    ];
    for (what, config, tensors, kind) in cases {
        let dir = tempfile::tempdir().unwrap();
        let t: Vec<(&str, Vec<usize>)> = tensors
            .iter()
            .map(|(n, s)| (n.as_str(), s.clone()))
            .collect();
        write_adapter(dir.path(), &config, &t);
        let kinds = refusal_kinds(dir.path(), &llama("v1"), &llama("v2"));
        assert!(
            kinds.iter().any(|(k, _)| *k == kind),
            "{what}: expected {kind:?}, got {kinds:?}"
        );
    }

    // A correct hand-made adapter ports.
    let dir = tempfile::tempdir().unwrap();
    write_adapter(
        dir.path(),
        &lora_config(""),
        &[
            (&format!("{Q}.lora_A.weight"), vec![4, 64]),
            (&format!("{Q}.lora_B.weight"), vec![64, 4]),
        ],
    );
    assert_eq!(
        refusal_kinds(dir.path(), &llama("v1"), &llama("v2")),
        vec![]
    );

    // GPT-2 Conv1D without fan_in_fan_out: B·A does not fit the [in, out] weight.
    let gpt2 = fixtures().join("gpt2-micro");
    let patch = copy_dir(&gpt2.join("patches/lora-c-attn"));
    let cfg = std::fs::read_to_string(patch.path().join("adapter_config.json")).unwrap();
    std::fs::write(
        patch.path().join("adapter_config.json"),
        cfg.replace("\"fan_in_fan_out\": true", "\"fan_in_fan_out\": false"),
    )
    .unwrap();
    let kinds = refusal_kinds(patch.path(), &gpt2.join("v1"), &gpt2.join("v2"));
    assert!(
        kinds.iter().any(|(k, _)| *k == RefusalKind::Shape),
        "{kinds:?}"
    );

    // Non-LoRA types are refused by type, naming it.
    let kinds = refusal_kinds(&llama("patches/ia3"), &llama("v1"), &llama("v2"));
    assert_eq!(kinds, vec![(RefusalKind::PeftType, "ia3".to_owned())]);
}

/// Sets element `index` of tensor `name` in a copy of the adapter to `value`.
fn poison(patch: &Path, name: &str, index: usize, value: f32) -> tempfile::TempDir {
    let dir = copy_dir(patch);
    let file = dir.path().join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let begin = header[name]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n + index * 4;
    bytes[begin..begin + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&file, bytes).unwrap();
    dir
}

#[test]
fn nan_or_inf_in_a_patch_is_refused_and_nothing_is_written() {
    for (tensor, value) in [
        (format!("{Q}.lora_B.weight"), f32::NAN),
        (
            "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight".to_owned(),
            f32::INFINITY,
        ),
    ] {
        let patch = poison(&llama("patches/lora-qv"), &tensor, 5, value);
        let out = tempfile::tempdir().unwrap();
        let opts = PortOptions {
            merged: true,
            ..PortOptions::default()
        };
        let report =
            port_dirs(&llama("v1"), &llama("v2"), patch.path(), out.path(), &opts).unwrap();
        assert_eq!(report.verdict, Verdict::Refused);
        assert_eq!(report.refusals.len(), 1, "{:?}", report.refusals);
        assert_eq!(report.refusals[0].kind, RefusalKind::NonFinite);
        assert_eq!(report.refusals[0].subject, tensor);
        assert!(std::fs::read_dir(out.path()).unwrap().next().is_none());
    }
}

#[test]
fn the_ported_adapter_is_the_patch_bytes_with_a_repointed_config() {
    let out = tempfile::tempdir().unwrap();
    let opts = PortOptions {
        new_base_name: Some("meta/llama-micro:v2".to_owned()),
        new_base_revision: Some("sha256:abc".to_owned()),
        ..PortOptions::default()
    };
    let patch = llama("patches/lora-patterns");
    let report = port_dirs(&llama("v1"), &llama("v2"), &patch, out.path(), &opts).unwrap();
    assert_eq!(report.verdict, Verdict::Ported);
    assert!(
        !out.path().join("merged").exists(),
        "no merged model unless asked"
    );
    for f in ["adapter_model.safetensors", "README.md"] {
        assert!(
            std::fs::read(patch.join(f)).unwrap() == std::fs::read(out.path().join(f)).unwrap(),
            "{f} is copied byte for byte"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["base_model_name_or_path"], "meta/llama-micro:v2");
    assert_eq!(cfg["revision"], "sha256:abc");
    assert_eq!(cfg["rank_pattern"]["down_proj"], 2);
    assert_eq!(cfg["alpha_pattern"]["o_proj"], 4);
    // Diagnostics are recorded without the merged model too.
    assert_eq!(report.diagnostics.modules.len(), 10);
    assert!(
        report
            .diagnostics
            .modules
            .iter()
            .all(|m| m.base_drift > 0.0 && m.patch_size > 0.0)
    );
    // No temporary files are left behind.
    assert!(
        std::fs::read_dir(out.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.'))
    );
}

/// A sink that keeps the merged tensors, as a registry would store them as blobs.
#[derive(Default)]
struct Blobs(HashMap<String, Vec<u8>>, Vec<String>);

impl MergedSink for Blobs {
    fn merged_tensor(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.1.push(name.to_owned());
        self.0.insert(name.to_owned(), bytes.to_vec());
        Ok(())
    }
}

#[test]
fn reused_tensors_are_not_handed_to_the_sink_and_the_diagnostics_stay_exact() {
    let (old, new, patch) = (
        DirSource::new(&llama("v1")).unwrap(),
        DirSource::new(&llama("v2")).unwrap(),
        DirSource::new(&llama("patches/lora-all-rslora")).unwrap(),
    );
    let mut full = Blobs::default();
    let first = port(&old, &new, &patch, &PortOptions::default(), Some(&mut full)).unwrap();
    assert!(first.reused.is_empty());
    // Every other module's merged tensor taken from the first port.
    let mut opts = PortOptions::default();
    for (plan, d) in first
        .modules
        .iter()
        .zip(&first.diagnostics.modules)
        .step_by(2)
    {
        opts.reuse.insert(
            plan.base_tensor.clone(),
            ReusedTensor {
                tensor: plan.base_tensor.clone(),
                digest: Digest::of(&full.0[&plan.base_tensor]),
                size: full.0[&plan.base_tensor].len() as u64,
                diagnostics: d.clone(),
            },
        );
    }
    let mut rest = Blobs::default();
    let second = port(&old, &new, &patch, &opts, Some(&mut rest)).unwrap();
    let reused: Vec<&String> = opts.reuse.keys().collect();
    let mut got: Vec<&String> = second.reused.iter().collect();
    got.sort();
    assert_eq!(got, reused);
    assert_eq!(rest.1.len() + second.reused.len(), full.1.len());
    assert!(rest.1.iter().all(|t| !opts.reuse.contains_key(t)));
    for (t, bytes) in &rest.0 {
        assert!(bytes == &full.0[t], "{t}");
    }
    assert_eq!(second.diagnostics, first.diagnostics);
    assert_eq!(second.diagnostics.risk(), first.diagnostics.risk());
}

#[test]
fn a_composed_merged_model_equals_the_offline_files() {
    for base in ["v2", "v2-sharded", "v2-bf16"] {
        let new = llama(base);
        let patch = llama("patches/lora-all-rslora");
        let (old_src, new_src, patch_src) = (
            DirSource::new(&llama("v1")).unwrap(),
            DirSource::new(&new).unwrap(),
            DirSource::new(&patch).unwrap(),
        );
        let mut blobs = Blobs::default();
        let outcome = port(
            &old_src,
            &new_src,
            &patch_src,
            &PortOptions::default(),
            Some(&mut blobs),
        )
        .unwrap();
        assert!(outcome.is_ported());
        let files = outcome.merged.unwrap();
        let merged_order: Vec<String> = files
            .iter()
            .flat_map(|f| f.merged_tensors().map(str::to_owned))
            .collect();
        assert_eq!(blobs.1, merged_order, "the sink gets tensors in file order");
        assert_eq!(merged_order.len(), 14);

        let out = tempfile::tempdir().unwrap();
        let opts = PortOptions {
            merged: true,
            ..PortOptions::default()
        };
        port_dirs(&llama("v1"), &new, &patch, out.path(), &opts).unwrap();
        for f in &files {
            let mut composed = f.header.clone();
            let mut buf = Vec::new();
            for p in &f.pieces {
                match p {
                    Piece::Source { file, begin, end } => {
                        new_src.read_range(file, *begin, *end, &mut buf).unwrap();
                        composed.extend_from_slice(&buf);
                    }
                    Piece::Merged { tensor, len } => {
                        assert_eq!(blobs.0[tensor].len() as u64, *len);
                        composed.extend_from_slice(&blobs.0[tensor]);
                    }
                }
            }
            assert_eq!(composed.len() as u64, f.len());
            let offline = std::fs::read(out.path().join("merged").join(&f.path)).unwrap();
            assert!(
                composed == offline,
                "{base}/{}: composed and offline differ",
                f.path
            );
            if f.path.ends_with(".safetensors") {
                // Untouched tensors come from the base's bytes, never re-encoded.
                let t = read_tensors(&out.path().join("merged").join(&f.path));
                assert!(t.keys().all(|k| !k.is_empty()));
            }
        }
    }
}

#[test]
fn dir_source_refuses_paths_outside_the_directory() {
    let src = DirSource::new(&llama("v2")).unwrap();
    let mut buf = Vec::new();
    assert!(src.read_range("../v1/config.json", 0, 4, &mut buf).is_err());
    assert!(src.read_range("/etc/passwd", 0, 4, &mut buf).is_err());
    assert!(src.read_range("config.json", 0, 4, &mut buf).is_ok());
    assert_eq!(
        src.files(),
        vec!["config.json", "generation_config.json", "model.safetensors"]
    );
    assert!(DirSource::new(&llama("v2/config.json")).is_err());
}

#[test]
fn missing_and_broken_inputs_are_errors() {
    let empty = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = PortOptions::default();
    let e = port_dirs(&llama("v1"), &llama("v2"), empty.path(), out.path(), &opts).unwrap_err();
    assert!(e.to_string().contains("adapter_config.json"), "{e}");
    let e = port_dirs(
        &llama("v1"),
        empty.path(),
        &llama("patches/lora-qv"),
        out.path(),
        &opts,
    )
    .unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");
    // A truncated weights file is a bad safetensors file, named.
    let broken = copy_dir(&llama("v2"));
    let f = broken.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
    let e = port_dirs(
        &llama("v1"),
        broken.path(),
        &llama("patches/lora-qv"),
        out.path(),
        &opts,
    )
    .unwrap_err();
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}
