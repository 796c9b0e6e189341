//! Pre-flight from metadata alone: the refusals a pair earns and, when it ports, the plan
//! (which base tensor each LoRA pair lands on, with which scale) and the merged model's
//! layout as composed files.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use patchport_core::adapter::AdapterConfig;
use patchport_core::layout::{
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CONFIG, SHARD_INDEX, ShardIndex, is_safetensors,
    validate_path,
};
use patchport_core::model_config::ModelConfig;
use patchport_core::port::{Refusal, RefusalKind};
use patchport_core::safetensors::{Dtype, TensorInfo, dtype_size};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::numeric::is_float;
use crate::source::{FileHeader, ModelSource, read_header, read_small};

use patchport_core::adapter::{AdapterKey, classify};

/// One target module of a patch that ports: where its LoRA pair is and which base
/// tensor it is added to.
#[derive(Debug, Clone, PartialEq)]
pub struct ModulePlan {
    /// Base module name (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// The base weight the delta is added to (`<module>.weight`).
    pub base_tensor: String,
    /// The new base's file holding it.
    pub new_file: String,
    /// Its absolute byte range in that file.
    pub new_range: (u64, u64),
    /// The old base's file holding it.
    pub old_file: String,
    /// Its absolute byte range there.
    pub old_range: (u64, u64),
    /// The old base's dtype of it.
    pub old_dtype: Dtype,
    /// The adapter tensor `A` (`[rank, in]`).
    pub lora_a: TensorInfo,
    /// The adapter tensor `B` (`[out, rank]`).
    pub lora_b: TensorInfo,
    /// The rank.
    pub rank: u32,
    /// The alpha (after `alpha_pattern`).
    pub alpha: f64,
    /// `s`: `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA.
    pub scale: f64,
    /// The base weight is stored `[in, out]` (`fan_in_fan_out`, embeddings): add `(B·A)ᵀ`.
    pub transpose: bool,
    /// The new base weight's dtype (the merged tensor's).
    pub dtype: Dtype,
    /// The new base weight's shape.
    pub shape: Vec<u64>,
}

/// A part of a composed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Piece {
    /// Bytes `[begin, end)` of a file of the new base.
    Source {
        /// The new base's file.
        file: String,
        /// First byte.
        begin: u64,
        /// One past the last byte.
        end: u64,
    },
    /// A merged tensor's bytes, as handed to the [`crate::MergedSink`].
    Merged {
        /// The tensor name.
        tensor: String,
        /// Its size in bytes.
        len: u64,
    },
}

impl Piece {
    /// The number of bytes.
    pub fn len(&self) -> u64 {
        match self {
            Piece::Source { begin, end, .. } => end - begin,
            Piece::Merged { len, .. } => *len,
        }
    }

    /// True for an empty piece.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One file of the merged model: `header` followed by `pieces`. A file the patch does not
/// touch is a single [`Piece::Source`] of the whole base file with an empty header; a
/// weights file the patch touches has the new base's tensors (merged ones have the same
/// dtype and shape), its untouched tensors as byte ranges of the base file followed by
/// the merged tensors (see `compose_weights`), so every byte outside the header and the
/// merged tensors is the base's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComposedFile {
    /// Path relative to the model root.
    pub path: String,
    /// Leading bytes (the safetensors header, `u64` length + JSON), empty for a copy.
    pub header: Vec<u8>,
    /// What follows the header, in order.
    pub pieces: Vec<Piece>,
}

impl ComposedFile {
    /// The file size.
    pub fn len(&self) -> u64 {
        self.header.len() as u64 + self.pieces.iter().map(Piece::len).sum::<u64>()
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The merged tensors, in file order.
    pub fn merged_tensors(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Merged { tensor, .. } => Some(tensor.as_str()),
            Piece::Source { .. } => None,
        })
    }
}

/// What pre-flight decided, from metadata alone.
#[derive(Debug, Clone)]
pub struct Preflight {
    /// Every reason the pair must not be ported; empty when it ports.
    pub refusals: Vec<Refusal>,
    /// The target modules, in the order their weights appear in the new base's files.
    pub modules: Vec<ModulePlan>,
    /// The merged model's files (empty when refused).
    pub merged_files: Vec<ComposedFile>,
    /// The patch's files the ported adapter reuses byte for byte (all but
    /// `adapter_config.json`).
    pub adapter_files: Vec<String>,
    /// The parsed adapter config.
    pub adapter_config: AdapterConfig,
}

