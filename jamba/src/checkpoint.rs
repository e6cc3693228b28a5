//! Hugging Face safetensors checkpoints: reading tensor by tensor (memory-mapped, one or many
//! shards) and writing the Hub layout atomically.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata, TensorInfo};

use crate::error::{JambaError, Result};

/// The single-file weights name.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// A checkpoint folder's tensors, memory-mapped: reading one tensor touches only its bytes.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// tensor name -> shard index
    index: BTreeMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish()
    }
}

/// Shape and stored dtype of one checkpoint tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    pub dtype: String,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(INDEX_FILE);
        if single.exists() {
            Self::open_files(&[single])
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| JambaError::io(&index, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| JambaError::BadCheckpoint {
                    path: index.display().to_string(),
                    reason: format!("not JSON: {e}"),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| JambaError::BadCheckpoint {
                    path: index.display().to_string(),
                    reason: "no `weight_map` object".into(),
                })?;
            let mut files: Vec<PathBuf> = Vec::new();
            for v in map.values() {
                let name = v.as_str().ok_or_else(|| JambaError::BadCheckpoint {
                    path: index.display().to_string(),
                    reason: "`weight_map` values must be file names".into(),
                })?;
                let p = dir.join(name);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            Self::open_files(&files)
        } else {
            Err(JambaError::BadCheckpoint {
                path: dir.display().to_string(),
                reason: format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} found"),
            })
        }
    }

    /// Opens the given safetensors files as one checkpoint.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = BTreeMap::new();
        for path in paths {
            let file = File::open(path).map_err(|e| JambaError::io(path, e))?;
            // SAFETY: the file is opened read-only; a checkpoint changed on disk while it is mapped is
            // outside what any loader can guard against (safetensors' own loaders map files the same way).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| JambaError::io(path, e))?;
            let (header_len, metadata): (usize, Metadata) =
                safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                    JambaError::BadCheckpoint {
                        path: path.display().to_string(),
                        reason: format!("not a safetensors file: {e}"),
                    }
                })?;
            let tensors: HashMap<String, TensorInfo> = metadata
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.clone()))
                .collect();
            for name in tensors.keys() {
                if index.insert(name.clone(), shards.len()).is_some() {
                    return Err(JambaError::BadCheckpoint {
                        path: path.display().to_string(),
                        reason: format!("tensor `{name}` appears in two shards"),
                    });
                }
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
                data_start: 8 + header_len,
                tensors,
            });
        }
        Ok(Self { shards, index })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Whether the checkpoint has a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn info(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let shard = &self.shards[*self.index.get(name)?];
        Some((shard, &shard.tensors[name]))
    }

    /// Shape and dtype of a tensor.
    pub fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.info(name).map(|(_, info)| TensorMeta {
            shape: info.shape.clone(),
            dtype: format!("{:?}", info.dtype),
        })
    }

    /// Reads one tensor, converted to `dtype` (f32, f16 or bf16).
    pub fn read(&self, name: &str, dtype: DType) -> Result<Option<TensorData>> {
        let Some((shard, info)) = self.info(name) else {
            return Ok(None);
        };
        let stored = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::F64 => DType::F64,
            other => {
                return Err(JambaError::UnsupportedDtype {
                    key: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (start, end) = info.data_offsets;
        let bytes = shard
            .mmap
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| JambaError::BadCheckpoint {
                path: shard.path.display().to_string(),
                reason: format!("tensor `{name}` points outside the file"),
            })?;
        let data = TensorData::from_bytes_vec(bytes.to_vec(), info.shape.clone(), stored);
        Ok(Some(if stored == dtype {
            data
        } else {
            data.convert_dtype(dtype)
        }))
    }
}

fn st_dtype(dtype: DType) -> Result<StDtype> {
    Ok(match dtype {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F64 => StDtype::F64,
        DType::I64 => StDtype::I64,
        DType::I32 => StDtype::I32,
        other => {
            return Err(JambaError::UnsupportedDtype {
                key: "<output>".into(),
                dtype: format!("{other:?}"),
            })
        }
    })
}

/// Writes named tensors to a safetensors file atomically: into a temporary file beside it, synced,
/// then renamed over the target, so an interrupted write never leaves a truncated file.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: Vec<(String, TensorData)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, data) in &tensors {
        let view = safetensors::tensor::TensorView::new(
            st_dtype(data.dtype)?,
            data.shape.to_vec(),
            data.as_bytes(),
        )
        .map_err(|e| JambaError::BadCheckpoint {
            path: path.display().to_string(),
            reason: format!("tensor `{name}`: {e}"),
        })?;
        views.push((name.clone(), view));
    }
    let bytes = safetensors::serialize(views, metadata).map_err(|e| JambaError::BadCheckpoint {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(JambaError::io(path, e));
    }
    Ok(())
}

/// Reads every tensor of a single safetensors file (for small inputs such as token ids).
pub fn read_all(path: impl AsRef<Path>) -> Result<BTreeMap<String, TensorData>> {
    let path = path.as_ref();
    let ckpt = Checkpoint::open_files(&[path.to_path_buf()])?;
    let mut out = BTreeMap::new();
    for name in ckpt.names() {
        let (shard, info) = ckpt.info(name).expect("listed name");
        let dtype = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::F64 => DType::F64,
            StDtype::I64 => DType::I64,
            StDtype::I32 => DType::I32,
            StDtype::U8 => DType::U8,
            other => {
                return Err(JambaError::UnsupportedDtype {
                    key: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (start, end) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        out.insert(
            name.to_string(),
            TensorData::from_bytes_vec(bytes.to_vec(), info.shape.clone(), dtype),
        );
    }
    Ok(out)
}
