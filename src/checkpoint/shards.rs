//! The safetensors shards of a checkpoint directory: memory-mapped, headers parsed and checked,
//! every tensor located by key.
//!
//! Opening reads only the headers; tensor bytes stay in the page cache until someone asks for
//! them. The safetensors crate validates each header completely (offsets contiguous, sizes equal
//! to shape x dtype, the data region ending exactly at the end of the file), so every recorded
//! byte range lies inside its mapping.
//!
//! With `model.safetensors.index.json` the shards are exactly the files its `weight_map` names,
//! and the index must agree with them key by key (other `*.safetensors` files in the directory are
//! ignored, as transformers does). Without an index every `*.safetensors` file in the directory is
//! a shard and a key may live in only one of them.
//!
//! The mapped files must not be modified or truncated while a checkpoint is open (the usual
//! memory-mapping caveat: the OS would deliver SIGBUS on access to vanished pages).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{Error, Result};

/// Name of the optional shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// Element type.
    pub dtype: Dtype,
    /// Shape from the header.
    pub shape: Vec<usize>,
    /// Index of the shard in [`ShardSet::shards`].
    pub shard: usize,
    /// Absolute byte offset of the first byte in the file.
    pub start: usize,
    /// Absolute byte offset one past the last byte.
    pub end: usize,
}

impl TensorEntry {
    /// Byte length of the data.
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }

    /// Number of elements (the product of the shape; the header was validated, so no overflow).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One memory-mapped safetensors file.
#[derive(Debug)]
pub struct Shard {
    /// Path of the file.
    pub path: PathBuf,
    /// File size in bytes.
    pub file_len: usize,
    /// Size of the JSON header (excluding the 8-byte length prefix).
    pub header_len: usize,
    mmap: Mmap,
}

/// All shards of a checkpoint and the key -> location map.
#[derive(Debug)]
pub struct ShardSet {
    /// The shards, in sorted file-name order.
    pub shards: Vec<Shard>,
    /// Every tensor key in every shard.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The index file, when the checkpoint has one.
    pub index_path: Option<PathBuf>,
}

/// The torch-style name of a safetensors dtype (`"bfloat16"`, `"uint8"`, ...).
pub fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BOOL => "bool",
        Dtype::U8 => "uint8",
        Dtype::I8 => "int8",
        Dtype::I16 => "int16",
        Dtype::U16 => "uint16",
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        Dtype::I32 => "int32",
        Dtype::U32 => "uint32",
        Dtype::F32 => "float32",
        Dtype::F64 => "float64",
        Dtype::I64 => "int64",
        Dtype::U64 => "uint64",
        Dtype::F8_E4M3 => "float8_e4m3fn",
        Dtype::F8_E5M2 => "float8_e5m2",
        _ => "unsupported",
    }
}

/// `"bfloat16 [5760, 2880]"`, for messages.
pub fn describe(dtype: Dtype, shape: &[usize]) -> String {
    format!("{} {:?}", dtype_name(dtype), shape)
}

fn safetensors_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl Shard {
    /// Maps `path` and validates its header. Returns the shard and its tensors (offsets absolute).
    pub fn open(path: &Path) -> Result<(Shard, Vec<(String, TensorEntry)>)> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(safetensors_err(path, "not a regular file"));
        }
        let file_len = usize::try_from(meta.len())
            .map_err(|_| safetensors_err(path, "file larger than the address space"))?;
        if file_len < 8 {
            return Err(safetensors_err(
                path,
                format!("expected at least 8 bytes (header length), found {file_len} bytes"),
            ));
        }
        // SAFETY: the mapping is read-only; the file must not be truncated while mapped (documented
        // at module level). All accesses go through bounds-checked slices.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if mmap.len() != file_len {
            return Err(safetensors_err(
                path,
                format!(
                    "file changed while mapping: {file_len} bytes, mapped {}",
                    mmap.len()
                ),
            ));
        }
        // Full validation (the same as `SafeTensors::deserialize`): header JSON, dtypes, offsets
        // contiguous and matching shape x dtype, data ending exactly at end of file.
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| safetensors_err(path, e.to_string()))?;
        let base = 8 + header_len;
        let mut entries = Vec::with_capacity(metadata.tensors().len());
        for (key, info) in metadata.tensors() {
            let (s, e) = info.data_offsets;
            let start = base
                .checked_add(s)
                .ok_or_else(|| safetensors_err(path, format!("tensor '{key}': offset overflow")))?;
            let end = base
                .checked_add(e)
                .ok_or_else(|| safetensors_err(path, format!("tensor '{key}': offset overflow")))?;
            if end > file_len || start > end {
                return Err(safetensors_err(
                    path,
                    format!(
                        "tensor '{key}': expected data inside the {file_len}-byte file, found \
                         bytes {start}..{end}"
                    ),
                ));
            }
            entries.push((
                key,
                TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    shard: 0,
                    start,
                    end,
                },
            ));
        }
        Ok((
            Shard {
                path: path.to_path_buf(),
                file_len,
                header_len,
                mmap,
            },
            entries,
        ))
    }

    /// Bytes `start..end` of the file (bounds-checked).
    pub fn bytes(&self, start: usize, end: usize) -> Result<&[u8]> {
        self.mmap.get(start..end).ok_or_else(|| {
            safetensors_err(
                &self.path,
                format!(
                    "byte range {start}..{end} lies outside the {}-byte file",
                    self.mmap.len()
                ),
            )
        })
    }

    /// Prepares `start..end` for one sequential read: maps all its pages into this process in
    /// one call (`MADV_POPULATE_READ`, Linux 5.14+) instead of one page fault per 4 KiB page,
    /// which otherwise halves copy throughput from a warm page cache. Falls back to a read-ahead
    /// hint where that advice is unavailable. Best effort, errors ignored.
    pub fn will_need(&self, start: usize, end: usize) {
        if end > start && end <= self.mmap.len() {
            #[cfg(target_os = "linux")]
            if self
                .mmap
                .advise_range(Advice::PopulateRead, start, end - start)
                .is_ok()
            {
                return;
            }
            let _ = self.mmap.advise_range(Advice::WillNeed, start, end - start);
        }
    }

    /// Drops `start..end` from this process's resident set after a one-pass read, so mapped
    /// pages do not accumulate in RSS layer after layer (the page cache keeps them). Best effort.
    pub fn release(&self, start: usize, end: usize) {
        if end > start && end <= self.mmap.len() {
            // SAFETY: the mapping is a read-only, file-backed shared mapping: MADV_DONTNEED only
            // unmaps the pages from this process; the next access faults them in again from the
            // page cache with identical contents. No reference into the range is used to observe
            // a difference.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

fn list_safetensors(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) == Some("safetensors") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Parses the index's `weight_map` (key -> file name).
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let what = path.display().to_string();
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        what: what.clone(),
        message: e.to_string(),
    })?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Json {
            what: what.clone(),
            message: "expected an object with a 'weight_map' object".to_string(),
        })?;
    let mut out = BTreeMap::new();
    for (k, f) in map {
        let f = f.as_str().ok_or_else(|| Error::Json {
            what: what.clone(),
            message: format!("weight_map['{k}']: expected a file name string, found {f}"),
        })?;
        let plain = Path::new(f)
            .file_name()
            .map(|n| n.to_string_lossy() == f)
            .unwrap_or(false);
        if !plain {
            return Err(Error::Json {
                what: what.clone(),
                message: format!(
                    "weight_map['{k}']: expected a file name inside the checkpoint directory, \
                     found '{f}'"
                ),
            });
        }
        out.insert(k.clone(), f.to_string());
    }
    Ok(out)
}

