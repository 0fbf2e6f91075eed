//! The validated module inventory of an Unsloth GPT-OSS checkpoint.
//!
//! Every tensor the model needs is looked up by its exact key, its format decided from its own
//! keys (an NF4 quant state next to it or not) and its shape checked against the config. Every
//! tensor in the shards must be claimed by exactly one module: anything left over is an
//! [`Error::UnexpectedTensor`].
//!
//! Keys (L = layer, e = expert):
//! - `model.embed_tokens.weight` `[vocab, H]`, `model.norm.weight` `[H]`, `lm_head.weight`
//!   `[vocab, H]` (absent only with `tie_word_embeddings`);
//! - `model.layers.L.input_layernorm.weight`, `model.layers.L.post_attention_layernorm.weight` `[H]`;
//! - `model.layers.L.self_attn.{q,k,v,o}_proj.{weight,bias}`: q `[heads*hd, H]`, k/v
//!   `[kv*hd, H]`, o `[H, heads*hd]` (NF4 or plain), and `model.layers.L.self_attn.sinks` `[heads]`;
//! - `model.layers.L.mlp.router.linear.{weight,bias}` `[E, H]`, `[E]` (plain);
//! - `model.layers.L.mlp.experts.gate_up_projs.e.{weight,bias}` `[2I, H]`, `[2I]` (rows
//!   interleaved: 2j gate, 2j+1 up) and `...down_projs.e.{weight,bias}` `[H, I]`, `[H]`.
//!
//! Norms, sinks, biases, router, embeddings and lm_head must be unquantized float tensors.

use std::collections::HashSet;

use safetensors::Dtype;

use super::config::{LayerType, ModelConfig};
use super::quant_state::{Nf4Tensor, FP4_STATE_SUFFIX, NF4_STATE_SUFFIX};
use super::shards::{describe, ShardSet, TensorEntry};
use crate::error::{Error, Result};

/// An unquantized tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct PlainTensor {
    /// Its key.
    pub key: String,
    /// Where it lives.
    pub entry: TensorEntry,
}

/// A Linear weight: NF4 or unquantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Weight {
    /// bitsandbytes NF4.
    Nf4(Box<Nf4Tensor>),
    /// Stored as is (bf16/f16/f32).
    Plain(PlainTensor),
}

impl Weight {
    /// The weight key.
    pub fn key(&self) -> &str {
        match self {
            Weight::Nf4(t) => &t.key,
            Weight::Plain(p) => &p.key,
        }
    }

    /// Whether it is NF4.
    pub fn is_nf4(&self) -> bool {
        matches!(self, Weight::Nf4(_))
    }

    /// Number of elements of the (logical) weight.
    pub fn numel(&self) -> usize {
        match self {
            Weight::Nf4(t) => t.numel,
            Weight::Plain(p) => p.entry.numel(),
        }
    }

    /// Bytes as stored in the files (all component tensors).
    pub fn stored_bytes(&self) -> usize {
        match self {
            Weight::Nf4(t) => t.stored_bytes(),
            Weight::Plain(p) => p.entry.nbytes(),
        }
    }

    /// Bytes on the GPU as our runtime stores it: NF4 buffers as they are, anything else bf16.
    pub fn gpu_bytes(&self) -> usize {
        match self {
            Weight::Nf4(t) => t.gpu_bytes(),
            Weight::Plain(p) => p.entry.numel() * 2,
        }
    }
}

/// A Linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `<module>.weight`.
    pub weight: Weight,
    /// `<module>.bias`, when the module has one.
    pub bias: Option<PlainTensor>,
}

/// Attention weights of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    /// `q_proj` `[heads*hd, H]`.
    pub q: Linear,
    /// `k_proj` `[kv*hd, H]`.
    pub k: Linear,
    /// `v_proj` `[kv*hd, H]`.
    pub v: Linear,
    /// `o_proj` `[H, heads*hd]`.
    pub o: Linear,
    /// `sinks` `[heads]`.
    pub sinks: PlainTensor,
}

