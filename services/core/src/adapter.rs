//! PEFT `adapter_config.json`, parsed into typed fields, and PEFT's per-module rank and
//! alpha resolution.
//!
//! `rank_pattern` and `alpha_pattern` keys are regexes. Each config compiles them once
//! (not per module, not per read), and their number and size are bounded
//! ([`MAX_PATTERNS`], [`MAX_PATTERN_BYTES`], [`MAX_PATTERN_PROGRAM_BYTES`]) so that a
//! hostile config cannot make every read of it expensive. [`AdapterConfig::parse`]
//! validates and compiles (a push); [`AdapterConfig::parse_stored`] reads a config that
//! was validated when it was stored and compiles its patterns only if a rank or alpha is
//! asked for.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::model_config::ModelConfig;
use crate::port::{Refusal, RefusalKind};

/// Most keys in `rank_pattern`, and in `alpha_pattern`.
pub const MAX_PATTERNS: usize = 256;

/// Longest `rank_pattern` / `alpha_pattern` key, in bytes.
pub const MAX_PATTERN_BYTES: usize = 256;

/// Largest compiled program of one pattern key (the `regex` crate's size limit): keeps
/// counted repetitions of large classes (`\w{60}`) out.
pub const MAX_PATTERN_PROGRAM_BYTES: usize = 64 << 10;

/// An `adapter_config.json` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdapterConfigError {
    /// Not JSON, or not an object.
    #[error("adapter_config.json is not a JSON object: {message}")]
    NotJson {
        /// What the parser said.
        message: String,
    },
    /// A field with the wrong type or value.
    #[error("adapter_config.json field {field:?}: {message}")]
    BadField {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// `target_modules`: a list of module names (suffix match) or one regex (full match).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TargetModules {
    /// Not given.
    #[default]
    None,
    /// Names matched as `name == t || name.ends_with("." + t)`.
    List(Vec<String>),
    /// A regex matched against the whole module name.
    Regex(String),
}

/// PEFT's `init_lora_weights`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitLoraWeights {
    /// `true` / `false`.
    Bool(bool),
    /// A named method (`gaussian`, `pissa`, `olora`, `loftq`, ...).
    Method(String),
}

/// The compiled `rank_pattern` and `alpha_pattern` keys of one config, in file order;
/// compiled at most once, shared by clones.
#[derive(Clone, Default)]
struct CompiledPatterns(Arc<OnceLock<(Matchers, Matchers)>>);

/// One compiled regex per key, in file order; `None` (a stored key that no longer
/// compiles) matches nothing.
type Matchers = Vec<Option<regex::Regex>>;

impl std::fmt::Debug for CompiledPatterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "CompiledPatterns(compiled)"
        } else {
            "CompiledPatterns(not yet)"
        })
    }
}

impl PartialEq for CompiledPatterns {
    /// A cache of the keys, which the config compares itself.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The typed fields of a PEFT adapter config that decide how a patch ports.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// `LORA`, `IA3`, `OFT`, `PROMPT_TUNING`, ...
    pub peft_type: String,
    /// Default rank.
    pub r: u32,
    /// Default alpha.
    pub lora_alpha: f64,
    /// Scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// DoRA (weight-decomposed): not a pure additive delta.
    pub use_dora: bool,
    /// Base weights stored `[in, out]` (GPT-2 Conv1D).
    pub fan_in_fan_out: bool,
    /// Which modules carry LoRA.
    pub target_modules: TargetModules,
    /// Per-module rank overrides (keys are PEFT patterns).
    pub rank_pattern: Vec<(String, u32)>,
    /// Per-module alpha overrides (keys are PEFT patterns).
    pub alpha_pattern: Vec<(String, f64)>,
    /// Modules saved whole (trained copies of old-base modules).
    pub modules_to_save: Vec<String>,
    /// The base the adapter was trained on, by name.
    pub base_model_name_or_path: Option<String>,
    /// The base revision, when given.
    pub revision: Option<String>,
    /// Trained bias on B (`lora_bias`).
    pub lora_bias: bool,
    /// PEFT's `bias` (`none`, `all`, `lora_only`).
    pub bias: String,
    /// `init_lora_weights`.
    pub init_lora_weights: InitLoraWeights,
    /// `trainable_token_indices` was set (trained embedding rows).
    pub trainable_token_indices: bool,
    /// The whole config as parsed.
    pub raw: Value,
    /// `rank_pattern` and `alpha_pattern` compiled.
    compiled: CompiledPatterns,
}

