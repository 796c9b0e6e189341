//! Independent references for the engine's tests: safetensors read with the
//! `safetensors` crate, floats decoded by hand, and rounding to bf16/f16 by exhaustive
//! search over every value of the format (nothing shared with the engine's code).

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use safetensors::{Dtype, SafeTensors};

/// The fixtures copied into the repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
}

/// One tensor read from a file.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Tensor {
    pub fn values(&self) -> Vec<f64> {
        to_f64(self.dtype, &self.bytes)
    }
}

/// Every tensor of a safetensors file.
pub fn read_tensors(path: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                Tensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: view.data().to_vec(),
                },
            )
        })
        .collect()
}

/// Every tensor of a model directory (all its `.safetensors` files).
pub fn read_model(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            out.extend(read_tensors(&p));
        }
    }
    out
}

pub fn bf16_bits_to_f64(b: u16) -> f64 {
    f64::from(f32::from_bits(u32::from(b) << 16))
}

pub fn f16_bits_to_f64(b: u16) -> f64 {
    // By the definition of binary16: sign, 5-bit exponent (bias 15), 10-bit fraction.
    let sign = if b & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 10) & 0x1f);
    let frac = f64::from(b & 0x3ff);
    match exp {
        0 => sign * frac * 2f64.powi(-24),
        31 if frac == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        e => sign * (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

pub fn to_f64(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16_bits_to_f64(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16_bits_to_f64(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// The finite values of a 16-bit format, sorted, with their bit patterns (+0 only).
fn table(to: fn(u16) -> f64) -> Vec<(f64, u16)> {
    let mut t: Vec<(f64, u16)> = (0..=u16::MAX)
        .map(|b| (to(b), b))
        .filter(|(v, b)| v.is_finite() && !(*v == 0.0 && *b != 0))
        .collect();
    t.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    t
}

/// The bf16 and f16 tables.
type Tables = (Vec<(f64, u16)>, Vec<(f64, u16)>);

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| (table(bf16_bits_to_f64), table(f16_bits_to_f64)))
}

/// `x` rounded to nearest (ties to even) by searching the format's values.
fn nearest16(t: &[(f64, u16)], x: f64, inf: u16) -> u16 {
    let max = t.last().unwrap().0;
    let overflow = max + (max - t[t.len() - 2].0) / 2.0;
    if x >= overflow {
        return inf;
    }
    if x <= -overflow {
        return inf | 0x8000;
    }
    let i = t.partition_point(|(v, _)| *v <= x);
    if i == 0 {
        return t[0].1;
    }
    if i == t.len() {
        return t[i - 1].1;
    }
    let (lo, lb) = t[i - 1];
    let (hi, hb) = t[i];
    let r = if lo == x {
        lb
    } else {
        let mid = (lo + hi) / 2.0;
        if x < mid || (x == mid && lb & 1 == 0) {
            lb
        } else {
            hb
        }
    };
    if r & 0x7fff == 0 && x.is_sign_negative() {
        0x8000
    } else {
        r
    }
}

/// `x` rounded once to `dtype`, as little-endian bytes.
pub fn round_once(dtype: Dtype, x: f64) -> Vec<u8> {
    match dtype {
        Dtype::F64 => x.to_le_bytes().to_vec(),
        Dtype::F32 => (x as f32).to_le_bytes().to_vec(),
        Dtype::BF16 => nearest16(&tables().0, x, 0x7f80).to_le_bytes().to_vec(),
        Dtype::F16 => nearest16(&tables().1, x, 0x7c00).to_le_bytes().to_vec(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// True when `x` is so close to a rounding boundary of `dtype` that an f64 error of a few
/// ulps could move it across (either neighbour is then a correct single rounding).
pub fn ambiguous(dtype: Dtype, x: f64) -> bool {
    let e = 8.0 * f64::EPSILON * x.abs().max(f64::MIN_POSITIVE);
    round_once(dtype, x - e) != round_once(dtype, x + e)
}

/// Machine epsilon of a storage dtype.
pub fn eps(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F64 => f64::EPSILON,
        Dtype::F32 => f64::from(f32::EPSILON),
        Dtype::BF16 => 2f64.powi(-7),
        Dtype::F16 => 2f64.powi(-10),
        other => panic!("unexpected dtype {other:?}"),
    }
}

pub fn elem_size(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

/// A LoRA target as the tests understand it, from the adapter alone.
#[derive(Debug, Clone)]
pub struct Target {
    pub module: String,
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// PEFT's pattern rule for the fixture patterns: the key equals the module name or is
/// its dotted suffix.
fn pattern<'a, T: Copy>(
    map: &'a serde_json::Map<String, serde_json::Value>,
    module: &str,
    f: impl Fn(&'a serde_json::Value) -> T,
) -> Option<T> {
    map.iter()
        .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
        .map(|(_, v)| f(v))
}

/// The LoRA targets of a PEFT adapter directory, with each module's scale.
pub fn targets(patch: &Path) -> (Vec<Target>, bool) {
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(patch.join("adapter_config.json")).unwrap()).unwrap();
    let empty = serde_json::Map::new();
    let rank_pattern = cfg["rank_pattern"].as_object().unwrap_or(&empty);
    let alpha_pattern = cfg["alpha_pattern"].as_object().unwrap_or(&empty);
    let rslora = cfg["use_rslora"].as_bool().unwrap_or(false);
    let fifo = cfg["fan_in_fan_out"].as_bool().unwrap_or(false);
    let tensors = read_tensors(&patch.join("adapter_model.safetensors"));
    let mut out = Vec::new();
    for (name, a) in &tensors {
        let Some(module) = name
            .strip_prefix("base_model.model.")
            .and_then(|n| n.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let b = tensors[&format!("base_model.model.{module}.lora_B.weight")].clone();
        let r = pattern(rank_pattern, module, |v| v.as_f64().unwrap())
            .unwrap_or(cfg["r"].as_f64().unwrap());
        let alpha = pattern(alpha_pattern, module, |v| v.as_f64().unwrap())
            .unwrap_or(cfg["lora_alpha"].as_f64().unwrap());
        assert_eq!(a.shape[0] as f64, r, "{module}: rank");
        let scale = if rslora { alpha / r.sqrt() } else { alpha / r };
        out.push(Target {
            module: module.to_owned(),
            a: a.clone(),
            b,
            scale,
        });
    }
    (out, fifo)
}

/// `s·B·A` (or its transpose) in f64, summed in order, shaped like the base weight.
pub fn delta(t: &Target, transpose: bool) -> Vec<f64> {
    delta_with(t, transpose, |x| x)
}

/// `s·Σ_k |B[o][k]·A[k][i]|`, shaped like the base weight: the magnitude that bounds the
/// rounding error of computing `B·A` in floating point.
pub fn delta_terms(t: &Target, transpose: bool) -> Vec<f64> {
    delta_with(t, transpose, f64::abs)
}

fn delta_with(t: &Target, transpose: bool, f: fn(f64) -> f64) -> Vec<f64> {
    let a = t.a.values();
    let b = t.b.values();
    let (r, inf) = (t.a.shape[0], t.a.shape[1]);
    let out = t.b.shape[0];
    let mut d = vec![0.0; out * inf];
    for o in 0..out {
        for i in 0..inf {
            let mut acc = 0.0;
            for k in 0..r {
                acc += f(b[o * r + k] * a[k * inf + i]);
            }
            let v = t.scale * acc;
            if transpose {
                d[i * out + o] = v;
            } else {
                d[o * inf + i] = v;
            }
        }
    }
    d
}

/// Copies a directory (flat) into a new temporary directory.
pub fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}