/// One decoder layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// Sliding or full attention.
    pub layer_type: LayerType,
    /// `input_layernorm.weight` `[H]`.
    pub input_layernorm: PlainTensor,
    /// `post_attention_layernorm.weight` `[H]`.
    pub post_attention_layernorm: PlainTensor,
    /// Attention projections and sinks.
    pub attn: Attention,
    /// `mlp.router.linear` `[E, H]` + bias `[E]`.
    pub router: Linear,
    /// `mlp.experts.gate_up_projs.e`, index = expert.
    pub gate_up: Vec<Linear>,
    /// `mlp.experts.down_projs.e`, index = expert.
    pub down: Vec<Linear>,
}

/// The whole validated model.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Decoder layers.
    pub layers: Vec<Layer>,
    /// `model.embed_tokens.weight`.
    pub embed: PlainTensor,
    /// `model.norm.weight`.
    pub norm: PlainTensor,
    /// `lm_head.weight` (None when tied to the embeddings).
    pub lm_head: Option<PlainTensor>,
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

struct Resolver<'a> {
    shards: &'a ShardSet,
    config: &'a ModelConfig,
    consumed: HashSet<String>,
}

/// What to add to a "missing" message when the checkpoint looks like another known layout.
fn layout_hint(shards: &ShardSet, key: &str) -> String {
    let probes: [(&str, &str); 3] = [
        (
            ".mlp.experts.gate_up_proj",
            "the Hugging Face fused expert layout",
        ),
        (".mlp.router.weight", "the Hugging Face router layout"),
        (".mlp.experts.gate_up_proj_blocks", "OpenAI's MXFP4 layout"),
    ];
    if let Some(layer) = key
        .strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
    {
        for (suffix, what) in probes {
            let probe = format!("model.layers.{layer}{suffix}");
            if shards.get(&probe).is_some() {
                return format!(
                    "; found '{probe}', which is {what}: only Unsloth's per-expert bnb-4bit \
                     layout is supported"
                );
            }
        }
    }
    String::new()
}