impl Preflight {
    /// True when nothing refuses the port.
    pub fn is_portable(&self) -> bool {
        self.refusals.is_empty()
    }
}

/// A base version's metadata: config and every weight tensor's location.
#[derive(Debug)]
struct BaseIndex {
    config: ModelConfig,
    weight_files: Vec<FileHeader>,
    tensors: HashMap<String, (usize, usize)>,
}

impl BaseIndex {
    fn load(src: &dyn ModelSource) -> Result<Self, EngineError> {
        let files = src.files();
        let has = |p: &str| files.iter().any(|f| f == p);
        if !has(MODEL_CONFIG) {
            return Err(EngineError::MissingFile {
                file: src.location(MODEL_CONFIG),
                hint: "a base model is a Hugging Face model directory with config.json at its root",
            });
        }
        let config = ModelConfig::parse(&read_small(src, MODEL_CONFIG)?).map_err(|e| {
            EngineError::BadConfig {
                file: src.location(MODEL_CONFIG),
                message: e.to_string(),
            }
        })?;
        let bad_layout = |message: String| EngineError::BadLayout {
            location: src.name(),
            message,
        };
        let index = if has(SHARD_INDEX) {
            Some(
                ShardIndex::parse(&read_small(src, SHARD_INDEX)?).map_err(|e| {
                    EngineError::BadConfig {
                        file: src.location(SHARD_INDEX),
                        message: e.to_string(),
                    }
                })?,
            )
        } else {
            None
        };
        let weight_paths: Vec<String> = match &index {
            Some(ix) => {
                let set: BTreeSet<&String> = ix.weight_map.values().collect();
                for p in &set {
                    validate_path(p).map_err(|e| bad_layout(format!("{SHARD_INDEX}: {e}")))?;
                    if !has(p) {
                        return Err(bad_layout(format!(
                            "{SHARD_INDEX} names shard {p:?}, which is not among the files"
                        )));
                    }
                }
                set.into_iter().cloned().collect()
            }
            None => files
                .iter()
                .filter(|f| !f.contains('/') && is_safetensors(f))
                .cloned()
                .collect(),
        };
        if weight_paths.is_empty() {
            return Err(EngineError::MissingFile {
                file: src.location("*.safetensors"),
                hint: "a base model needs its weights as .safetensors files",
            });
        }
        let mut weight_files = Vec::with_capacity(weight_paths.len());
        let mut tensors = HashMap::new();
        for (fi, path) in weight_paths.iter().enumerate() {
            let fh = read_header(src, path)?;
            for (ti, t) in fh.header.tensors.iter().enumerate() {
                if let Some((other, _)) = tensors.insert(t.name.clone(), (fi, ti)) {
                    return Err(bad_layout(format!(
                        "tensor {:?} is in both {:?} and {path:?}",
                        t.name, weight_paths[other]
                    )));
                }
            }
            weight_files.push(fh);
        }
        if let Some(ix) = &index {
            let shards: BTreeMap<String, BTreeSet<String>> = weight_files
                .iter()
                .map(|f| {
                    let names = f.header.tensors.iter().map(|t| t.name.clone()).collect();
                    (f.path.clone(), names)
                })
                .collect();
            ix.check(&shards).map_err(|e| bad_layout(e.to_string()))?;
        }
        Ok(Self {
            config,
            weight_files,
            tensors,
        })
    }

    fn tensor(&self, name: &str) -> Option<(&FileHeader, &TensorInfo)> {
        let &(fi, ti) = self.tensors.get(name)?;
        let f = &self.weight_files[fi];
        Some((f, &f.header.tensors[ti]))
    }
}

#[derive(Debug, Default)]
struct ModuleTensors {
    a: Option<TensorInfo>,
    b: Option<TensorInfo>,
    embedding: bool,
}

struct Refusals {
    list: Vec<Refusal>,
}

impl Refusals {
    fn push(&mut self, kind: RefusalKind, subject: &str, message: String) {
        if !self
            .list
            .iter()
            .any(|r| r.kind == kind && r.subject == subject)
        {
            self.list.push(Refusal::new(kind, subject, message));
        }
    }

