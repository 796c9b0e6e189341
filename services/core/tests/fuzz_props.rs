//! The fuzz targets' five properties (`fuzz/src/checks.rs`, shared source) on
//! proptest-generated inputs, so the normal test suite checks them on every run: arbitrary
//! bytes, structured inputs (configs with every typed field set to every kind of JSON
//! value, references built from valid and invalid parts), and the committed fuzz seeds
//! (`fuzz/corpus/<target>/`, cut from the real fixtures) mutated. The ten-minute
//! libFuzzer runs are `scripts/fuzz.sh`.

#[allow(unreachable_pub, dead_code)]
#[path = "../../../fuzz/src/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Map, Value, json};

/// Every allocation goes through the probe, so `tensor_index` can bound the largest one.
#[global_allocator]
static PROBE: checks::alloc_probe::Probe = checks::alloc_probe::Probe;

/// The committed fuzz seeds of one target, with their paths.
fn seed_files(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).expect("a readable seed");
            (f, bytes)
        })
        .collect()
}

/// The committed fuzz seeds of one target.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    seed_files(target).into_iter().map(|(_, b)| b).collect()
}

/// Tokens worth splicing into JSON and headers.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"0",
    b"-1",
    b"1e999",
    b"null",
    b"true",
    b"\"F32\"",
    b"\"BF16\"",
    b"\\u0000",
    b"18446744073709551615",
    b"\xff",
];

/// One edit of a seed.
#[derive(Debug, Clone)]
enum Edit {
    Flip(Index, u8),
    Insert(Index, u8),
    Splice(Index, Index),
    Remove(Index),
    Truncate(Index),
    Word(Index, u64),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), 1..=255u8).prop_map(|(i, m)| Edit::Flip(i, m)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Edit::Splice(i, t)),
        any::<Index>().prop_map(Edit::Remove),
        any::<Index>().prop_map(Edit::Truncate),
        (
            any::<Index>(),
            prop_oneof![
                Just(0u64),
                Just(100_000_000),
                Just(100_000_001),
                Just(u64::MAX),
                any::<u64>()
            ]
        )
            .prop_map(|(i, w)| Edit::Word(i, w)),
    ]
}

fn apply(mut data: Vec<u8>, edits: Vec<Edit>) -> Vec<u8> {
    for e in edits {
        let len = data.len();
        match e {
            Edit::Flip(i, m) if len > 0 => data[i.index(len)] ^= m,
            Edit::Insert(i, b) => data.insert(i.index(len + 1), b),
            Edit::Splice(i, t) => {
                let at = i.index(len + 1);
                let token = TOKENS[t.index(TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
            Edit::Remove(i) if len > 0 => {
                data.remove(i.index(len));
            }
            Edit::Truncate(i) => data.truncate(i.index(len + 1)),
            Edit::Word(i, w) if len >= 8 => {
                let at = i.index(len - 7);
                data[at..at + 8].copy_from_slice(&w.to_le_bytes());
            }
            _ => {}
        }
    }
    data
}

/// A committed seed of `target` with a few edits.
fn mutated(target: &str) -> impl Strategy<Value = Vec<u8>> + use<> {
    (
        proptest::sample::select(seeds(target)),
        proptest::collection::vec(edit(), 0..6),
    )
        .prop_map(|(seed, edits)| apply(seed, edits))
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..512)
}

/// Any kind of JSON value a config field might hold.
fn json_value() -> impl Strategy<Value = Value> {
    let text = "[a-z_.()|*^$\\\\0-9]{0,12}";
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..40).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        text.prop_map(Value::from),
        proptest::collection::vec(text, 0..4).prop_map(Value::from),
        proptest::collection::btree_map(text, (0u64..40).prop_map(Value::from), 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        proptest::collection::btree_map(text, (-10.0f64..10.0).prop_map(Value::from), 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect())),
    ]
}

/// `base` with some of `fields` set to arbitrary values.
fn object(base: Value, fields: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        (proptest::sample::select(fields), json_value()),
        0..fields.len(),
    )
    .prop_map(move |overrides| {
        let mut obj: Map<String, Value> = base.as_object().cloned().unwrap_or_default();
        for (k, v) in overrides {
            obj.insert(k.to_owned(), v);
        }
        serde_json::to_vec(&Value::Object(obj)).unwrap_or_default()
    })
}

const ADAPTER_FIELDS: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "base_model_name_or_path",
    "revision",
    "lora_bias",
    "bias",
    "init_lora_weights",
    "trainable_token_indices",
];

const MODEL_FIELDS: &[&str] = &[
    "model_type",
    "architectures",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "vocab_size",
    "dtype",
    "torch_dtype",
];

/// References assembled from valid and invalid parts.
fn reference_like() -> impl Strategy<Value = Vec<u8>> {
    let part = "[a-z0-9][a-z0-9._-]{0,8}|[A-Za-z0-9@:/_+-]{0,6}";
    let version = "[A-Za-z0-9][A-Za-z0-9._+-]{0,8}|sha256:[0-9a-f]{64}|sha256:[0-9a-fA-F]{0,65}";
    let one = (
        part,
        part,
        prop_oneof![Just(":"), Just("@"), Just("")],
        version,
    )
        .prop_map(|(ns, n, sep, v)| format!("{ns}/{n}{sep}{v}"));
    (one.clone(), proptest::option::of(one)).prop_map(|(a, b)| match b {
        Some(b) => format!("{a}@{b}").into_bytes(),
        None => a.into_bytes(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn safetensors_header(data in prop_oneof![bytes(), mutated("safetensors_header")]) {
        checks::safetensors_header(&data);
    }

    #[test]
    fn tensor_index(data in prop_oneof![bytes(), mutated("tensor_index")]) {
        checks::tensor_index(&data);
    }

    #[test]
    fn adapter_config(data in prop_oneof![
        bytes(),
        mutated("adapter_config"),
        object(json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16}), ADAPTER_FIELDS),
    ]) {
        checks::adapter_config(&data);
    }

    #[test]
    fn model_config(data in prop_oneof![
        bytes(),
        mutated("model_config"),
        object(json!({"model_type": "llama"}), MODEL_FIELDS),
    ]) {
        checks::model_config(&data);
    }

    #[test]
    fn names(data in prop_oneof![
        bytes(),
        "\\PC{0,200}".prop_map(String::into_bytes),
        mutated("names"),
        reference_like(),
    ]) {
        checks::names(&data);
    }
}

/// Every committed seed passes as it is (what `scripts/fuzz.sh --seeds` replays).
#[test]
fn committed_seeds_pass() {
    for (target, check) in [
        (
            "safetensors_header",
            checks::safetensors_header as fn(&[u8]),
        ),
        ("tensor_index", checks::tensor_index),
        ("adapter_config", checks::adapter_config),
        ("model_config", checks::model_config),
        ("names", checks::names),
    ] {
        for (path, seed) in seed_files(target) {
            // Names the seed when its check panics.
            eprintln!("{}", path.display());
            check(&seed);
        }
    }
}

/// The indexer reads a header that declares the 100 MB limit without allocating for it.
#[test]
fn a_declared_header_length_is_not_allocated() {
    let mut file = 100_000_000u64.to_le_bytes().to_vec();
    file.extend_from_slice(br#"{"a":"#);
    let (_, peak) = checks::alloc_probe::measure(|| {
        let mut ix = patchport_core::layout::TensorIndexer::new(100_000_008);
        ix.feed(&file).expect("a header still arriving");
        ix.finish()
    });
    assert!(peak < 1 << 20, "allocated {peak} bytes at once");
}