impl Resolver<'_> {
    fn missing(&self, key: &str, what: &str) -> Error {
        Error::MissingTensor {
            key: key.to_string(),
            context: format!("{what}{}", layout_hint(self.shards, key)),
        }
    }

    /// An unquantized float tensor of exactly `shape`.
    fn plain(&mut self, key: &str, shape: &[usize], what: &str) -> Result<PlainTensor> {
        let entry = self
            .shards
            .get(key)
            .ok_or_else(|| self.missing(key, &format!("{what}, float {shape:?}")))?;
        if self
            .shards
            .get(&format!("{key}{NF4_STATE_SUFFIX}"))
            .is_some()
            || self
                .shards
                .get(&format!("{key}{FP4_STATE_SUFFIX}"))
                .is_some()
        {
            return Err(Error::tensor(
                key,
                format!("an unquantized float tensor {shape:?} ({what} is never quantized)"),
                "a bitsandbytes 4-bit quantized tensor",
            ));
        }
        if !is_float(entry.dtype) || entry.shape != shape {
            return Err(Error::tensor(
                key,
                format!("bfloat16/float16/float32 {shape:?} ({what})"),
                describe(entry.dtype, &entry.shape),
            ));
        }
        self.consumed.insert(key.to_string());
        Ok(PlainTensor {
            key: key.to_string(),
            entry: entry.clone(),
        })
    }

    /// A Linear weight of logical shape `[out, inp]`: NF4 (when its quant state is present) or
    /// a plain float tensor.
    fn weight(&mut self, key: &str, out: usize, inp: usize, what: &str) -> Result<Weight> {
        let fp4 = format!("{key}{FP4_STATE_SUFFIX}");
        if self.shards.get(&fp4).is_some() {
            return Err(Error::tensor(
                fp4,
                "nf4 (bitsandbytes__nf4 quant state)",
                "fp4 (bitsandbytes__fp4 quant state)",
            ));
        }
        if self
            .shards
            .get(&format!("{key}{NF4_STATE_SUFFIX}"))
            .is_some()
        {
            let t = Nf4Tensor::resolve(self.shards, key, &mut self.consumed)?;
            if t.shape != [out, inp] {
                return Err(Error::tensor(
                    format!("{key}{NF4_STATE_SUFFIX}"),
                    format!("shape [{out}, {inp}] ({what})"),
                    format!("shape {:?}", t.shape),
                ));
            }
            return Ok(Weight::Nf4(Box::new(t)));
        }
        let entry = self.shards.get(key).ok_or_else(|| {
            self.missing(key, &format!("{what}: NF4 or float [{out}, {inp}] weight"))
        })?;
        if entry.dtype == Dtype::U8 {
            return Err(Error::tensor(
                key,
                format!(
                    "a float [{out}, {inp}] weight, or NF4 data with '{key}{NF4_STATE_SUFFIX}' \
                     ({what})"
                ),
                format!("{} and no quant state", describe(entry.dtype, &entry.shape)),
            ));
        }
        Ok(Weight::Plain(self.plain(key, &[out, inp], what)?))
    }

    fn linear(
        &mut self,
        prefix: &str,
        out: usize,
        inp: usize,
        allow_nf4: bool,
        what: &str,
    ) -> Result<Linear> {
        let wkey = format!("{prefix}.weight");
        let weight = if allow_nf4 {
            self.weight(&wkey, out, inp, what)?
        } else {
            Weight::Plain(self.plain(&wkey, &[out, inp], what)?)
        };
        let bias = self.plain(
            &format!("{prefix}.bias"),
            &[out],
            &format!("bias of {what}"),
        )?;
        Ok(Linear {
            weight,
            bias: Some(bias),
        })
    }

    fn layer(&mut self, l: usize, layer_type: LayerType) -> Result<Layer> {
        let c = self.config;
        let (h, i, e) = (c.hidden_size, c.intermediate_size, c.num_experts);
        let q_out = c.num_heads * c.head_dim;
        let kv_out = c.num_kv_heads * c.head_dim;
        let p = format!("model.layers.{l}");
        let input_layernorm = self.plain(
            &format!("{p}.input_layernorm.weight"),
            &[h],
            "input RMSNorm weight",
        )?;
        let post_attention_layernorm = self.plain(
            &format!("{p}.post_attention_layernorm.weight"),
            &[h],
            "post-attention RMSNorm weight",
        )?;
        let attn = Attention {
            q: self.linear(&format!("{p}.self_attn.q_proj"), q_out, h, true, "q_proj")?,
            k: self.linear(&format!("{p}.self_attn.k_proj"), kv_out, h, true, "k_proj")?,
            v: self.linear(&format!("{p}.self_attn.v_proj"), kv_out, h, true, "v_proj")?,
            o: self.linear(&format!("{p}.self_attn.o_proj"), h, q_out, true, "o_proj")?,
            sinks: self.plain(
                &format!("{p}.self_attn.sinks"),
                &[c.num_heads],
                "attention sinks (one per query head)",
            )?,
        };
        let router = self.linear(&format!("{p}.mlp.router.linear"), e, h, false, "router")?;
        let mut gate_up = Vec::with_capacity(e);
        let mut down = Vec::with_capacity(e);
        for x in 0..e {
            gate_up.push(self.linear(
                &format!("{p}.mlp.experts.gate_up_projs.{x}"),
                2 * i,
                h,
                true,
                &format!("expert {x} gate_up_proj of layer {l}"),
            )?);
        }
        for x in 0..e {
            down.push(self.linear(
                &format!("{p}.mlp.experts.down_projs.{x}"),
                h,
                i,
                true,
                &format!("expert {x} down_proj of layer {l}"),
            )?);
        }
        Ok(Layer {
            layer_type,
            input_layernorm,
            post_attention_layernorm,
            attn,
            router,
            gate_up,
            down,
        })
    }
}