    fn has_kind(&self, kind: RefusalKind) -> bool {
        self.list.iter().any(|r| r.kind == kind)
    }
}

fn shape_str(shape: &[u64]) -> String {
    let parts: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// Decides from metadata alone whether `patch` (trained on `old`) ports onto `new`, and
/// how: config refusals, architecture family, and per module the LoRA pair, its rank,
/// the target weight's presence, dtype and shape in both bases.
pub fn preflight(
    old: &dyn ModelSource,
    new: &dyn ModelSource,
    patch: &dyn ModelSource,
) -> Result<Preflight, EngineError> {
    let patch_files = patch.files();
    if !patch_files.iter().any(|f| f == ADAPTER_CONFIG) {
        return Err(EngineError::MissingFile {
            file: patch.location(ADAPTER_CONFIG),
            hint: "a patch is a PEFT adapter directory (save_pretrained output)",
        });
    }
    let cfg = AdapterConfig::parse(&read_small(patch, ADAPTER_CONFIG)?).map_err(|e| {
        EngineError::BadConfig {
            file: patch.location(ADAPTER_CONFIG),
            message: e.to_string(),
        }
    })?;
    let adapter_files: Vec<String> = patch_files
        .iter()
        .filter(|f| *f != ADAPTER_CONFIG)
        .cloned()
        .collect();
    let mut refusals = Refusals {
        list: cfg.refusals(),
    };
    let done = |refusals: Refusals, cfg: AdapterConfig, adapter_files| {
        Ok(Preflight {
            refusals: refusals.list,
            modules: Vec::new(),
            merged_files: Vec::new(),
            adapter_files,
            adapter_config: cfg,
        })
    };
    if refusals.has_kind(RefusalKind::PeftType) {
        // Not LoRA: the tensors mean something else; nothing more to check.
        return done(refusals, cfg, adapter_files);
    }
    let old_ix = BaseIndex::load(old)?;
    let new_ix = BaseIndex::load(new)?;
    for m in old_ix.config.family_mismatches(&new_ix.config) {
        let field = m.split(':').next().unwrap_or("config").to_owned();
        refusals.push(
            RefusalKind::Architecture,
            &field,
            format!("the new base is a different architecture family ({m})"),
        );
    }
    if refusals.has_kind(RefusalKind::Architecture) {
        return done(refusals, cfg, adapter_files);
    }
    if !patch_files.iter().any(|f| f == ADAPTER_WEIGHTS) {
        return Err(EngineError::MissingFile {
            file: patch.location(ADAPTER_WEIGHTS),
            hint: "a patch needs its weights in adapter_model.safetensors",
        });
    }
    let weights = read_header(patch, ADAPTER_WEIGHTS)?;

    // Group the adapter tensors by module.
    let config_kinds: HashSet<RefusalKind> = refusals.list.iter().map(|r| r.kind).collect();
    let mut modules: BTreeMap<String, ModuleTensors> = BTreeMap::new();
    for t in &weights.header.tensors {
        match classify(&t.name) {
            AdapterKey::LoraA(m) | AdapterKey::EmbeddingA(m) => {
                let e = modules.entry(m.to_owned()).or_default();
                e.embedding |= matches!(classify(&t.name), AdapterKey::EmbeddingA(_));
                e.a = Some(t.clone());
            }
            AdapterKey::LoraB(m) | AdapterKey::EmbeddingB(m) => {
                let e = modules.entry(m.to_owned()).or_default();
                e.embedding |= matches!(classify(&t.name), AdapterKey::EmbeddingB(_));
                e.b = Some(t.clone());
            }
            AdapterKey::Magnitude(m) => {
                if !config_kinds.contains(&RefusalKind::Dora) {
                    refusals.push(
                        RefusalKind::Dora,
                        m,
                        format!(
                            "{}: a DoRA magnitude vector depends on the old base's weight norms",
                            t.name
                        ),
                    );
                }
            }
            AdapterKey::LoraBias(m) => {
                if !config_kinds.contains(&RefusalKind::LoraBias) {
                    refusals.push(
                        RefusalKind::LoraBias,
                        m,
                        format!(
                            "{}: a trained LoRA bias is not part of the s·B·A delta",
                            t.name
                        ),
                    );
                }
            }
            AdapterKey::Full(m) => {
                let listed = cfg
                    .modules_to_save
                    .iter()
                    .any(|s| m == s || m.ends_with(&format!(".{s}")));
                if listed || t.name.contains(".modules_to_save.") {
                    if !config_kinds.contains(&RefusalKind::ModulesToSave) {
                        refusals.push(
                            RefusalKind::ModulesToSave,
                            m,
                            format!(
                                "{}: a full trained copy of an old-base module (modules_to_save)",
                                t.name
                            ),
                        );
                    }
                } else if !(config_kinds.contains(&RefusalKind::LoraBias)
                    && t.name.ends_with(".bias"))
                {
                    refusals.push(
                        RefusalKind::UnknownTensor,
                        &t.name,
                        format!(
                            "{}: a full trained tensor, not a LoRA factor; porting it would \
                             replace the new base's tensor with an old-base copy",
                            t.name
                        ),
                    );
                }
            }
            AdapterKey::Unknown => refusals.push(
                RefusalKind::UnknownTensor,
                &t.name,
                format!("{}: not a LoRA A/B tensor under base_model.model.", t.name),
            ),
        }
    }
    if modules.is_empty() && refusals.list.is_empty() {
        refusals.push(
            RefusalKind::UnknownTensor,
            ADAPTER_WEIGHTS,
            "the adapter has no LoRA A/B tensors".to_owned(),
        );
    }

    let mut plans = Vec::new();
    for (module, mt) in &modules {
        if let Some(plan) = check_module(module, mt, &cfg, &old_ix, &new_ix, &mut refusals) {
            plans.push(plan);
        }
    }
    if !refusals.list.is_empty() {
        return done(refusals, cfg, adapter_files);
    }

    // Order the plan as the merged tensors appear in the new base's files.
    let file_pos: HashMap<&str, usize> = new_ix
        .weight_files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.path.as_str(), i))
        .collect();
    plans.sort_by_key(|p| (file_pos.get(p.new_file.as_str()).copied(), p.new_range.0));
    let merged_files = merged_layout(new, &new_ix, &plans)?;
    Ok(Preflight {
        refusals: refusals.list,
        modules: plans,
        merged_files,
        adapter_files,
        adapter_config: cfg,
    })
}

