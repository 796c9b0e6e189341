//! The architecture facts of a Hugging Face `config.json`.

use serde_json::Value;

/// A `config.json` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelConfigError {
    /// Not a JSON object.
    #[error("config.json is not a JSON object: {message}")]
    NotJson {
        /// What the parser said.
        message: String,
    },
    /// No `model_type`.
    #[error("config.json has no \"model_type\"")]
    NoModelType,
}

/// The facts that decide whether two bases are the same architecture family.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `llama`, `gpt2`, `qwen2`, ...
    pub model_type: String,
    /// `LlamaForCausalLM`, ...
    pub architectures: Vec<String>,
    /// `hidden_size` (`n_embd`, `d_model`).
    pub hidden_size: Option<u64>,
    /// `num_hidden_layers` (`n_layer`).
    pub num_hidden_layers: Option<u64>,
    /// `num_attention_heads` (`n_head`).
    pub num_attention_heads: Option<u64>,
    /// `num_key_value_heads`.
    pub num_key_value_heads: Option<u64>,
    /// `vocab_size`.
    pub vocab_size: Option<u64>,
    /// `dtype` (transformers 5) or `torch_dtype`.
    pub torch_dtype: Option<String>,
    /// The whole config.
    pub raw: Value,
}

fn first_u64(obj: &serde_json::Map<String, Value>, keys: &[&str]) -> Option<u64> {
    keys.iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_u64))
}

impl ModelConfig {
    /// Parses `config.json`.
    pub fn parse(bytes: &[u8]) -> Result<Self, ModelConfigError> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| ModelConfigError::NotJson {
            message: e.to_string(),
        })?;
        let obj = raw.as_object().ok_or_else(|| ModelConfigError::NotJson {
            message: "the top level is not an object".to_owned(),
        })?;
        let model_type = obj
            .get("model_type")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(ModelConfigError::NoModelType)?
            .to_owned();
        let architectures = obj
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let torch_dtype = ["dtype", "torch_dtype"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(Value::as_str).map(str::to_owned));
        Ok(Self {
            model_type,
            architectures,
            hidden_size: first_u64(obj, &["hidden_size", "n_embd", "d_model"]),
            num_hidden_layers: first_u64(obj, &["num_hidden_layers", "n_layer", "num_layers"]),
            num_attention_heads: first_u64(obj, &["num_attention_heads", "n_head"]),
            num_key_value_heads: first_u64(obj, &["num_key_value_heads"]),
            vocab_size: first_u64(obj, &["vocab_size"]),
            torch_dtype,
            raw: raw.clone(),
        })
    }

    /// The differences that make `other` a different architecture family, as
    /// `field: old vs new` strings (the vocabulary may grow: adapters on attention and
    /// MLP modules still port; a changed embedding shape is caught per tensor).
    pub fn family_mismatches(&self, other: &ModelConfig) -> Vec<String> {
        let mut out = Vec::new();
        if self.model_type != other.model_type {
            out.push(format!(
                "model_type: {} vs {}",
                self.model_type, other.model_type
            ));
        }
        let pairs = [
            ("hidden_size", self.hidden_size, other.hidden_size),
            (
                "num_hidden_layers",
                self.num_hidden_layers,
                other.num_hidden_layers,
            ),
            (
                "num_attention_heads",
                self.num_attention_heads,
                other.num_attention_heads,
            ),
            (
                "num_key_value_heads",
                self.num_key_value_heads,
                other.num_key_value_heads,
            ),
        ];
        for (field, a, b) in pairs {
            if a != b {
                let show = |v: Option<u64>| v.map_or("absent".to_owned(), |v| v.to_string());
                out.push(format!("{field}: {} vs {}", show(a), show(b)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llama_and_gpt2_field_names() {
        let l = ModelConfig::parse(
            br#"{"model_type":"llama","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":320,"dtype":"float32"}"#,
        )
        .unwrap();
        let g = ModelConfig::parse(
            br#"{"model_type":"gpt2","n_embd":64,"n_layer":2,"n_head":4,"vocab_size":320}"#,
        )
        .unwrap();
        assert_eq!(l.hidden_size, g.hidden_size);
        assert_eq!(l.torch_dtype.as_deref(), Some("float32"));
        assert_eq!(
            l.family_mismatches(&g),
            vec!["model_type: llama vs gpt2".to_owned()]
        );
        assert!(matches!(
            ModelConfig::parse(b"{}"),
            Err(ModelConfigError::NoModelType)
        ));
        assert!(matches!(
            ModelConfig::parse(b"nope"),
            Err(ModelConfigError::NotJson { .. })
        ));
    }
}
