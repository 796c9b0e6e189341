//! The architecture of a base, read from its `config.json`, with everything the forward
//! pass needs resolved once (and every option it cannot honour refused, never guessed).

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::EvalError;

/// The decoder families this crate evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Llama, SmolLM, Mistral: RMSNorm, rotary positions, grouped-query attention, SwiGLU.
    Llama,
    /// Qwen2: the Llama block with biases on q, k and v.
    Qwen2,
    /// GPT-2: LayerNorm, learned positions, fused Conv1D `c_attn` stored `[in, out]`, GELU.
    Gpt2,
}

/// The MLP activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `silu` (SwiGLU gate).
    Silu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    GeluErf,
}

/// A resolved architecture.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArchConfig {
    /// `model_type` as written.
    pub model_type: String,
    /// The family.
    pub family: Family,
    /// Model width.
    pub hidden_size: usize,
    /// Decoder blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_kv_heads: usize,
    /// Per-head width: `head_dim` when the config gives it (it may differ from
    /// `hidden_size / num_heads`), else that quotient.
    pub head_dim: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm / LayerNorm epsilon.
    pub norm_eps: f64,
    /// Rotary base (Llama family): `rope_parameters.rope_theta` (transformers 5),
    /// else `rope_theta`, else transformers' default 10000.
    pub rope_theta: f64,
    /// The longest sequence the model takes (GPT-2's learned positions), if bounded.
    pub max_positions: Option<usize>,
    /// A sliding attention window (Mistral, Qwen2), if one applies.
    pub sliding_window: Option<usize>,
    /// The output head is the input embedding (no `lm_head.weight` needed).
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v.
    pub qkv_bias: bool,
    /// Bias on the attention output.
    pub o_bias: bool,
    /// Biases in the MLP.
    pub mlp_bias: bool,
    /// The MLP activation.
    pub activation: Activation,
    /// GPT-2's `scale_attn_by_inverse_layer_idx`.
    pub scale_attn_by_inverse_layer_idx: bool,
}

fn get_usize(obj: &Map<String, Value>, keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_u64))
        .and_then(|v| usize::try_from(v).ok())
}

fn need_usize(obj: &Map<String, Value>, keys: &[&str]) -> Result<usize, EvalError> {
    get_usize(obj, keys).filter(|&v| v > 0).ok_or_else(|| {
        EvalError::not_evaluable(format!(
            "config.json has no positive integer {}",
            keys.join(" / ")
        ))
    })
}

fn get_bool(obj: &Map<String, Value>, key: &str, default: bool) -> bool {
    obj.get(key).and_then(Value::as_bool).unwrap_or(default)
}

/// The rotary base, from transformers 5's `rope_parameters` or the older top-level
/// `rope_theta`. Any rope type other than `default` (linear, dynamic, yarn, llama3
/// scaling) is refused: computing it as plain rope would be a silent guess.
fn rope_theta(obj: &Map<String, Value>) -> Result<f64, EvalError> {
    let mut theta = obj.get("rope_theta").and_then(Value::as_f64);
    for key in ["rope_parameters", "rope_scaling"] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(p)) => {
                let rope_type = p
                    .get("rope_type")
                    .or_else(|| p.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if rope_type != "default" {
                    return Err(EvalError::not_evaluable(format!(
                        "{key}.rope_type {rope_type:?} is not supported (only default rope)"
                    )));
                }
                if let Some(t) = p.get("rope_theta") {
                    theta = Some(t.as_f64().ok_or_else(|| {
                        EvalError::not_evaluable(format!("{key}.rope_theta is not a number: {t}"))
                    })?);
                } else if key == "rope_parameters" && !p.contains_key("rope_type") {
                    // Per-layer-type parameters ({"full_attention": {...}, ...}).
                    return Err(EvalError::not_evaluable(format!(
                        "{key} without rope_theta or rope_type is not supported"
                    )));
                }
            }
            Some(other) => {
                return Err(EvalError::not_evaluable(format!(
                    "{key} must be an object, found {other}"
                )));
            }
        }
    }
    let theta = theta.unwrap_or(10_000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(EvalError::not_evaluable(format!(
            "rope_theta {theta} is not a positive number"
        )));
    }
    Ok(theta)
}

