//! `Checkpoint.summary()`: shapes, formats, bytes by category and the GPU weight estimate.

use serde_json::{json, Map, Value};

use super::model::{Linear, Weight};
use super::quant_state::float_dtype_name;
use super::shards::dtype_name;
use super::Checkpoint;

#[derive(Default)]
struct Bytes {
    experts: u64,
    attention: u64,
    router: u64,
    embed: u64,
    lm_head: u64,
    norms_sinks_biases: u64,
}

#[derive(Default)]
struct Counts {
    nf4: u64,
    total: u64,
    nested: u64,
}

impl Counts {
    fn add(&mut self, w: &Weight) {
        self.total += 1;
        if let Weight::Nf4(t) = w {
            self.nf4 += 1;
            if t.nested.is_some() {
                self.nested += 1;
            }
        }
    }

    fn all_nf4(&self) -> bool {
        self.total > 0 && self.nf4 == self.total
    }

    /// `Some(true/false)` when uniform over the NF4 weights, `None` when none or mixed.
    fn nested(&self) -> Option<bool> {
        if self.nf4 == 0 {
            None
        } else if self.nested == self.nf4 {
            Some(true)
        } else if self.nested == 0 {
            Some(false)
        } else {
            None
        }
    }
}

fn bias_bytes(l: &Linear) -> u64 {
    l.bias.as_ref().map_or(0, |b| b.entry.nbytes() as u64)
}

fn bias_gpu(l: &Linear) -> u64 {
    l.bias.as_ref().map_or(0, |b| 2 * b.entry.numel() as u64)
}

/// Quant-map bytes a runtime keeps once per NF4 tensor (or fused group).
fn maps_gpu(w: &Weight) -> u64 {
    match w {
        Weight::Nf4(t) if t.nested.is_some() => 64 + 1024,
        Weight::Nf4(_) => 64,
        Weight::Plain(_) => 0,
    }
}

/// Builds the summary as a JSON object (see `Checkpoint.summary()` in Python for the fields).
pub fn summary(ck: &Checkpoint) -> Value {
    let c = &ck.config;
    let m = &ck.model;
    let mut b = Bytes::default();
    let mut gpu: u64 = 0;
    let mut attn = Counts::default();
    let mut experts = Counts::default();
    let mut nf4_dtypes: Vec<&'static str> = Vec::new();

    for layer in &m.layers {
        for lin in [&layer.attn.q, &layer.attn.k, &layer.attn.v, &layer.attn.o] {
            b.attention += lin.weight.stored_bytes() as u64;
            b.norms_sinks_biases += bias_bytes(lin);
            gpu += lin.weight.gpu_bytes() as u64 + maps_gpu(&lin.weight) + bias_gpu(lin);
            attn.add(&lin.weight);
        }
        b.router += layer.router.weight.stored_bytes() as u64;
        b.norms_sinks_biases += bias_bytes(&layer.router);
        gpu += layer.router.weight.gpu_bytes() as u64 + bias_gpu(&layer.router);
        for group in [&layer.gate_up, &layer.down] {
            if let Some(first) = group.first() {
                gpu += maps_gpu(&first.weight);
            }
            for lin in group {
                b.experts += lin.weight.stored_bytes() as u64;
                b.norms_sinks_biases += bias_bytes(lin);
                gpu += lin.weight.gpu_bytes() as u64 + bias_gpu(lin);
                experts.add(&lin.weight);
            }
        }
        for p in [
            &layer.input_layernorm,
            &layer.post_attention_layernorm,
            &layer.attn.sinks,
        ] {
            b.norms_sinks_biases += p.entry.nbytes() as u64;
            gpu += 2 * p.entry.numel() as u64;
        }
    }
    for (_, lin) in m.linears() {
        if let Weight::Nf4(t) = &lin.weight {
            let name = float_dtype_name(t.dtype);
            if !nf4_dtypes.contains(&name) {
                nf4_dtypes.push(name);
            }
        }
    }
    b.embed = m.embed.entry.nbytes() as u64;
    gpu += 2 * m.embed.entry.numel() as u64;
    b.norms_sinks_biases += m.norm.entry.nbytes() as u64;
    gpu += 2 * m.norm.entry.numel() as u64;
    if let Some(h) = &m.lm_head {
        b.lm_head = h.entry.nbytes() as u64;
        gpu += 2 * h.entry.numel() as u64;
    }

    let total = ck.shards.total_file_bytes();
    let tensor_bytes: u64 =
        b.experts + b.attention + b.router + b.embed + b.lm_head + b.norms_sinks_biases;
    let other = total.saturating_sub(tensor_bytes);

    let nested = match (attn.nested(), experts.nested()) {
        (Some(a), Some(e)) if a == e => json!(a),
        (None, Some(e)) if attn.nf4 == 0 => json!(e),
        (Some(a), None) if experts.nf4 == 0 => json!(a),
        (None, None) if attn.nf4 == 0 && experts.nf4 == 0 => json!(false),
        (a, e) => json!({"attention": a, "experts": e}),
    };
    let dtype = if nf4_dtypes.len() == 1 {
        nf4_dtypes
            .first()
            .copied()
            .unwrap_or("bfloat16")
            .to_string()
    } else {
        dtype_name(m.embed.entry.dtype).to_string()
    };

    let mut q = Map::new();
    if let Some(qc) = &c.quantization {
        q.insert("quant_method".into(), json!(qc.quant_method));
        q.insert("quant_type".into(), json!(qc.quant_type));
        q.insert("double_quant".into(), json!(qc.double_quant));
        q.insert("compute_dtype".into(), json!(qc.compute_dtype));
        q.insert("skip_modules".into(), json!(qc.skip_modules));
    }

    json!({
        "path": ck.dir.display().to_string(),
        "layers": c.num_layers,
        "experts": c.num_experts,
        "experts_per_token": c.experts_per_token,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "sliding_window": c.sliding_window,
        "layer_types": c.layer_types.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        "tie_word_embeddings": c.tie_word_embeddings,
        "nf4": {"attention": attn.all_nf4(), "experts": experts.all_nf4()},
        "nf4_counts": {
            "attention": {"nf4": attn.nf4, "total": attn.total},
            "experts": {"nf4": experts.nf4, "total": experts.total},
        },
        "nested": nested,
        "dtype": dtype,
        "bytes": {
            "experts": b.experts,
            "attention": b.attention,
            "router": b.router,
            "embed": b.embed,
            "lm_head": b.lm_head,
            "norms_sinks_biases": b.norms_sinks_biases,
            "other": other,
        },
        "total_file_bytes": total,
        "files": ck.shards.shards.len(),
        "tensors": ck.shards.tensors.len(),
        "gpu_weight_bytes": gpu,
        "quantization_config": Value::Object(q),
    })
}