fn check_module(
    module: &str,
    mt: &ModuleTensors,
    cfg: &AdapterConfig,
    old_ix: &BaseIndex,
    new_ix: &BaseIndex,
    refusals: &mut Refusals,
) -> Option<ModulePlan> {
    let (Some(a), Some(b)) = (&mt.a, &mt.b) else {
        let (have, miss) = if mt.a.is_some() {
            ("A", "B")
        } else {
            ("B", "A")
        };
        refusals.push(
            RefusalKind::UnknownTensor,
            module,
            format!("{module}: the adapter has lora_{have} but no lora_{miss}"),
        );
        return None;
    };
    for t in [a, b] {
        if !is_float(t.dtype) {
            refusals.push(
                RefusalKind::UnknownTensor,
                &t.name,
                format!(
                    "{}: dtype {:?} is not a floating-point LoRA factor",
                    t.name, t.dtype
                ),
            );
            return None;
        }
    }
    if a.shape.len() != 2 || b.shape.len() != 2 {
        refusals.push(
            RefusalKind::Shape,
            module,
            format!(
                "{module}: LoRA factors {} and {} are not matrices (only Linear, Conv1D and \
                 Embedding LoRA is ported)",
                shape_str(&a.shape),
                shape_str(&b.shape)
            ),
        );
        return None;
    }
    // Linear: A [r, in], B [out, r]. Embedding: lora_embedding_A [r, num], _B [dim, r].
    let (rank, in_f, out_f) = (a.shape[0], a.shape[1], b.shape[0]);
    if b.shape[1] != rank {
        refusals.push(
            RefusalKind::Shape,
            module,
            format!(
                "{module}: lora_A {} and lora_B {} disagree on the rank",
                shape_str(&a.shape),
                shape_str(&b.shape)
            ),
        );
        return None;
    }
    let cfg_rank = cfg.rank_for(module);
    if u64::from(cfg_rank) != rank {
        refusals.push(
            RefusalKind::Shape,
            module,
            format!(
                "{module}: the factors have rank {rank} but adapter_config.json gives rank \
                 {cfg_rank}, so the scale would be wrong"
            ),
        );
        return None;
    }
    let transpose = mt.embedding || cfg.fan_in_fan_out;
    let want = if transpose {
        vec![in_f, out_f]
    } else {
        vec![out_f, in_f]
    };
    let base_tensor = format!("{module}.weight");
    let Some((new_file, new_t)) = new_ix.tensor(&base_tensor) else {
        refusals.push(
            RefusalKind::MissingModule,
            module,
            format!("{module}: the new base has no tensor {base_tensor}"),
        );
        return None;
    };
    let Some((old_file, old_t)) = old_ix.tensor(&base_tensor) else {
        refusals.push(
            RefusalKind::MissingModule,
            module,
            format!(
                "{module}: the old base has no tensor {base_tensor}; is it the base the patch \
                 was trained on?"
            ),
        );
        return None;
    };
    for (which, t) in [("new", new_t), ("old", old_t)] {
        if !is_float(t.dtype) {
            refusals.push(
                RefusalKind::Shape,
                module,
                format!(
                    "{module}: the {which} base stores {base_tensor} as {:?}; only F64, F32, F16 \
                     and BF16 weights can take the delta",
                    t.dtype
                ),
            );
            return None;
        }
        if t.shape != want {
            let layout = if transpose { "(B·A)ᵀ" } else { "B·A" };
            refusals.push(
                RefusalKind::Shape,
                module,
                format!(
                    "{module}: {layout} is {} but the {which} base's {base_tensor} is {}",
                    shape_str(&want),
                    shape_str(&t.shape)
                ),
            );
            return None;
        }
    }
    let rank = u32::try_from(rank).ok()?;
    Some(ModulePlan {
        module: module.to_owned(),
        base_tensor,
        new_file: new_file.path.clone(),
        new_range: (new_t.begin, new_t.end),
        old_file: old_file.path.clone(),
        old_range: (old_t.begin, old_t.end),
        old_dtype: old_t.dtype,
        lora_a: a.clone(),
        lora_b: b.clone(),
        rank,
        alpha: cfg.alpha_for(module),
        scale: cfg.scale_for(module),
        transpose,
        dtype: new_t.dtype,
        shape: new_t.shape.clone(),
    })
}