fn opt_str(
    obj: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, AdapterConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(AdapterConfigError::BadField {
            field,
            message: format!("expected a string, found {other}"),
        }),
    }
}

fn opt_bool(
    obj: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<bool, AdapterConfigError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(AdapterConfigError::BadField {
            field,
            message: format!("expected true or false, found {other}"),
        }),
    }
}

fn positive_rank(v: &Value, field: &'static str) -> Result<u32, AdapterConfigError> {
    v.as_u64()
        .filter(|&r| r > 0 && r <= u32::MAX as u64)
        .map(|r| r as u32)
        .ok_or_else(|| AdapterConfigError::BadField {
            field,
            message: format!("expected a positive integer rank, found {v}"),
        })
}

fn finite_number(v: &Value, field: &'static str) -> Result<f64, AdapterConfigError> {
    v.as_f64()
        .filter(|a| a.is_finite())
        .ok_or_else(|| AdapterConfigError::BadField {
            field,
            message: format!("expected a finite number, found {v}"),
        })
}

fn pattern_regex(key: &str, field: &'static str) -> Result<regex::Regex, AdapterConfigError> {
    check_pattern_len(key, field)?;
    // PEFT: re.match(rf"(.*\.)?({key})$", module_name)
    regex::RegexBuilder::new(&format!(r"^(?:.*\.)?(?:{key})$"))
        .size_limit(MAX_PATTERN_PROGRAM_BYTES)
        .dfa_size_limit(MAX_PATTERN_PROGRAM_BYTES)
        .build()
        .map_err(|e| AdapterConfigError::BadField {
            field,
            message: match e {
                regex::Error::CompiledTooBig(_) => format!(
                    "pattern {key:?} is too large: its compiled form exceeds the limit of \
                     {MAX_PATTERN_PROGRAM_BYTES} bytes per key"
                ),
                e => format!("pattern {key:?} is not a supported regex: {e}"),
            },
        })
}

/// Checks the length of one pattern key (cheap; compiling is [`pattern_regex`]).
fn check_pattern_len(key: &str, field: &'static str) -> Result<(), AdapterConfigError> {
    if key.len() > MAX_PATTERN_BYTES {
        return Err(AdapterConfigError::BadField {
            field,
            message: format!(
                "pattern of {} bytes; the limit is {MAX_PATTERN_BYTES} bytes per key",
                key.len()
            ),
        });
    }
    Ok(())
}

