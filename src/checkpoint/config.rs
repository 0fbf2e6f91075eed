//! `config.json`: recognising GPT-OSS and reading the sizes every later check relies on.
//!
//! Key names follow transformers' `GptOssConfig`. The experts-per-token count is
//! `num_experts_per_tok` there; OpenAI's original config also carries `experts_per_token`, so
//! either is accepted (they must agree when both are present; transformers' default 4 applies when
//! neither is). `head_dim` defaults to `hidden_size / num_attention_heads`, `layer_types` to the
//! alternating sliding/full pattern starting with sliding, as transformers does. All size keys
//! without a safe default (hidden, intermediate, layers, experts, heads, kv heads, vocab) are
//! required.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Upper bound on any single config dimension; keeps every size product far from overflow.
const MAX_DIM: u64 = 1 << 24;

/// Attention pattern of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Sliding-window attention (`"sliding_attention"`).
    Sliding,
    /// Full causal attention (`"full_attention"`).
    Full,
}

impl LayerType {
    /// The transformers spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerType::Sliding => "sliding_attention",
            LayerType::Full => "full_attention",
        }
    }
}

/// The bitsandbytes `quantization_config` block (informational: each tensor's own keys decide
/// its format, this only has to be consistent with NF4).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantConfig {
    /// `quant_method`, always `"bitsandbytes"` once validated.
    pub quant_method: String,
    /// `load_in_4bit` (or Unsloth's `_load_in_4bit`).
    pub load_in_4bit: bool,
    /// `bnb_4bit_quant_type` (`"nf4"` once validated).
    pub quant_type: String,
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`, if given.
    pub compute_dtype: Option<String>,
    /// `llm_int8_skip_modules` (modules left unquantized).
    pub skip_modules: Vec<String>,
}

/// The validated GPT-OSS configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `hidden_size` (H).
    pub hidden_size: usize,
    /// `intermediate_size` (I), per expert.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_local_experts` (E).
    pub num_experts: usize,
    /// `num_experts_per_tok` / `experts_per_token` (top-k).
    pub experts_per_token: usize,
    /// `num_attention_heads`.
    pub num_heads: usize,
    /// `num_key_value_heads`.
    pub num_kv_heads: usize,
    /// `head_dim`.
    pub head_dim: usize,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `sliding_window`, `None` when null/absent and no layer slides.
    pub sliding_window: Option<usize>,
    /// One entry per layer.
    pub layer_types: Vec<LayerType>,
    /// `tie_word_embeddings` (GPT-OSS: false, so `lm_head.weight` is required).
    pub tie_word_embeddings: bool,
    /// `torch_dtype` / `dtype`, if given.
    pub torch_dtype: Option<String>,
    /// The bitsandbytes block, if any.
    pub quantization: Option<QuantConfig>,
}

fn get_dim(obj: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let n = v.as_u64().ok_or_else(|| {
                Error::Config(format!("'{key}': expected a positive integer, found {v}"))
            })?;
            if n == 0 || n > MAX_DIM {
                return Err(Error::Config(format!(
                    "'{key}': expected a positive integer at most {MAX_DIM}, found {n}"
                )));
            }
            usize::try_from(n)
                .map(Some)
                .map_err(|_| Error::Config(format!("'{key}': {n} does not fit this platform")))
        }
    }
}

fn require_dim(obj: &Map<String, Value>, key: &str) -> Result<usize> {
    get_dim(obj, key)?.ok_or_else(|| {
        Error::Config(format!(
            "'{key}': expected a positive integer, found nothing (key missing)"
        ))
    })
}

fn get_bool(obj: &Map<String, Value>, key: &str, what: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(Error::Config(format!(
            "{what}'{key}': expected true or false, found {v}"
        ))),
    }
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str, what: &str) -> Result<Option<&'a str>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(Error::Config(format!(
            "{what}'{key}': expected a string, found {v}"
        ))),
    }
}

fn is_gpt_oss(obj: &Map<String, Value>) -> Result<()> {
    let model_type = get_str(obj, "model_type", "")?;
    let arch_ok = match obj.get("architectures") {
        Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some("GptOssForCausalLM")),
        _ => false,
    };
    if model_type == Some("gpt_oss") || arch_ok {
        return Ok(());
    }
    let found_arch = obj
        .get("architectures")
        .map(|v| v.to_string())
        .unwrap_or_else(|| "none".to_string());
    Err(Error::Config(format!(
        "not a GPT-OSS model: expected model_type 'gpt_oss' or architectures containing \
         'GptOssForCausalLM', found model_type {} and architectures {found_arch}",
        model_type.map_or_else(|| "none".to_string(), |s| format!("'{s}'"))
    )))
}