/// Other weight formats: copying them into a merged model would ship unmerged weights.
fn is_other_weights(path: &str) -> bool {
    const EXT: [&str; 10] = [
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".gguf",
        ".onnx",
        ".ot",
        ".safetensors",
    ];
    EXT.iter().any(|e| path.ends_with(e)) || path.ends_with(".bin.index.json")
}

/// The merged model: every weights file the patch touches with its merged tensors last;
/// every other top-level file copied.
fn merged_layout(
    new: &dyn ModelSource,
    new_ix: &BaseIndex,
    plans: &[ModulePlan],
) -> Result<Vec<ComposedFile>, EngineError> {
    let targets: HashSet<&str> = plans.iter().map(|p| p.base_tensor.as_str()).collect();
    let weights: HashMap<&str, &FileHeader> = new_ix
        .weight_files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    let mut out = Vec::new();
    for path in new.files() {
        if let Some(fh) = weights.get(path.as_str()) {
            let touched = fh
                .header
                .tensors
                .iter()
                .any(|t| targets.contains(t.name.as_str()));
            if touched {
                out.push(compose_weights(fh, &targets)?);
                continue;
            }
        } else if path.contains('/') || is_other_weights(&path) {
            continue;
        }
        let size = new.file_size(&path).map_err(|source| EngineError::Io {
            path: new.location(&path),
            source,
        })?;
        let pieces = if size == 0 {
            Vec::new()
        } else {
            vec![Piece::Source {
                file: path.clone(),
                begin: 0,
                end: size,
            }]
        };
        out.push(ComposedFile {
            path,
            header: Vec::new(),
            pieces,
        });
    }
    Ok(out)
}