/// Checks the number of keys of a pattern field.
fn check_pattern_count(
    map: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<(), AdapterConfigError> {
    if map.len() > MAX_PATTERNS {
        return Err(AdapterConfigError::BadField {
            field,
            message: format!("{} patterns; the limit is {MAX_PATTERNS} keys", map.len()),
        });
    }
    Ok(())
}

fn compile_all<T>(
    patterns: &[(String, T)],
    field: &'static str,
) -> Result<Matchers, AdapterConfigError> {
    patterns
        .iter()
        .map(|(key, _)| pattern_regex(key, field).map(Some))
        .collect()
}

impl AdapterConfig {
    /// Parses and validates `adapter_config.json`, compiling its rank and alpha patterns
    /// (a bounded amount of work; see the module doc).
    pub fn parse(bytes: &[u8]) -> Result<Self, AdapterConfigError> {
        let config = Self::parse_stored(bytes)?;
        let rank = compile_all(&config.rank_pattern, "rank_pattern")?;
        let alpha = compile_all(&config.alpha_pattern, "alpha_pattern")?;
        let _ = config.compiled.0.set((rank, alpha));
        Ok(config)
    }

    /// Parses a config that [`parse`](Self::parse) accepted when it was stored: the same
    /// fields and bounds, but the patterns are compiled only when a rank, alpha or scale
    /// is asked for (listing stored patches never compiles them). A pattern that does not
    /// compile then matches nothing.
    pub fn parse_stored(bytes: &[u8]) -> Result<Self, AdapterConfigError> {
        let raw: Value =
            serde_json::from_slice(bytes).map_err(|e| AdapterConfigError::NotJson {
                message: e.to_string(),
            })?;
        let obj = raw.as_object().ok_or_else(|| AdapterConfigError::NotJson {
            message: "the top level is not an object".to_owned(),
        })?;
        let peft_type = opt_str(obj, "peft_type")?.ok_or(AdapterConfigError::BadField {
            field: "peft_type",
            message: "missing".to_owned(),
        })?;
        let is_lora = peft_type == "LORA";
        let r = match obj.get("r") {
            Some(v) if !v.is_null() => positive_rank(v, "r")?,
            _ if is_lora => {
                return Err(AdapterConfigError::BadField {
                    field: "r",
                    message: "missing".to_owned(),
                });
            }
            _ => 0,
        };
        let lora_alpha = match obj.get("lora_alpha") {
            Some(v) if !v.is_null() => finite_number(v, "lora_alpha")?,
            _ if is_lora => {
                return Err(AdapterConfigError::BadField {
                    field: "lora_alpha",
                    message: "missing".to_owned(),
                });
            }
            _ => 0.0,
        };
        let target_modules = match obj.get("target_modules") {
            None | Some(Value::Null) => TargetModules::None,
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(items)) => TargetModules::List(
                items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| AdapterConfigError::BadField {
                                field: "target_modules",
                                message: format!("expected strings, found {v}"),
                            })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(other) => {
                return Err(AdapterConfigError::BadField {
                    field: "target_modules",
                    message: format!("expected a list or a regex string, found {other}"),
                });
            }
        };
        let mut rank_pattern = Vec::new();
        if let Some(v) = obj.get("rank_pattern").filter(|v| !v.is_null()) {
            let map = v.as_object().ok_or_else(|| AdapterConfigError::BadField {
                field: "rank_pattern",
                message: format!("expected an object, found {v}"),
            })?;
            check_pattern_count(map, "rank_pattern")?;
            for (k, v) in map {
                check_pattern_len(k, "rank_pattern")?;
                rank_pattern.push((k.clone(), positive_rank(v, "rank_pattern")?));
            }
        }
        let mut alpha_pattern = Vec::new();
        if let Some(v) = obj.get("alpha_pattern").filter(|v| !v.is_null()) {
            let map = v.as_object().ok_or_else(|| AdapterConfigError::BadField {
                field: "alpha_pattern",
                message: format!("expected an object, found {v}"),
            })?;
            check_pattern_count(map, "alpha_pattern")?;
            for (k, v) in map {
                check_pattern_len(k, "alpha_pattern")?;
                alpha_pattern.push((k.clone(), finite_number(v, "alpha_pattern")?));
            }
        }
        let modules_to_save = match obj.get("modules_to_save") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| AdapterConfigError::BadField {
                            field: "modules_to_save",
                            message: format!("expected strings, found {v}"),
                        })
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(AdapterConfigError::BadField {
                    field: "modules_to_save",
                    message: format!("expected a list, found {other}"),
                });
            }
        };
        let init_lora_weights = match obj.get("init_lora_weights") {
            None | Some(Value::Null) => InitLoraWeights::Bool(true),
            Some(Value::Bool(b)) => InitLoraWeights::Bool(*b),
            Some(Value::String(s)) => InitLoraWeights::Method(s.clone()),
            Some(other) => {
                return Err(AdapterConfigError::BadField {
                    field: "init_lora_weights",
                    message: format!("expected a boolean or a method name, found {other}"),
                });
            }
        };
        let trainable_token_indices =
            !matches!(obj.get("trainable_token_indices"), None | Some(Value::Null));
        Ok(Self {
            peft_type,
            r,
            lora_alpha,
            use_rslora: opt_bool(obj, "use_rslora")?,
            use_dora: opt_bool(obj, "use_dora")?,
            fan_in_fan_out: opt_bool(obj, "fan_in_fan_out")?,
            target_modules,
            rank_pattern,
            alpha_pattern,
            modules_to_save,
            base_model_name_or_path: opt_str(obj, "base_model_name_or_path")?,
            revision: opt_str(obj, "revision")?,
            lora_bias: opt_bool(obj, "lora_bias")?,
            bias: opt_str(obj, "bias")?.unwrap_or_else(|| "none".to_owned()),
            init_lora_weights,
            trainable_token_indices,
            raw,
            compiled: CompiledPatterns::default(),
        })
    }

    /// The compiled patterns (compiled on first use when parsed from storage).
    fn compiled(&self) -> &(Matchers, Matchers) {
        fn lenient<T>(patterns: &[(String, T)]) -> Matchers {
            // Validated when stored; a key that no longer compiles matches nothing
            // rather than failing a read.
            patterns
                .iter()
                .map(|(key, _)| pattern_regex(key, "pattern").ok())
                .collect()
        }
        self.compiled
            .0
            .get_or_init(|| (lenient(&self.rank_pattern), lenient(&self.alpha_pattern)))
    }

    /// The first pattern key (in file order) that matches `module` as PEFT matches it:
    /// `re.match(rf"(.*\.)?({key})$", module)`.
    fn pattern_value<T: Copy>(
        patterns: &[(String, T)],
        compiled: &[Option<regex::Regex>],
        module: &str,
    ) -> Option<T> {
        patterns.iter().zip(compiled).find_map(|((_, value), re)| {
            re.as_ref()
                .is_some_and(|re| re.is_match(module))
                .then_some(*value)
        })
    }

    /// The rank of `module` (a base module name such as `model.layers.0.mlp.down_proj`).
    pub fn rank_for(&self, module: &str) -> u32 {
        Self::pattern_value(&self.rank_pattern, &self.compiled().0, module).unwrap_or(self.r)
    }

    /// The alpha of `module`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        Self::pattern_value(&self.alpha_pattern, &self.compiled().1, module)
            .unwrap_or(self.lora_alpha)
    }

    /// The LoRA scale `s` of `module`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale_for(&self, module: &str) -> f64 {
        let r = f64::from(self.rank_for(module));
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Every reason, from the config alone, why this adapter is not a pure additive
    /// delta `s·B·A` and so must not be ported silently.
    pub fn refusals(&self) -> Vec<Refusal> {
        let mut out = Vec::new();
        if self.peft_type != "LORA" {
            out.push(Refusal::new(
                RefusalKind::PeftType,
                &self.peft_type.to_ascii_lowercase(),
                format!(
                    "peft_type {} is not LoRA: only additive LoRA deltas can be ported",
                    self.peft_type
                ),
            ));
            return out;
        }
        if self.use_dora {
            out.push(Refusal::new(
                RefusalKind::Dora,
                "use_dora",
                "DoRA: the magnitude vector depends on the old base's weight norms".to_owned(),
            ));
        }
        if !self.modules_to_save.is_empty() {
            out.push(Refusal::new(
                RefusalKind::ModulesToSave,
                &self.modules_to_save.join(","),
                format!(
                    "modules_to_save: {} are full trained copies of old-base modules",
                    self.modules_to_save.join(", ")
                ),
            ));
        }
        if self.trainable_token_indices {
            out.push(Refusal::new(
                RefusalKind::TrainableTokens,
                "trainable_token_indices",
                "trainable_token_indices: trained embedding rows replace old-base rows".to_owned(),
            ));
        }
        if self.lora_bias {
            out.push(Refusal::new(
                RefusalKind::LoraBias,
                "lora_bias",
                "lora_bias: a trained bias is not part of the s·B·A delta".to_owned(),
            ));
        }
        if self.bias != "none" {
            out.push(Refusal::new(
                RefusalKind::LoraBias,
                "bias",
                format!(
                    "bias={}: trained base biases are not part of the s·B·A delta",
                    self.bias
                ),
            ));
        }
        if let InitLoraWeights::Method(m) = &self.init_lora_weights {
            let m = m.to_ascii_lowercase();
            if ["pissa", "olora", "loftq", "corda"]
                .iter()
                .any(|p| m.starts_with(p))
            {
                out.push(Refusal::new(
                    RefusalKind::InitMethod,
                    &m,
                    format!("init_lora_weights={m} rewrote the old base's weights (residual init)"),
                ));
            }
        }
        out
    }

    /// The config JSON re-pointed at another base (`base_model_name_or_path`,
    /// `revision`), every other field kept as it was.
    pub fn repointed_json(&self, base_name: &str, revision: Option<&str>) -> Vec<u8> {
        let mut raw = self.raw.clone();
        if let Some(obj) = raw.as_object_mut() {
            obj.insert(
                "base_model_name_or_path".to_owned(),
                Value::String(base_name.to_owned()),
            );
            obj.insert(
                "revision".to_owned(),
                revision.map_or(Value::Null, |r| Value::String(r.to_owned())),
            );
        }
        let mut out = serde_json::to_vec_pretty(&raw).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// `rank_pattern` as a map, for display.
    pub fn rank_pattern_map(&self) -> BTreeMap<String, u32> {
        self.rank_pattern.iter().cloned().collect()
    }

    /// `alpha_pattern` as a map, for display.
    pub fn alpha_pattern_map(&self) -> BTreeMap<String, f64> {
        self.alpha_pattern.iter().cloned().collect()
    }
}

