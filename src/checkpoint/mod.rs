//! Reading Unsloth GPT-OSS bnb-4bit checkpoints and building the virtual fused expert layout.
//!
//! - [`config`]: `config.json` -> [`config::ModelConfig`] (GPT-OSS recognised and checked).
//! - [`shards`]: memory-mapped safetensors shards, headers validated, optional index checked.
//! - [`quant_state`]: one NF4 weight from its own keys and JSON quant state.
//! - [`model`]: the validated module inventory (every tensor claimed, shapes from the config).
//! - [`fused`]: per-layer fused expert buffers filled in one pass into caller memory.
//! - [`summary`]: sizes, formats and byte counts.
//! - [`py`]: the Python bindings.
//!
//! Opening reads config.json, the shard headers and the tiny quant-state JSON blobs and
//! quant maps; tensor data stays in the files until asked for.

pub mod config;
pub mod fused;
pub mod model;
pub mod py;
pub mod quant_state;
pub mod shards;
pub mod summary;

use std::path::{Path, PathBuf};

use config::ModelConfig;
use model::{Model, Weight};
use quant_state::float_dtype_name;
use shards::{ShardSet, TensorEntry};

use crate::error::{Error, Result};
use crate::nf4::FloatDtype;

/// An opened, fully validated checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// The text of config.json.
    pub config_text: String,
    /// The validated config.
    pub config: ModelConfig,
    /// The mapped shards.
    pub shards: ShardSet,
    /// The module inventory.
    pub model: Model,
}

/// A dequantized weight: raw 16-bit patterns of `dtype`, row-major `shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dequantized {
    /// bf16 or f16 bit patterns.
    pub bits: Vec<u16>,
    /// Their dtype.
    pub dtype: FloatDtype,
    /// Shape from the quant-state JSON.
    pub shape: Vec<usize>,
}

impl Dequantized {
    /// torch name of the dtype.
    pub fn dtype_name(&self) -> &'static str {
        float_dtype_name(self.dtype)
    }
}

impl Checkpoint {
    /// Opens and validates the checkpoint directory `path`.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_dir() {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "expected a checkpoint directory (config.json + *.safetensors), found a file",
                ),
            ));
        }
        let config_path = path.join("config.json");
        let config_text =
            std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = ModelConfig::from_json_str(&config_text)?;
        let shards = ShardSet::open_dir(path)?;
        let model = Model::resolve(&config, &shards)?;
        Ok(Checkpoint {
            dir: path.to_path_buf(),
            config_text,
            config,
            shards,
            model,
        })
    }

    /// All tensor keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.shards.tensors.keys().map(String::as_str)
    }

    /// Where `key` lives.
    pub fn entry(&self, key: &str) -> Result<&TensorEntry> {
        self.shards.get(key).ok_or_else(|| Error::MissingTensor {
            key: key.to_string(),
            context: format!("no such tensor in {}", self.dir.display()),
        })
    }

    /// The stored bytes of `key` (borrowed from the mapping).
    pub fn tensor_bytes(&self, key: &str) -> Result<&[u8]> {
        let e = self.entry(key)?;
        self.shards.bytes(e)
    }

    /// The Linear weight `name` (`<module>.weight`), if it is one.
    pub fn weight(&self, name: &str) -> Option<&Weight> {
        self.model.find_weight(name)
    }

    /// Dequantizes the NF4 weight `name`. Errors if `name` is not an NF4 weight.
    pub fn dequantize(&self, name: &str) -> Result<Dequantized> {
        match self.weight(name) {
            Some(Weight::Nf4(t)) => {
                let mut bits = vec![0u16; t.numel];
                t.dequantize_into(&self.shards, &mut bits)?;
                Ok(Dequantized {
                    bits,
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                })
            }
            Some(Weight::Plain(p)) => Err(Error::tensor(
                name,
                "an NF4 weight to dequantize",
                format!(
                    "an unquantized {}",
                    shards::describe(p.entry.dtype, &p.entry.shape)
                ),
            )),
            None => Err(Error::MissingTensor {
                key: name.to_string(),
                context: format!(
                    "not a weight of this checkpoint (expected a '<module>.weight' key such as \
                     'model.layers.0.mlp.experts.gate_up_projs.0.weight'; {})",
                    self.dir.display()
                ),
            }),
        }
    }
}