/// A weights file the patch touches. The merged tensors move to the end of the file, in
/// the base's order, after every untouched tensor in the base's order (as runs of the
/// base file's bytes), under a header with the new offsets. Every port of a base that
/// targets the same tensors then shares all of the file but its tail, so a registry that
/// hashes the composed file (its digest covers every byte) hashes that shared beginning
/// once per base, not once per port (the q/k/v/o tail of bench/worker-cache's 1.4 GB
/// Llama file is 245 MB). The file keeps the base's tensors (names, dtypes, shapes)
/// and metadata, so loaders see the same model.
///
/// The base's own layout (its header bytes unchanged, merged tensors in place) is kept
/// when moving the tensors changes nothing, or would leave a tensor at an offset that is
/// not a multiple of its element size (loaders map tensors in place).
fn compose_weights(fh: &FileHeader, targets: &HashSet<&str>) -> Result<ComposedFile, EngineError> {
    let tensors = &fh.header.tensors;
    let (kept, merged): (Vec<&TensorInfo>, Vec<&TensorInfo>) = tensors
        .iter()
        .partition(|t| !targets.contains(t.name.as_str()));
    let order: Vec<&TensorInfo> = kept.iter().chain(&merged).copied().collect();
    let moved = order.iter().zip(tensors).any(|(a, b)| a.name != b.name);
    if !moved || !aligned(&order) {
        return Ok(compose_in_place(fh, targets));
    }
    let described: Vec<(String, Dtype, Vec<u64>)> = order
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let (header, _) = patchport_core::safetensors::write_header(&described, &fh.header.metadata)
        .map_err(|source| EngineError::BadSafetensors {
            file: fh.path.clone(),
            source,
        })?;
    let mut pieces = Vec::new();
    for t in &kept {
        push_source(&mut pieces, &fh.path, t.begin, t.end);
    }
    for t in &merged {
        pieces.push(Piece::Merged {
            tensor: t.name.clone(),
            len: t.end - t.begin,
        });
    }
    Ok(ComposedFile {
        path: fh.path.clone(),
        header,
        pieces,
    })
}

/// True when every tensor laid out contiguously in this order starts at a multiple of
/// its element size (the data section itself starts at a multiple of 8).
fn aligned(order: &[&TensorInfo]) -> bool {
    let mut at = 0u64;
    for t in order {
        let size = dtype_size(t.dtype).unwrap_or(1) as u64;
        if !at.is_multiple_of(size) {
            return false;
        }
        at += t.end - t.begin;
    }
    true
}

/// The base's layout: its header bytes, merged tensors where the base's were.
fn compose_in_place(fh: &FileHeader, targets: &HashSet<&str>) -> ComposedFile {
    let mut pieces = Vec::new();
    for t in &fh.header.tensors {
        if targets.contains(t.name.as_str()) {
            pieces.push(Piece::Merged {
                tensor: t.name.clone(),
                len: t.end - t.begin,
            });
        } else {
            push_source(&mut pieces, &fh.path, t.begin, t.end);
        }
    }
    ComposedFile {
        path: fh.path.clone(),
        header: fh.raw.clone(),
        pieces,
    }
}