fn parse_quant(obj: &Map<String, Value>) -> Result<Option<QuantConfig>> {
    let q = match obj.get("quantization_config") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(q)) => q,
        Some(v) => {
            return Err(Error::Config(format!(
                "'quantization_config': expected an object, found {v}"
            )))
        }
    };
    let what = "quantization_config.";
    let method = get_str(q, "quant_method", what)?.unwrap_or("none");
    if method != "bitsandbytes" {
        return Err(Error::Config(format!(
            "quantization_config.quant_method: expected 'bitsandbytes', found '{method}'"
        )));
    }
    let load4 = match get_bool(q, "load_in_4bit", what)? {
        Some(b) => b,
        None => get_bool(q, "_load_in_4bit", what)?.unwrap_or(false),
    };
    let load8 = match get_bool(q, "load_in_8bit", what)? {
        Some(b) => b,
        None => get_bool(q, "_load_in_8bit", what)?.unwrap_or(false),
    };
    if !load4 || load8 {
        return Err(Error::Config(format!(
            "quantization_config: expected load_in_4bit true and load_in_8bit false, found \
             load_in_4bit {load4} and load_in_8bit {load8}"
        )));
    }
    let quant_type = get_str(q, "bnb_4bit_quant_type", what)?.unwrap_or("fp4");
    if quant_type != "nf4" {
        return Err(Error::Config(format!(
            "quantization_config.bnb_4bit_quant_type: expected 'nf4', found '{quant_type}'"
        )));
    }
    let double_quant = get_bool(q, "bnb_4bit_use_double_quant", what)?.unwrap_or(false);
    let compute_dtype = get_str(q, "bnb_4bit_compute_dtype", what)?.map(str::to_string);
    let skip_modules = match q.get("llm_int8_skip_modules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    Error::Config(format!(
                        "quantization_config.llm_int8_skip_modules: expected a list of strings, \
                         found an element {v}"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?,
        Some(v) => {
            return Err(Error::Config(format!(
                "quantization_config.llm_int8_skip_modules: expected a list of strings, found {v}"
            )))
        }
    };
    Ok(Some(QuantConfig {
        quant_method: method.to_string(),
        load_in_4bit: load4,
        quant_type: quant_type.to_string(),
        double_quant,
        compute_dtype,
        skip_modules,
    }))
}