impl ArchConfig {
    /// Resolves a `config.json`. Unsupported architectures and options are
    /// [`EvalError::NotEvaluable`] with the reason.
    pub fn parse(bytes: &[u8]) -> Result<Self, EvalError> {
        let raw: Value = serde_json::from_slice(bytes)
            .map_err(|e| EvalError::not_evaluable(format!("config.json is not JSON: {e}")))?;
        let Value::Object(obj) = raw else {
            return Err(EvalError::not_evaluable("config.json is not a JSON object"));
        };
        let model_type = obj
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| EvalError::not_evaluable("config.json has no model_type"))?
            .to_owned();
        let family = match model_type.as_str() {
            "llama" | "mistral" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "gpt2" => Family::Gpt2,
            other => {
                return Err(EvalError::not_evaluable(format!(
                    "model_type {other:?} is not supported (llama, mistral, qwen2, gpt2)"
                )));
            }
        };
        if let Some(archs) = obj.get("architectures").and_then(Value::as_array) {
            let known = [
                "LlamaForCausalLM",
                "MistralForCausalLM",
                "Qwen2ForCausalLM",
                "GPT2LMHeadModel",
            ];
            if let Some(a) = archs
                .iter()
                .filter_map(Value::as_str)
                .find(|a| !known.contains(a))
            {
                return Err(EvalError::not_evaluable(format!(
                    "architecture {a:?} is not a supported causal language model"
                )));
            }
        }
        match family {
            Family::Gpt2 => Self::gpt2(model_type, &obj),
            Family::Llama | Family::Qwen2 => Self::llama_like(model_type, family, &obj),
        }
    }

    fn llama_like(
        model_type: String,
        family: Family,
        obj: &Map<String, Value>,
    ) -> Result<Self, EvalError> {
        let hidden_size = need_usize(obj, &["hidden_size"])?;
        let num_heads = need_usize(obj, &["num_attention_heads"])?;
        let num_kv_heads = get_usize(obj, &["num_key_value_heads"]).unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(EvalError::not_evaluable(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let head_dim = match get_usize(obj, &["head_dim"]) {
            Some(d) if d > 0 => d,
            _ if hidden_size % num_heads == 0 => hidden_size / num_heads,
            _ => {
                return Err(EvalError::not_evaluable(format!(
                    "hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} and no head_dim is given"
                )));
            }
        };
        if head_dim % 2 != 0 {
            return Err(EvalError::not_evaluable(format!(
                "head_dim {head_dim} is odd: rotary positions need an even width"
            )));
        }
        let act = obj
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" && act != "swish" {
            return Err(EvalError::not_evaluable(format!(
                "hidden_act {act:?} is not supported (silu)"
            )));
        }
        let qwen = family == Family::Qwen2;
        let attention_bias = get_bool(obj, "attention_bias", false);
        let sliding_window = if get_bool(obj, "use_sliding_window", !qwen) {
            get_usize(obj, &["sliding_window"])
        } else {
            None
        };
        Ok(Self {
            model_type,
            family,
            hidden_size,
            num_layers: need_usize(obj, &["num_hidden_layers"])?,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: need_usize(obj, &["intermediate_size"])?,
            vocab_size: need_usize(obj, &["vocab_size"])?,
            norm_eps: obj
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta: rope_theta(obj)?,
            max_positions: None,
            sliding_window,
            // transformers' default for Llama, Mistral and Qwen2 configs is untied.
            tie_word_embeddings: get_bool(obj, "tie_word_embeddings", false),
            qkv_bias: qwen || attention_bias,
            o_bias: !qwen && attention_bias,
            mlp_bias: get_bool(obj, "mlp_bias", false),
            activation: Activation::Silu,
            scale_attn_by_inverse_layer_idx: false,
        })
    }

    fn gpt2(model_type: String, obj: &Map<String, Value>) -> Result<Self, EvalError> {
        let hidden_size = need_usize(obj, &["n_embd", "hidden_size"])?;
        let num_heads = need_usize(obj, &["n_head", "num_attention_heads"])?;
        if hidden_size % num_heads != 0 {
            return Err(EvalError::not_evaluable(format!(
                "n_embd {hidden_size} is not divisible by n_head {num_heads}"
            )));
        }
        let activation = match obj
            .get("activation_function")
            .and_then(Value::as_str)
            .unwrap_or("gelu_new")
        {
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            other => {
                return Err(EvalError::not_evaluable(format!(
                    "activation_function {other:?} is not supported (gelu_new, gelu)"
                )));
            }
        };
        if !get_bool(obj, "scale_attn_weights", true) {
            return Err(EvalError::not_evaluable(
                "scale_attn_weights=false is not supported",
            ));
        }
        Ok(Self {
            model_type,
            family: Family::Gpt2,
            hidden_size,
            num_layers: need_usize(obj, &["n_layer", "num_hidden_layers"])?,
            num_heads,
            num_kv_heads: num_heads,
            head_dim: hidden_size / num_heads,
            intermediate_size: get_usize(obj, &["n_inner"]).unwrap_or(4 * hidden_size),
            vocab_size: need_usize(obj, &["vocab_size"])?,
            norm_eps: obj
                .get("layer_norm_epsilon")
                .and_then(Value::as_f64)
                .unwrap_or(1e-5),
            rope_theta: 0.0,
            max_positions: Some(need_usize(obj, &["n_positions", "n_ctx"])?),
            sliding_window: None,
            // GPT2LMHeadModel ties its head to `wte` unless told otherwise.
            tie_word_embeddings: get_bool(obj, "tie_word_embeddings", true),
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            activation,
            scale_attn_by_inverse_layer_idx: get_bool(
                obj,
                "scale_attn_by_inverse_layer_idx",
                false,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(extra: &str) -> Result<ArchConfig, EvalError> {
        let text = format!(
            r#"{{"model_type":"llama","architectures":["LlamaForCausalLM"],"hidden_size":64,"num_attention_heads":4,"num_key_value_heads":2,"num_hidden_layers":2,"intermediate_size":172,"vocab_size":320{extra}}}"#
        );
        ArchConfig::parse(text.as_bytes())
    }

    fn reason(r: Result<ArchConfig, EvalError>) -> String {
        match r {
            Err(EvalError::NotEvaluable { reason }) => reason,
            other => panic!("expected not evaluable, got {other:?}"),
        }
    }

    #[test]
    fn rope_theta_inside_rope_parameters_is_used() {
        // transformers 5 writes rope_theta only inside rope_parameters; a reader that
        // looks at the top level alone (as candle's LlamaConfig does) silently uses 10000.
        let c =
            llama(r#","rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}"#).unwrap();
        assert_eq!(c.rope_theta, 100_000.0);
        assert_eq!(
            llama(r#","rope_theta":500000.0"#).unwrap().rope_theta,
            500_000.0
        );
        assert_eq!(llama("").unwrap().rope_theta, 10_000.0);
        let r = reason(llama(
            r#","rope_parameters":{"rope_theta":10000.0,"rope_type":"llama3","factor":8.0}"#,
        ));
        assert!(r.contains("llama3"), "{r}");
        let r = reason(llama(r#","rope_scaling":{"type":"linear","factor":2.0}"#));
        assert!(r.contains("linear"), "{r}");
    }

    #[test]
    fn head_dim_may_differ_from_hidden_over_heads() {
        let c = llama(r#","head_dim":32"#).unwrap();
        assert_eq!((c.hidden_size / c.num_heads, c.head_dim), (16, 32));
        assert_eq!(llama("").unwrap().head_dim, 16);
        assert_eq!(llama(r#","head_dim":null"#).unwrap().head_dim, 16);
    }

    #[test]
    fn families_and_their_options() {
        let q = ArchConfig::parse(
            br#"{"model_type":"qwen2","hidden_size":64,"num_attention_heads":4,"num_key_value_heads":2,"num_hidden_layers":2,"intermediate_size":172,"vocab_size":320,"tie_word_embeddings":true,"sliding_window":4096,"use_sliding_window":false}"#,
        )
        .unwrap();
        assert_eq!(q.family, Family::Qwen2);
        assert!(q.qkv_bias && !q.o_bias && q.tie_word_embeddings);
        assert_eq!(q.sliding_window, None);
        let m = ArchConfig::parse(
            br#"{"model_type":"mistral","hidden_size":64,"num_attention_heads":4,"num_hidden_layers":2,"intermediate_size":172,"vocab_size":320,"sliding_window":4096}"#,
        )
        .unwrap();
        assert_eq!(
            (m.family, m.num_kv_heads, m.sliding_window),
            (Family::Llama, 4, Some(4096))
        );
        let g = ArchConfig::parse(
            br#"{"model_type":"gpt2","n_embd":64,"n_head":4,"n_layer":2,"n_positions":128,"vocab_size":300,"n_inner":null}"#,
        )
        .unwrap();
        assert_eq!(
            (
                g.family,
                g.intermediate_size,
                g.max_positions,
                g.tie_word_embeddings
            ),
            (Family::Gpt2, 256, Some(128), true)
        );
        assert_eq!(g.activation, Activation::GeluTanh);
    }

    #[test]
    fn unsupported_configs_say_why() {
        let r = reason(ArchConfig::parse(br#"{"model_type":"t5"}"#));
        assert!(r.contains("\"t5\""), "{r}");
        let r = reason(ArchConfig::parse(
            br#"{"model_type":"llama","architectures":["LlamaForSequenceClassification"]}"#,
        ));
        assert!(r.contains("LlamaForSequenceClassification"), "{r}");
        assert!(reason(ArchConfig::parse(b"{}")).contains("model_type"));
        assert!(reason(ArchConfig::parse(b"nope")).contains("not JSON"));
        assert!(reason(llama(r#","hidden_act":"gelu""#)).contains("hidden_act"));
        let r = reason(ArchConfig::parse(
            br#"{"model_type":"llama","hidden_size":64}"#,
        ));
        assert!(r.contains("num_attention_heads"), "{r}");
    }
}
