//! Reading a base's weights from a directory and merging a PEFT LoRA adapter into them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use patchport_core::adapter::AdapterConfig;
use serde_json::Value;

use crate::error::EvalError;

/// The weight files of a model directory: the shards named by
/// `model.safetensors.index.json`, else `model.safetensors`, else every `*.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let bytes = read(&index)?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| EvalError::Weights {
            path: dir.to_owned(),
            message: format!("model.safetensors.index.json is not JSON: {e}"),
        })?;
        let map = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| EvalError::Weights {
                path: dir.to_owned(),
                message: "model.safetensors.index.json has no weight_map object".to_owned(),
            })?;
        let mut files = std::collections::BTreeSet::new();
        for v in map.values() {
            let name = v.as_str().unwrap_or_default();
            let plain = !name.is_empty()
                && Path::new(name).file_name().and_then(|f| f.to_str()) == Some(name);
            if !plain || !name.ends_with(".safetensors") {
                return Err(EvalError::Weights {
                    path: dir.to_owned(),
                    message: format!(
                        "weight_map names {v}, not a .safetensors file in the directory"
                    ),
                });
            }
            files.insert(name.to_owned());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let entries = std::fs::read_dir(dir).map_err(|source| EvalError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EvalError::not_evaluable(format!(
            "{} has no *.safetensors weights",
            dir.display()
        )));
    }
    Ok(files)
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, EvalError> {
    std::fs::read(path).map_err(|source| EvalError::Io {
        path: path.to_owned(),
        source,
    })
}

fn load_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, EvalError> {
    let bytes = read(path)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
        EvalError::Weights {
            path: path.to_owned(),
            message: e.to_string(),
        }
    })?;
    tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?.to_device(device)?)))
        .collect()
}

/// Every tensor of a model directory, in f32 on `device`.
pub(crate) fn load_dir(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>, EvalError> {
    let mut all = HashMap::new();
    for file in weight_files(dir)? {
        for (name, t) in load_file(&file, device)? {
            if all.insert(name.clone(), t).is_some() {
                return Err(EvalError::Weights {
                    path: dir.to_owned(),
                    message: format!("tensor {name} is stored twice"),
                });
            }
        }
    }
    Ok(all)
}

/// One LoRA pair.
#[derive(Default)]
struct Pair {
    a: Option<Tensor>,
    b: Option<Tensor>,
}

/// Merges the PEFT LoRA adapter in `adapter_dir` into `weights`:
/// `W ← W + s·B·A` per target module, `B·A` and the sum in f64, one rounding to f32, the
/// scale `s` from the adapter config (rank and alpha patterns, rsLoRA). The weights must
/// already be `[out, in]` (GPT-2's Conv1D weights transposed). Adapters that are not a
/// pure additive delta (DoRA, IA3, `modules_to_save`, ...) are not evaluable this way.
pub(crate) fn merge_adapter(
    weights: &mut HashMap<String, Tensor>,
    adapter_dir: &Path,
) -> Result<(), EvalError> {
    let adapter_err = |message: String| EvalError::Adapter {
        path: adapter_dir.to_owned(),
        message,
    };
    let config_path = adapter_dir.join("adapter_config.json");
    if !config_path.is_file() {
        return Err(adapter_err("no adapter_config.json".to_owned()));
    }
    let config =
        AdapterConfig::parse(&read(&config_path)?).map_err(|e| adapter_err(e.to_string()))?;
    let refusals = config.refusals();
    if !refusals.is_empty() {
        let reasons: Vec<_> = refusals.iter().map(|r| r.message.as_str()).collect();
        return Err(EvalError::not_evaluable(format!(
            "the adapter is not an additive LoRA delta: {}",
            reasons.join("; ")
        )));
    }
    let file = adapter_dir.join("adapter_model.safetensors");
    if !file.is_file() {
        return Err(EvalError::not_evaluable(format!(
            "{} has no adapter_model.safetensors",
            adapter_dir.display()
        )));
    }
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    for (name, t) in load_file(&file, &Device::Cpu)? {
        let rest = name.strip_prefix("base_model.model.").unwrap_or(&name);
        let (module, is_a) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, true)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, false)
        } else {
            return Err(adapter_err(format!(
                "tensor {name} is not a LoRA A/B weight"
            )));
        };
        let pair = pairs.entry(module.to_owned()).or_default();
        if is_a {
            pair.a = Some(t);
        } else {
            pair.b = Some(t);
        }
    }
    if pairs.is_empty() {
        return Err(adapter_err("no LoRA tensors".to_owned()));
    }
    for (module, pair) in pairs {
        let (Some(a), Some(b)) = (pair.a, pair.b) else {
            return Err(adapter_err(format!("{module} lacks lora_A or lora_B")));
        };
        let key = format!("{module}.weight");
        let Some(w) = weights.get(&key) else {
            return Err(adapter_err(format!(
                "target module {module} is not in the base"
            )));
        };
        let (r_a, n_in) = a
            .dims2()
            .map_err(|e| adapter_err(format!("{module} lora_A: {e}")))?;
        let (n_out, r_b) = b
            .dims2()
            .map_err(|e| adapter_err(format!("{module} lora_B: {e}")))?;
        if r_a != r_b || w.dims() != [n_out, n_in] {
            return Err(adapter_err(format!(
                "{module}: B {:?} · A {:?} cannot be added to W {:?}",
                b.dims(),
                a.dims(),
                w.dims()
            )));
        }
        let scale = config.scale_for(&module);
        let delta = b
            .to_dtype(DType::F64)?
            .matmul(&a.to_dtype(DType::F64)?)?
            .affine(scale, 0.0)?
            .to_device(w.device())?;
        let merged = (w.to_dtype(DType::F64)? + delta)?.to_dtype(DType::F32)?;
        weights.insert(key, merged);
    }
    Ok(())
}