impl ModelConfig {
    /// Parses and validates the text of `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Json {
            what: "config.json".to_string(),
            message: e.to_string(),
        })?;
        Self::from_value(&value)
    }

    /// Validates an already parsed `config.json`.
    pub fn from_value(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| {
            Error::Config(format!(
                "expected a JSON object, found {}",
                json_kind(value)
            ))
        })?;
        is_gpt_oss(obj)?;

        let hidden_size = require_dim(obj, "hidden_size")?;
        let intermediate_size = require_dim(obj, "intermediate_size")?;
        let num_layers = require_dim(obj, "num_hidden_layers")?;
        let num_experts = require_dim(obj, "num_local_experts")?;
        let num_heads = require_dim(obj, "num_attention_heads")?;
        let num_kv_heads = require_dim(obj, "num_key_value_heads")?;
        let vocab_size = require_dim(obj, "vocab_size")?;
        let head_dim = match get_dim(obj, "head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(Error::Config(format!(
                        "'head_dim' is missing and hidden_size {hidden_size} is not divisible by \
                         num_attention_heads {num_heads}"
                    )));
                }
                hidden_size / num_heads
            }
        };
        let k_new = get_dim(obj, "num_experts_per_tok")?;
        let k_old = get_dim(obj, "experts_per_token")?;
        let experts_per_token = match (k_new, k_old) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::Config(format!(
                    "'num_experts_per_tok' is {a} but 'experts_per_token' is {b}; expected equal"
                )))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => 4,
        };
        if experts_per_token > num_experts {
            return Err(Error::Config(format!(
                "'num_experts_per_tok': expected at most num_local_experts {num_experts}, found \
                 {experts_per_token}"
            )));
        }
        if num_heads % num_kv_heads != 0 {
            return Err(Error::Config(format!(
                "'num_key_value_heads': expected a divisor of num_attention_heads {num_heads}, \
                 found {num_kv_heads}"
            )));
        }

        let layer_types = match obj.get("layer_types") {
            None | Some(Value::Null) => (0..num_layers)
                .map(|i| {
                    if i % 2 == 0 {
                        LayerType::Sliding
                    } else {
                        LayerType::Full
                    }
                })
                .collect::<Vec<_>>(),
            Some(Value::Array(a)) => {
                if a.len() != num_layers {
                    return Err(Error::Config(format!(
                        "'layer_types': expected {num_layers} entries (num_hidden_layers), found {}",
                        a.len()
                    )));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, v)| match v.as_str() {
                        Some("sliding_attention") => Ok(LayerType::Sliding),
                        Some("full_attention") => Ok(LayerType::Full),
                        _ => Err(Error::Config(format!(
                            "'layer_types[{i}]': expected 'sliding_attention' or \
                             'full_attention', found {v}"
                        ))),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            Some(v) => {
                return Err(Error::Config(format!(
                    "'layer_types': expected a list of strings, found {v}"
                )))
            }
        };
        let sliding_window = get_dim(obj, "sliding_window")?;
        if sliding_window.is_none() && layer_types.contains(&LayerType::Sliding) {
            return Err(Error::Config(
                "'sliding_window': expected a positive integer because layer_types has sliding \
                 layers, found nothing"
                    .to_string(),
            ));
        }
        let tie_word_embeddings = get_bool(obj, "tie_word_embeddings", "")?.unwrap_or(false);
        let torch_dtype = match get_str(obj, "torch_dtype", "")? {
            Some(s) => Some(s.to_string()),
            None => get_str(obj, "dtype", "")?.map(str::to_string),
        };
        let quantization = parse_quant(obj)?;

        Ok(ModelConfig {
            hidden_size,
            intermediate_size,
            num_layers,
            num_experts,
            experts_per_token,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            sliding_window,
            layer_types,
            tie_word_embeddings,
            torch_dtype,
            quantization,
        })
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 4,
            "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
            "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
            "vocab_size": 201088, "sliding_window": 128,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "quantization_config": {
                "_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": "bfloat16",
                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true,
                "llm_int8_skip_modules": ["router", "lm_head", "embed_tokens"],
                "load_in_4bit": true, "load_in_8bit": false, "quant_method": "bitsandbytes"
            }
        })
    }

    #[test]
    fn parses_gpt_oss_20b_shape() -> Result<()> {
        let c = ModelConfig::from_value(&base())?;
        assert_eq!(c.hidden_size, 2880);
        assert_eq!(c.num_experts, 32);
        assert_eq!(c.experts_per_token, 4);
        assert_eq!(c.layer_types[1], LayerType::Full);
        assert_eq!(c.sliding_window, Some(128));
        let q = c
            .quantization
            .ok_or_else(|| Error::Config("no quant".into()))?;
        assert!(q.double_quant);
        assert_eq!(q.skip_modules.len(), 3);
        Ok(())
    }

    #[test]
    fn defaults_follow_transformers() -> Result<()> {
        let mut v = base();
        if let Some(o) = v.as_object_mut() {
            o.remove("layer_types");
            o.remove("head_dim");
            o.remove("num_experts_per_tok");
            o.remove("experts_per_token");
            o.remove("quantization_config");
        }
        let c = ModelConfig::from_value(&v)?;
        assert_eq!(c.head_dim, 2880 / 64);
        assert_eq!(c.experts_per_token, 4);
        assert_eq!(
            c.layer_types,
            vec![
                LayerType::Sliding,
                LayerType::Full,
                LayerType::Sliding,
                LayerType::Full
            ]
        );
        assert!(c.quantization.is_none());
        Ok(())
    }

    fn err_of(v: Value) -> String {
        match ModelConfig::from_value(&v) {
            Ok(_) => "no error".to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rejects_bad_configs() {
        let mut v = base();
        v["model_type"] = "llama".into();
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        assert!(err_of(v).contains("'llama'"));

        let mut v = base();
        v["num_experts_per_tok"] = 3.into();
        assert!(err_of(v).contains("experts_per_token"));

        let mut v = base();
        v["hidden_size"] = (-1).into();
        assert!(err_of(v).contains("'hidden_size'"));

        let mut v = base();
        v["layer_types"] = serde_json::json!(["sliding_attention"]);
        assert!(err_of(v).contains("expected 4 entries"));

        let mut v = base();
        v["quantization_config"]["bnb_4bit_quant_type"] = "fp4".into();
        assert!(err_of(v).contains("expected 'nf4', found 'fp4'"));

        let mut v = base();
        v["num_key_value_heads"] = 7.into();
        assert!(err_of(v).contains("num_key_value_heads"));

        assert!(ModelConfig::from_json_str("{not json").is_err());
        assert!(err_of(serde_json::json!([1, 2])).contains("an array"));
        let mut v = base();
        if let Some(o) = v.as_object_mut() {
            o.remove("vocab_size");
        }
        assert!(err_of(v).contains("'vocab_size'"));
    }
}