/// Why a leftover key is unexpected, as precisely as we can tell.
fn unexpected_context(config: &ModelConfig, key: &str) -> String {
    let layout = format!(
        "not part of the Unsloth GPT-OSS layout for this config ({} layers, {} experts)",
        config.num_layers, config.num_experts
    );
    let Some(rest) = key.strip_prefix("model.layers.") else {
        return layout;
    };
    let mut parts = rest.split('.');
    let layer = parts.next().and_then(|s| s.parse::<usize>().ok());
    if let Some(l) = layer {
        if l >= config.num_layers {
            return format!(
                "layer index {l} is out of range: num_hidden_layers is {}",
                config.num_layers
            );
        }
    }
    let tail: Vec<&str> = parts.collect();
    if let [_, "experts", kind, idx, ..] = tail.as_slice() {
        if (*kind == "gate_up_projs" || *kind == "down_projs") && idx.parse::<usize>().is_ok() {
            if let Ok(x) = idx.parse::<usize>() {
                if x >= config.num_experts {
                    return format!(
                        "expert index {x} is out of range: num_local_experts is {}",
                        config.num_experts
                    );
                }
            }
        }
    }
    layout
}

impl Model {
    /// Builds and validates the inventory of `shards` for `config`.
    pub fn resolve(config: &ModelConfig, shards: &ShardSet) -> Result<Model> {
        let mut r = Resolver {
            shards,
            config,
            consumed: HashSet::new(),
        };
        let (h, v) = (config.hidden_size, config.vocab_size);
        let embed = r.plain("model.embed_tokens.weight", &[v, h], "token embeddings")?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for (l, t) in config.layer_types.iter().enumerate() {
            layers.push(r.layer(l, *t)?);
        }
        let norm = r.plain("model.norm.weight", &[h], "final RMSNorm weight")?;
        let lm_head = if config.tie_word_embeddings && shards.get("lm_head.weight").is_none() {
            None
        } else {
            Some(r.plain("lm_head.weight", &[v, h], "lm_head")?)
        };

        let leftovers: Vec<&String> = shards
            .tensors
            .keys()
            .filter(|k| !r.consumed.contains(*k))
            .collect();
        if let Some(first) = leftovers.first() {
            let more = if leftovers.len() > 1 {
                format!(" (and {} more unexpected tensors)", leftovers.len() - 1)
            } else {
                String::new()
            };
            let file = shards
                .get(first)
                .map(|e| shards.file_name(e))
                .unwrap_or_default();
            return Err(Error::UnexpectedTensor {
                key: (*first).clone(),
                context: format!("in {file}: {}{more}", unexpected_context(config, first)),
            });
        }
        Ok(Model {
            layers,
            embed,
            norm,
            lm_head,
        })
    }

    /// Every Linear of the model, with a category name
    /// (`"attention"`, `"experts"`, `"router"`).
    pub fn linears(&self) -> impl Iterator<Item = (&'static str, &Linear)> {
        self.layers.iter().flat_map(|l| {
            let a = &l.attn;
            [&a.q, &a.k, &a.v, &a.o]
                .into_iter()
                .map(|x| ("attention", x))
                .chain(std::iter::once(("router", &l.router)))
                .chain(l.gate_up.iter().map(|x| ("experts", x)))
                .chain(l.down.iter().map(|x| ("experts", x)))
        })
    }

    /// Finds the Linear weight stored under `key` (`<module>.weight`).
    pub fn find_weight(&self, key: &str) -> Option<&Weight> {
        self.linears()
            .map(|(_, l)| &l.weight)
            .find(|w| w.key() == key)
    }
}