/// The prefix PEFT puts before a base module name in adapter tensor keys.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// What an adapter tensor key is (the module name it carries, without [`PEFT_PREFIX`]).
#[derive(Debug, PartialEq, Eq)]
pub enum AdapterKey<'a> {
    /// `lora_A` of a Linear (or Conv1D) module.
    LoraA(&'a str),
    /// `lora_B` of a Linear (or Conv1D) module.
    LoraB(&'a str),
    /// `lora_embedding_A` of an Embedding.
    EmbeddingA(&'a str),
    /// `lora_embedding_B` of an Embedding.
    EmbeddingB(&'a str),
    /// A DoRA magnitude vector.
    Magnitude(&'a str),
    /// A trained LoRA bias.
    LoraBias(&'a str),
    /// A whole module's tensor (a `modules_to_save` copy or a trained base tensor).
    Full(&'a str),
    /// Anything else.
    Unknown,
}

/// Classifies a PEFT adapter tensor key.
pub fn classify(key: &str) -> AdapterKey<'_> {
    let Some(rest) = key.strip_prefix(PEFT_PREFIX) else {
        return AdapterKey::Unknown;
    };
    let suffixes = [
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora_embedding_A",
        ".lora_embedding_B",
        ".lora_magnitude_vector.weight",
        ".lora_magnitude_vector",
        ".lora_A.bias",
        ".lora_B.bias",
        ".modules_to_save.weight",
    ];
    for (i, suffix) in suffixes.iter().enumerate() {
        if let Some(m) = rest.strip_suffix(suffix).filter(|m| !m.is_empty()) {
            return match i {
                0 => AdapterKey::LoraA(m),
                1 => AdapterKey::LoraB(m),
                2 => AdapterKey::EmbeddingA(m),
                3 => AdapterKey::EmbeddingB(m),
                4 | 5 => AdapterKey::Magnitude(m),
                6 | 7 => AdapterKey::LoraBias(m),
                _ => AdapterKey::Full(m),
            };
        }
    }
    if rest.contains(".lora_") || rest.starts_with("lora_") {
        return AdapterKey::Unknown;
    }
    for suffix in [".weight", ".bias"] {
        if let Some(module) = rest.strip_suffix(suffix) {
            let module = module.strip_suffix(".modules_to_save").unwrap_or(module);
            if !module.is_empty() {
                return AdapterKey::Full(module);
            }
        }
    }
    AdapterKey::Unknown
}

/// The model class an adapter was made for (PEFT's `auto_mapping.base_model_class`,
/// e.g. `LlamaForCausalLM`), when its config says.
pub fn base_model_class(cfg: &AdapterConfig) -> Option<&str> {
    cfg.raw
        .get("auto_mapping")?
        .get("base_model_class")?
        .as_str()
        .filter(|s| !s.is_empty())
}

/// An adapter pushed onto a base of another architecture: the model class the adapter was
/// made for is not among the base's `architectures`. `None` when they agree or when either
/// side does not say.
pub fn architecture_refusal(cfg: &AdapterConfig, base: &ModelConfig) -> Option<Refusal> {
    let class = base_model_class(cfg)?;
    if base.architectures.is_empty() || base.architectures.iter().any(|a| a == class) {
        return None;
    }
    Some(Refusal::new(
        RefusalKind::Architecture,
        "auto_mapping.base_model_class",
        format!(
            "the adapter was made for {class} but the base is {} (model_type {})",
            base.architectures.join(", "),
            base.model_type
        ),
    ))
}

/// Whether an adapter's LoRA modules truly line up with a base, from tensor names and
/// shapes alone: every `lora_A`/`lora_B` pair names a base tensor `<module>.weight` whose
/// shape is that of `B·A` (transposed for `fan_in_fan_out` and embeddings). `adapter`
/// and `base` map tensor names to shapes. Empty when everything lines up.
pub fn lineup_refusals(
    cfg: &AdapterConfig,
    adapter: &BTreeMap<String, Vec<u64>>,
    base: &BTreeMap<String, Vec<u64>>,
) -> Vec<Refusal> {
    #[derive(Default)]
    struct Pair<'a> {
        a: Option<&'a [u64]>,
        b: Option<&'a [u64]>,
        embedding: bool,
    }
    let mut pairs: BTreeMap<&str, Pair<'_>> = BTreeMap::new();
    for (name, shape) in adapter {
        match classify(name) {
            AdapterKey::LoraA(m) => pairs.entry(m).or_default().a = Some(shape),
            AdapterKey::LoraB(m) => pairs.entry(m).or_default().b = Some(shape),
            AdapterKey::EmbeddingA(m) => {
                let p = pairs.entry(m).or_default();
                p.a = Some(shape);
                p.embedding = true;
            }
            AdapterKey::EmbeddingB(m) => {
                let p = pairs.entry(m).or_default();
                p.b = Some(shape);
                p.embedding = true;
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if pairs.is_empty() {
        out.push(Refusal::new(
            RefusalKind::UnknownTensor,
            crate::layout::ADAPTER_WEIGHTS,
            "the adapter has no LoRA A/B tensors".to_owned(),
        ));
    }
    for (module, p) in pairs {
        let (Some(a), Some(b)) = (p.a, p.b) else {
            out.push(Refusal::new(
                RefusalKind::UnknownTensor,
                module,
                format!("{module}: the adapter lacks one of its lora_A/lora_B factors"),
            ));
            continue;
        };
        let weight = format!("{module}.weight");
        let Some(have) = base.get(&weight) else {
            out.push(Refusal::new(
                RefusalKind::MissingModule,
                module,
                format!("{module}: the base has no tensor {weight}"),
            ));
            continue;
        };
        let want = match (a, b) {
            ([r, i], [o, r2]) if r == r2 => {
                if p.embedding || cfg.fan_in_fan_out {
                    vec![*i, *o]
                } else {
                    vec![*o, *i]
                }
            }
            _ => {
                out.push(Refusal::new(
                    RefusalKind::Shape,
                    module,
                    format!("{module}: lora_A {a:?} and lora_B {b:?} are not a rank-r pair"),
                ));
                continue;
            }
        };
        if *have != want {
            out.push(Refusal::new(
                RefusalKind::Shape,
                module,
                format!("{module}: B·A is {want:?} but the base's {weight} is {have:?}"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_and_lineup() {
        let cfg = AdapterConfig::parse(
            br#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"],
                "auto_mapping":{"base_model_class":"LlamaForCausalLM"}}"#,
        )
        .unwrap();
        let qwen =
            ModelConfig::parse(br#"{"model_type":"qwen2","architectures":["Qwen2ForCausalLM"]}"#)
                .unwrap();
        let llama =
            ModelConfig::parse(br#"{"model_type":"llama","architectures":["LlamaForCausalLM"]}"#)
                .unwrap();
        let r = architecture_refusal(&cfg, &qwen).unwrap();
        assert_eq!(r.kind, RefusalKind::Architecture);
        assert!(r.message.contains("LlamaForCausalLM") && r.message.contains("Qwen2ForCausalLM"));
        assert!(architecture_refusal(&cfg, &llama).is_none());
        let p = |s: &str| format!("{PEFT_PREFIX}{s}");
        let adapter: BTreeMap<String, Vec<u64>> = [
            (p("m.q_proj.lora_A.weight"), vec![2, 8]),
            (p("m.q_proj.lora_B.weight"), vec![6, 2]),
        ]
        .into();
        let fits: BTreeMap<String, Vec<u64>> = [("m.q_proj.weight".to_owned(), vec![6, 8])].into();
        assert!(lineup_refusals(&cfg, &adapter, &fits).is_empty());
        let wrong: BTreeMap<String, Vec<u64>> = [("m.q_proj.weight".to_owned(), vec![8, 6])].into();
        assert_eq!(
            lineup_refusals(&cfg, &adapter, &wrong)[0].kind,
            RefusalKind::Shape
        );
        let other: BTreeMap<String, Vec<u64>> = [("m.k_proj.weight".to_owned(), vec![6, 8])].into();
        assert_eq!(
            lineup_refusals(&cfg, &adapter, &other)[0].kind,
            RefusalKind::MissingModule
        );
    }

    #[test]
    fn patterns_resolve_as_peft_does() {
        let c = AdapterConfig::parse(
            br#"{"peft_type":"LORA","r":8,"lora_alpha":16,"rank_pattern":{"down_proj":2},
                "alpha_pattern":{"o_proj":4},"target_modules":["q_proj","down_proj","o_proj"]}"#,
        )
        .unwrap();
        assert_eq!(c.rank_for("model.layers.0.mlp.down_proj"), 2);
        assert_eq!(c.rank_for("model.layers.0.self_attn.q_proj"), 8);
        assert_eq!(c.scale_for("model.layers.1.self_attn.o_proj"), 0.5);
        assert_eq!(c.scale_for("model.layers.1.mlp.down_proj"), 8.0);
        assert_eq!(c.scale_for("model.layers.1.self_attn.q_proj"), 2.0);
        // A key matches only whole dotted components at the end.
        assert_eq!(c.rank_for("model.layers.0.mlp.xdown_proj"), 8);
        let layer = AdapterConfig::parse(
            br#"{"peft_type":"LORA","r":8,"lora_alpha":8,"rank_pattern":{"layers.1.self_attn.q_proj":4}}"#,
        )
        .unwrap();
        assert_eq!(layer.rank_for("model.layers.1.self_attn.q_proj"), 4);
        assert_eq!(layer.rank_for("model.layers.11.self_attn.q_proj"), 8);
    }

    #[test]
    fn rslora_scale() {
        let c = AdapterConfig::parse(
            br#"{"peft_type":"LORA","r":16,"lora_alpha":16,"use_rslora":true}"#,
        )
        .unwrap();
        assert_eq!(c.scale_for("x"), 4.0);
    }

    #[test]
    fn refusals_name_their_reason() {
        let kinds = |json: &[u8]| -> Vec<RefusalKind> {
            AdapterConfig::parse(json)
                .unwrap()
                .refusals()
                .into_iter()
                .map(|r| r.kind)
                .collect()
        };
        assert_eq!(
            kinds(br#"{"peft_type":"IA3"}"#),
            vec![RefusalKind::PeftType]
        );
        assert_eq!(
            kinds(br#"{"peft_type":"LORA","r":4,"lora_alpha":8,"use_dora":true}"#),
            vec![RefusalKind::Dora]
        );
        assert_eq!(
            kinds(br#"{"peft_type":"LORA","r":4,"lora_alpha":8,"modules_to_save":["lm_head"]}"#),
            vec![RefusalKind::ModulesToSave]
        );
        assert_eq!(
            kinds(
                br#"{"peft_type":"LORA","r":4,"lora_alpha":8,"init_lora_weights":"pissa_niter_4"}"#
            ),
            vec![RefusalKind::InitMethod]
        );
        assert!(
            kinds(br#"{"peft_type":"LORA","r":4,"lora_alpha":8,"init_lora_weights":"gaussian"}"#)
                .is_empty()
        );
    }

    #[test]
    fn bad_configs_are_refused_with_the_field() {
        for (json, field) in [
            (&br#"{"peft_type":"LORA","lora_alpha":8}"#[..], "r"),
            (br#"{"peft_type":"LORA","r":0,"lora_alpha":8}"#, "r"),
            (
                br#"{"peft_type":"LORA","r":4,"lora_alpha":"x"}"#,
                "lora_alpha",
            ),
            (
                br#"{"peft_type":"LORA","r":4,"lora_alpha":8,"rank_pattern":{"(":2}}"#,
                "rank_pattern",
            ),
            (br#"{"r":4}"#, "peft_type"),
        ] {
            match AdapterConfig::parse(json) {
                Err(AdapterConfigError::BadField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            AdapterConfig::parse(b"[1]"),
            Err(AdapterConfigError::NotJson { .. })
        ));
    }

    #[test]
    fn repointing_keeps_other_fields() {
        let c = AdapterConfig::parse(
            br#"{"peft_type":"LORA","r":4,"lora_alpha":8,"base_model_name_or_path":"a","x":1}"#,
        )
        .unwrap();
        let v: Value =
            serde_json::from_slice(&c.repointed_json("acme/llama:v2", Some("sha256:00"))).unwrap();
        assert_eq!(v["base_model_name_or_path"], "acme/llama:v2");
        assert_eq!(v["revision"], "sha256:00");
        assert_eq!(v["x"], 1);
    }

    #[test]
    fn long_alpha_survives_repointing() {
        // Found by fuzzing: without correctly rounded float parsing, a long decimal alpha
        // parsed one ulp away from the value its re-pointed config parses to.
        let c = AdapterConfig::parse(
            br#"{"peft_type":"LORA","r":4,"lora_alpha":888888888888888888888888888888888888888888888888888888888888888888888888888888888885}"#,
        )
        .unwrap();
        let again = AdapterConfig::parse(&c.repointed_json("a/b:v2", None)).unwrap();
        assert_eq!(again.lora_alpha.to_bits(), c.lora_alpha.to_bits());
        // What Python (and so PEFT) reads from the same text.
        assert_eq!(c.lora_alpha, 8.888888888888888e83);
    }

    fn with_rank_patterns(keys: &[String]) -> Vec<u8> {
        let map: serde_json::Map<String, Value> =
            keys.iter().map(|k| (k.clone(), Value::from(2))).collect();
        serde_json::to_vec(&serde_json::json!({
            "peft_type": "LORA", "r": 8, "lora_alpha": 8, "rank_pattern": map
        }))
        .unwrap()
    }

    fn refusal(json: &[u8]) -> (&'static str, String) {
        match AdapterConfig::parse(json) {
            Err(AdapterConfigError::BadField { field, message }) => (field, message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn pattern_count_and_size_are_bounded() {
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("k{i}")).collect();
        let (field, message) = refusal(&with_rank_patterns(&many));
        assert_eq!(field, "rank_pattern");
        assert!(
            message.contains("257 patterns; the limit is 256"),
            "{message}"
        );
        let (field, message) = refusal(&with_rank_patterns(&[r"k1x\w{60}".to_owned()]));
        assert_eq!(field, "rank_pattern");
        assert!(
            message.contains("too large") && message.contains("65536"),
            "{message}"
        );
        let (_, message) = refusal(&with_rank_patterns(&["x".repeat(MAX_PATTERN_BYTES + 1)]));
        assert!(message.contains("the limit is 256 bytes"), "{message}");

        // At the limit: accepted; a stored config compiles nothing until asked.
        let realistic: Vec<String> = (0..MAX_PATTERNS)
            .map(|i| format!(r"model\.layers\.{i}\.self_attn\.(q|k|v|o)_proj"))
            .collect();
        let json = with_rank_patterns(&realistic);
        let parsed = AdapterConfig::parse(&json).unwrap();
        assert!(parsed.compiled.0.get().is_some());
        let stored = AdapterConfig::parse_stored(&json).unwrap();
        assert!(
            stored.compiled.0.get().is_none(),
            "listing compiles nothing"
        );
        assert_eq!(stored.rank_for("model.layers.7.self_attn.k_proj"), 2);
        assert_eq!(stored.rank_for("model.layers.7.mlp.down_proj"), 8);
        assert!(
            stored.compiled.0.get().is_some(),
            "compiled once, on first use"
        );
        assert_eq!(stored, parsed);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = AdapterConfig::parse(s.as_bytes());
            let _ = AdapterConfig::parse_stored(s.as_bytes());
        }
    }
}