impl ShardSet {
    /// Opens every shard of the checkpoint directory `dir` (see the module docs for the rules).
    pub fn open_dir(dir: &Path) -> Result<ShardSet> {
        let index_path = dir.join(INDEX_FILE);
        let index = if index_path.is_file() {
            Some(read_index(&index_path)?)
        } else {
            None
        };
        let files: Vec<PathBuf> = match &index {
            Some(map) => {
                let mut names: Vec<&String> = map.values().collect();
                names.sort();
                names.dedup();
                names.into_iter().map(|n| dir.join(n)).collect()
            }
            None => list_safetensors(dir)?,
        };
        if files.is_empty() {
            return Err(safetensors_err(
                dir,
                "expected at least one *.safetensors shard in this directory, found none",
            ));
        }

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
        for path in &files {
            let (shard, entries) = Shard::open(path)?;
            let idx = shards.len();
            for (key, mut entry) in entries {
                entry.shard = idx;
                if let Some(prev) = tensors.get(&key) {
                    let prev_path = shards
                        .get(prev.shard)
                        .map_or_else(|| path.clone(), |s: &Shard| s.path.clone());
                    return Err(Error::tensor(
                        key,
                        "to be stored in exactly one shard",
                        format!("it in both {} and {}", prev_path.display(), path.display()),
                    ));
                }
                tensors.insert(key, entry);
            }
            shards.push(shard);
        }

        if let Some(map) = &index {
            let name_of = |e: &TensorEntry| -> String {
                shards
                    .get(e.shard)
                    .and_then(|s| s.path.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            };
            for (key, file) in map {
                match tensors.get(key) {
                    None => {
                        return Err(Error::MissingTensor {
                            key: key.clone(),
                            context: format!(
                                "{} maps it to {file}, which does not contain it",
                                index_path.display()
                            ),
                        })
                    }
                    Some(e) if &name_of(e) != file => {
                        return Err(Error::tensor(
                            key.clone(),
                            format!("in {file} (as {INDEX_FILE} says)"),
                            format!("it in {}", name_of(e)),
                        ))
                    }
                    Some(_) => {}
                }
            }
            for (key, e) in &tensors {
                if !map.contains_key(key) {
                    return Err(Error::UnexpectedTensor {
                        key: key.clone(),
                        context: format!(
                            "stored in {} but not listed in {}",
                            name_of(e),
                            index_path.display()
                        ),
                    });
                }
            }
        }

        Ok(ShardSet {
            shards,
            tensors,
            index_path: index.map(|_| index_path),
        })
    }

    /// Location of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&TensorEntry> {
        self.tensors.get(key)
    }

    /// The shard holding `entry`.
    pub fn shard(&self, entry: &TensorEntry) -> Result<&Shard> {
        self.shards
            .get(entry.shard)
            .ok_or_else(|| Error::arg(format!("no shard number {}", entry.shard)))
    }

    /// The raw bytes of `entry` (borrowed from the mapping).
    pub fn bytes(&self, entry: &TensorEntry) -> Result<&[u8]> {
        self.shard(entry)?.bytes(entry.start, entry.end)
    }

    /// Sum of all shard file sizes.
    pub fn total_file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.file_len as u64).sum()
    }

    /// File name (without directory) of the shard holding `entry`.
    pub fn file_name(&self, entry: &TensorEntry) -> String {
        self.shards
            .get(entry.shard)
            .and_then(|s| s.path.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}