/// Appends `[begin, end)` of `file`, extending the last piece when it ends there.
fn push_source(pieces: &mut Vec<Piece>, file: &str, begin: u64, end: u64) {
    if end == begin {
        return;
    }
    if let Some(Piece::Source {
        file: last,
        end: last_end,
        ..
    }) = pieces.last_mut()
        && last == file
        && *last_end == begin
    {
        *last_end = end;
        return;
    }
    pieces.push(Piece::Source {
        file: file.to_owned(),
        begin,
        end,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchport_core::safetensors::{parse_file_header, write_header};

    /// A file header for tensors of these dtypes and element counts, in this order.
    fn file_header(tensors: &[(&str, Dtype, u64)]) -> FileHeader {
        let described: Vec<_> = tensors
            .iter()
            .map(|(n, d, len)| ((*n).to_owned(), *d, vec![*len]))
            .collect();
        let meta = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
        let (raw, ranges) = write_header(&described, &meta).unwrap();
        let mut file = raw.clone();
        file.resize(ranges.last().unwrap().1 as usize, 0);
        FileHeader {
            path: "model.safetensors".to_owned(),
            header: parse_file_header(&file).unwrap(),
            raw,
        }
    }

    fn merged(c: &ComposedFile) -> Vec<&str> {
        c.merged_tensors().collect()
    }

    #[test]
    fn merged_tensors_move_last_under_a_header_with_the_same_tensors() {
        let fh = file_header(&[
            ("a", Dtype::BF16, 8),
            ("q", Dtype::BF16, 4),
            ("b", Dtype::F32, 2),
            ("v", Dtype::BF16, 4),
            ("c", Dtype::BF16, 4),
        ]);
        let c = compose_weights(&fh, &HashSet::from(["q", "v"])).unwrap();
        assert_eq!(merged(&c), ["q", "v"]);
        let t = |name: &str| fh.header.tensor(name).unwrap().clone();
        // The untouched tensors as runs of the base file, in the base's order.
        assert_eq!(
            c.pieces[..3],
            [
                Piece::Source {
                    file: fh.path.clone(),
                    begin: t("a").begin,
                    end: t("a").end
                },
                Piece::Source {
                    file: fh.path.clone(),
                    begin: t("b").begin,
                    end: t("b").end
                },
                Piece::Source {
                    file: fh.path.clone(),
                    begin: t("c").begin,
                    end: t("c").end
                },
            ]
        );
        let mut file = c.header.clone();
        file.resize(c.len() as usize, 0);
        let h = parse_file_header(&file).unwrap();
        assert_eq!(h.metadata, fh.header.metadata);
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "q", "v"]);
        for t in &h.tensors {
            let base = fh.header.tensor(&t.name).unwrap();
            assert_eq!((t.dtype, &t.shape), (base.dtype, &base.shape), "{}", t.name);
        }
    }

    #[test]
    fn the_base_layout_stays_when_nothing_moves_or_a_tensor_would_misalign() {
        // The targets are already last: the base's header bytes, unchanged.
        let fh = file_header(&[("a", Dtype::F32, 2), ("q", Dtype::F32, 2)]);
        let c = compose_weights(&fh, &HashSet::from(["q"])).unwrap();
        assert_eq!(c.header, fh.raw);
        // Moving q (3 bf16 = 6 bytes) after b would put the f32 b at byte 6.
        let fh = file_header(&[
            ("a", Dtype::F32, 2),
            ("q", Dtype::BF16, 3),
            ("pad", Dtype::BF16, 1),
            ("b", Dtype::F32, 2),
        ]);
        let c = compose_weights(&fh, &HashSet::from(["q"])).unwrap();
        assert_eq!(c.header, fh.raw);
        assert_eq!(merged(&c), ["q"]);
        assert_eq!(c.len(), fh.raw.len() as u64 + 8 + 6 + 2 + 8);
        assert!(matches!(c.pieces[1], Piece::Merged { .. }));
    }
    use patchport_core::adapter::PEFT_PREFIX;

    #[test]
    fn classifies_peft_keys() {
        let p = |s: &str| format!("{PEFT_PREFIX}{s}");
        assert_eq!(
            classify(&p("model.layers.0.self_attn.q_proj.lora_A.weight")),
            AdapterKey::LoraA("model.layers.0.self_attn.q_proj")
        );
        assert_eq!(
            classify(&p("transformer.h.0.attn.c_attn.lora_B.weight")),
            AdapterKey::LoraB("transformer.h.0.attn.c_attn")
        );
        assert_eq!(
            classify(&p("model.embed_tokens.lora_embedding_A")),
            AdapterKey::EmbeddingA("model.embed_tokens")
        );
        assert_eq!(
            classify(&p("model.layers.0.self_attn.q_proj.lora_magnitude_vector")),
            AdapterKey::Magnitude("model.layers.0.self_attn.q_proj")
        );
        assert_eq!(classify(&p("lm_head.weight")), AdapterKey::Full("lm_head"));
        assert_eq!(
            classify(&p("lm_head.modules_to_save.weight")),
            AdapterKey::Full("lm_head")
        );
        assert_eq!(
            classify(&p("model.layers.0.mlp.down_proj.ia3_l")),
            AdapterKey::Unknown
        );
        assert_eq!(
            classify("model.layers.0.q_proj.lora_A.weight"),
            AdapterKey::Unknown
        );
        assert_eq!(classify(&p("x.lora_A.default.weight")), AdapterKey::Unknown);
    }
}
