//! Memory-mapped checkpoints, read one tensor (or one shard of it) at a time.
//!
//! Both formats are addressed by Hugging Face names
//! (`model.layers.3.self_attn.q_proj.weight`); GGUF names are translated here,
//! so model code loads the same way from either. Every read is counted, which
//! lets tests prove that a stage touches only its own layers.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::arch::Architecture;
use crate::error::{Error, Result};
use crate::fp8::Fp8Matrix;
use crate::half_matrix::{HalfKind, HalfMatrix};
use crate::layers::Matmul;
use crate::quant::{Q4_1Matrix, Q8_0Matrix};

/// One slice of a tensor along `dim`, for tensor parallelism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub dim: usize,
    pub rank: usize,
    pub world_size: usize,
    /// Allow a length that does not divide: each rank takes `ceil(len / ws)`
    /// and the last ones get what is left (the vocabulary; its users pad).
    pub uneven: bool,
}

impl Shard {
    pub fn new(dim: usize, rank: usize, world_size: usize) -> Self {
        assert!(
            rank < world_size,
            "rank {rank} outside world size {world_size}"
        );
        Self {
            dim,
            rank,
            world_size,
            uneven: false,
        }
    }

    /// A shard of a dimension that need not divide (see `uneven`).
    pub fn uneven(dim: usize, rank: usize, world_size: usize) -> Self {
        Self {
            uneven: true,
            ..Self::new(dim, rank, world_size)
        }
    }

    /// The half-open range of `len` that this shard owns.
    pub fn range(&self, name: &str, len: usize) -> Result<(usize, usize)> {
        if self.uneven {
            let chunk = len.div_ceil(self.world_size);
            let lo = (self.rank * chunk).min(len);
            return Ok((lo, (lo + chunk).min(len)));
        }
        if !len.is_multiple_of(self.world_size) {
            return Err(Error::BadWeight {
                name: name.into(),
                msg: format!(
                    "dimension {} of size {len} does not divide by {} ranks",
                    self.dim, self.world_size
                ),
            });
        }
        let n = len / self.world_size;
        Ok((self.rank * n, (self.rank + 1) * n))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    Gguf,
}

#[derive(Debug, Clone)]
struct StEntry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range inside the mmapped file.
    start: usize,
    end: usize,
}

enum Source {
    Safetensors {
        files: Vec<Mmap>,
        entries: HashMap<String, StEntry>,
        /// `quantization_config.weight_block_size` of an FP8 checkpoint.
        fp8_block: Option<[usize; 2]>,
    },
    Gguf {
        mmap: Mmap,
        content: gguf_file::Content,
    },
}

/// A checkpoint on disk: a Hugging Face folder of safetensors, or a GGUF file.
pub struct Weights {
    path: PathBuf,
    source: Arc<Source>,
    device: Device,
    /// What dense tensors are made in: f32 on the CPU, bf16/f16/f32 on a GPU.
    dtype: DType,
    /// Shared by every view of the checkpoint ([`Weights::on`]).
    bytes_read: Arc<AtomicU64>,
    names_read: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("path", &self.path)
            .field("format", &self.format())
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn mmap(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(io_err(path))?;
    // SAFETY: checkpoints are treated as read-only for the process lifetime;
    // a file changed underneath us is a user error that candle and vLLM share.
    unsafe { Mmap::map(&file) }.map_err(io_err(path))
}

impl Weights {
    /// Opens `path`: a `.gguf` file, a `.safetensors` file, or a folder with
    /// `model.safetensors` or `model.safetensors.index.json` (sharded).
    /// Tensors are read onto `device` in f32.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        Self::open_as(path, device, DType::F32)
    }

    /// Like [`open`](Self::open), with dense tensors in `dtype`; quantized
    /// GGUF weights are dequantized to it everywhere but on the CPU, where
    /// they stay quantized for strata's and candle's CPU kernels.
    pub fn open_as(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let source =
            if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
                let mmap = mmap(path)?;
                let content = gguf_file::Content::read(&mut std::io::Cursor::new(&mmap[..]))
                    .map_err(|e| Error::BadWeight {
                        name: path.display().to_string(),
                        msg: format!("not a valid GGUF file: {e}"),
                    })?;
                Source::Gguf { mmap, content }
            } else {
                let files = safetensors_files(path)?;
                let mut maps = Vec::new();
                let mut entries = HashMap::new();
                for (i, f) in files.iter().enumerate() {
                    let m = mmap(f)?;
                    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&m[..])
                        .map_err(|e| Error::BadWeight {
                            name: f.display().to_string(),
                            msg: format!("not a valid safetensors file: {e}"),
                        })?;
                    let base = 8 + header_len;
                    for (name, info) in meta.tensors() {
                        entries.insert(
                            name,
                            StEntry {
                                file: i,
                                dtype: info.dtype,
                                shape: info.shape.clone(),
                                start: base + info.data_offsets.0,
                                end: base + info.data_offsets.1,
                            },
                        );
                    }
                    maps.push(m);
                }
                Source::Safetensors {
                    files: maps,
                    entries,
                    fp8_block: fp8_block(path)?,
                }
            };
        Ok(Self {
            path: path.to_path_buf(),
            source: Arc::new(source),
            device: device.clone(),
            dtype,
            bytes_read: Arc::new(AtomicU64::new(0)),
            names_read: Arc::new(Mutex::new(Vec::new())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes every tensor takes dense at `dtype_bytes` per element: the
    /// weights' size on a GPU, where GGUF is dequantized. FP8 weights count
    /// as stored: a byte each, and their f32 scales.
    pub fn dense_bytes(&self, dtype_bytes: usize) -> u64 {
        let elements: usize = match &*self.source {
            Source::Safetensors { entries, .. } => {
                // FP8 weights are served as they are stored: a byte each,
                // and their f32 scales.
                return entries
                    .iter()
                    .map(|(name, e)| {
                        let n = e.shape.iter().product::<usize>();
                        let fp8 = e.dtype == safetensors::Dtype::F8_E4M3;
                        let scale = name.ends_with("_scale_inv");
                        n as u64
                            * if fp8 {
                                1
                            } else if scale {
                                4
                            } else {
                                dtype_bytes as u64
                            }
                    })
                    .sum();
            }
            Source::Gguf { content, .. } => content
                .tensor_infos
                .values()
                .map(|i| i.shape.elem_count())
                .sum(),
        };
        (elements * dtype_bytes) as u64
    }

    /// Whether the checkpoint holds block-scaled FP8 weights.
    pub fn has_fp8(&self) -> bool {
        match &*self.source {
            Source::Safetensors { entries, .. } => entries
                .values()
                .any(|e| e.dtype == safetensors::Dtype::F8_E4M3),
            Source::Gguf { .. } => false,
        }
    }

    /// The same checkpoint (one mapping, one read counter) read onto
    /// `device` in `dtype`: each tensor-parallel rank reads onto its own GPU.
    pub fn on(&self, device: &Device, dtype: DType) -> Weights {
        Weights {
            path: self.path.clone(),
            source: self.source.clone(),
            device: device.clone(),
            dtype,
            bytes_read: self.bytes_read.clone(),
            names_read: self.names_read.clone(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The folder that holds `config.json` and the tokenizer files.
    pub fn folder(&self) -> &Path {
        if self.path.is_dir() {
            &self.path
        } else {
            self.path.parent().unwrap_or(Path::new("."))
        }
    }

    /// The model's architecture, resolved from GGUF metadata or the
    /// `config.json` beside the safetensors.
    pub fn architecture(&self) -> Result<Arc<dyn Architecture>> {
        match &*self.source {
            Source::Gguf { content, .. } => {
                crate::from_gguf_metadata(&content.metadata, self.contains("lm_head.weight"))
            }
            Source::Safetensors { .. } => {
                let path = self.folder().join("config.json");
                let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
                crate::from_hf_config(&text)
            }
        }
    }

    pub fn format(&self) -> WeightFormat {
        match *self.source {
            Source::Safetensors { .. } => WeightFormat::Safetensors,
            Source::Gguf { .. } => WeightFormat::Gguf,
        }
    }

    /// GGUF metadata (architecture, tokenizer, chat template), if this is GGUF.
    pub fn gguf_metadata(&self) -> Option<&HashMap<String, gguf_file::Value>> {
        match &*self.source {
            Source::Gguf { content, .. } => Some(&content.metadata),
            Source::Safetensors { .. } => None,
        }
    }

    /// Bytes of tensor data read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Identifies the checkpoint across hosts (where paths may differ): a
    /// hash of each file's size and first MiB, which holds the header (names,
    /// shapes, dtypes, GGUF metadata) and the start of the data.
    pub fn fingerprint(&self) -> String {
        const HEAD: usize = 1 << 20;
        let maps: Vec<&Mmap> = match &*self.source {
            Source::Safetensors { files, .. } => files.iter().collect(),
            Source::Gguf { mmap, .. } => vec![mmap],
        };
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for m in maps {
            feed(&(m.len() as u64).to_le_bytes());
            feed(&m[..m.len().min(HEAD)]);
        }
        format!("{h:016x}")
    }

    /// Names (HF spelling) of every tensor read so far, in order.
    pub fn names_read(&self) -> Vec<String> {
        self.names_read.lock().expect("poisoned").clone()
    }

    /// Every tensor in the checkpoint, as the file names it.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match &*self.source {
            Source::Safetensors { entries, .. } => entries.keys().cloned().collect(),
            Source::Gguf { content, .. } => content.tensor_infos.keys().cloned().collect(),
        };
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        match &*self.source {
            Source::Safetensors { entries, .. } => entries.contains_key(name),
            Source::Gguf { content, .. } => {
                gguf_name(name).is_some_and(|g| content.tensor_infos.contains_key(&g))
            }
        }
    }

    /// Shape of a tensor without reading it (candle order: outermost first).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        match &*self.source {
            Source::Safetensors { entries, .. } => entries
                .get(name)
                .map(|e| e.shape.clone())
                .ok_or_else(|| Error::MissingWeight(name.into())),
            Source::Gguf { content, .. } => gguf_name(name)
                .and_then(|g| content.tensor_infos.get(&g))
                .map(|i| i.shape.dims().to_vec())
                .ok_or_else(|| Error::MissingWeight(name.into())),
        }
    }

    /// A tensor (or its shard), dense, in the weights' dtype.
    pub fn tensor(&self, name: &str, shard: Option<Shard>) -> Result<Tensor> {
        match &*self.source {
            Source::Safetensors { .. } => self.dense_safetensors(name, shard),
            Source::Gguf { .. } => Ok(self
                .qtensor(name, shard)?
                .dequantize(&self.device)?
                .to_dtype(self.dtype)?),
        }
    }

    /// A linear layer's weight `[out, in]` ready to multiply: GGUF stays
    /// quantized on the CPU, everything else is dense in the weights' dtype.
    pub fn matmul(&self, name: &str, shard: Option<Shard>) -> Result<Matmul> {
        match &*self.source {
            Source::Gguf { .. } if !self.device.is_cpu() => {
                Ok(Matmul::Candle(QMatMul::Tensor(self.tensor(name, shard)?)))
            }
            Source::Safetensors { entries, .. }
                if self.device.is_cpu()
                    && entries
                        .get(name)
                        .is_some_and(|e| e.dtype == safetensors::Dtype::F8_E4M3) =>
            {
                Ok(Matmul::Fp8(Arc::new(self.fp8(name, shard)?)))
            }
            Source::Safetensors { files, entries, .. }
                if self.keeps_half()
                    && entries.get(name).is_some_and(|e| {
                        e.shape.len() == 2
                            && matches!(e.dtype, safetensors::Dtype::BF16 | safetensors::Dtype::F16)
                    }) =>
            {
                let e = &entries[name];
                let kind = match e.dtype {
                    safetensors::Dtype::F16 => HalfKind::F16,
                    _ => HalfKind::Bf16,
                };
                let bytes = &files[e.file][e.start..e.end];
                let (shape, parts) = slice_rows(name, &e.shape, 2, bytes, shard)?;
                self.record(name, parts.iter().map(|p| p.len()).sum());
                let m = HalfMatrix::from_parts(name, kind, &parts, shape[0], shape[1])?;
                Ok(Matmul::Half(Arc::new(m)))
            }
            Source::Safetensors { .. } => Ok(Matmul::Candle(QMatMul::Tensor(
                self.dense_safetensors(name, shard)?,
            ))),
            Source::Gguf { .. } => {
                let (dtype, shape, data) = self.gguf_bytes(name, shard)?;
                // strata's kernels where candle's are slow (see quant.rs).
                if let [rows, cols] = shape[..] {
                    match dtype {
                        GgmlDType::Q4_1 => {
                            let m = Q4_1Matrix::from_bytes(name, &data, rows, cols)?;
                            return Ok(Matmul::Q4_1(Arc::new(m)));
                        }
                        GgmlDType::Q8_0 => {
                            let m = Q8_0Matrix::from_bytes(name, &data, rows, cols)?;
                            return Ok(Matmul::Q8_0(Arc::new(m)));
                        }
                        GgmlDType::F16 | GgmlDType::BF16 if self.keeps_half() => {
                            let kind = match dtype {
                                GgmlDType::F16 => HalfKind::F16,
                                _ => HalfKind::Bf16,
                            };
                            let m = HalfMatrix::from_parts(name, kind, &[&data], rows, cols)?;
                            return Ok(Matmul::Half(Arc::new(m)));
                        }
                        _ => {}
                    }
                }
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    dtype,
                    &data,
                    shape,
                    &self.device,
                )?;
                Ok(Matmul::Candle(QMatMul::from_arc(Arc::new(q))?))
            }
        }
    }

    /// Whether 16-bit dense weights stay 16-bit for [`HalfMatrix`]: on the
    /// CPU with f32 activations, where candle would widen them to f32 at
    /// load and read twice the bytes every step.
    fn keeps_half(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::F32
    }

    fn record(&self, name: &str, bytes: usize) {
        self.bytes_read.fetch_add(bytes as u64, Ordering::Relaxed);
        self.names_read
            .lock()
            .expect("poisoned")
            .push(name.to_string());
    }

    fn dense_safetensors(&self, name: &str, shard: Option<Shard>) -> Result<Tensor> {
        let Source::Safetensors { files, entries, .. } = &*self.source else {
            unreachable!("called on safetensors only")
        };
        let e = entries
            .get(name)
            .ok_or_else(|| Error::MissingWeight(name.into()))?;
        if e.dtype == safetensors::Dtype::F8_E4M3 {
            return Ok(self
                .fp8(name, shard)?
                .dequantize()?
                .to_dtype(self.dtype)?
                .to_device(&self.device)?);
        }
        let elem = match e.dtype {
            safetensors::Dtype::F32 => 4,
            safetensors::Dtype::F16 | safetensors::Dtype::BF16 => 2,
            other => {
                return Err(Error::BadWeight {
                    name: name.into(),
                    msg: format!("dtype {other:?} is not supported (use f32, bf16 or f16)"),
                })
            }
        };
        let bytes = &files[e.file][e.start..e.end];
        let (shape, parts) = slice_rows(name, &e.shape, elem, bytes, shard)?;
        let read: usize = parts.iter().map(|p| p.len()).sum();
        self.record(name, read);
        let stored = match e.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            _ => DType::BF16,
        };
        if stored == self.dtype {
            // The bytes as they are (little-endian, as candle lays them out).
            let t = match &parts[..] {
                [one] => Tensor::from_raw_buffer(one, stored, &shape, &self.device)?,
                _ => Tensor::from_raw_buffer(&parts.concat(), stored, &shape, &self.device)?,
            };
            return Ok(t);
        }
        let mut out = Vec::with_capacity(shape.iter().product());
        for part in parts {
            match e.dtype {
                safetensors::Dtype::F32 => out.extend(
                    part.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
                safetensors::Dtype::F16 => out.extend(
                    part.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
                _ => out.extend(
                    part.chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
            }
        }
        Ok(Tensor::from_vec(out, shape, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?)
    }

    /// An FP8 weight (or its shard) with its block scales, kept FP8.
    fn fp8(&self, name: &str, shard: Option<Shard>) -> Result<Fp8Matrix> {
        let Source::Safetensors {
            files,
            entries,
            fp8_block,
        } = &*self.source
        else {
            unreachable!("called on safetensors only")
        };
        let bad = |msg: String| Error::BadWeight {
            name: name.into(),
            msg,
        };
        let e = entries
            .get(name)
            .ok_or_else(|| Error::MissingWeight(name.into()))?;
        let block = fp8_block.ok_or_else(|| {
            bad(
                "an FP8 weight, but config.json names no quantization_config.weight_block_size"
                    .into(),
            )
        })?;
        let [rows, cols] = e.shape[..] else {
            return Err(bad(format!("an FP8 weight of shape {:?}", e.shape)));
        };
        let scale_name = format!("{name}_scale_inv");
        let scales = self.dense_safetensors(&scale_name, None)?;
        let scale_cols = scales.dim(1)?;
        let scales = scales
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (shape, parts) = slice_rows(name, &e.shape, 1, &files[e.file][e.start..e.end], shard)?;
        let data: Vec<u8> = parts.concat();
        self.record(name, data.len());
        let (row0, col0) = match shard {
            Some(s) if s.dim == 0 => (s.range(name, rows)?.0, 0),
            Some(s) => (0, s.range(name, cols)?.0),
            None => (0, 0),
        };
        Fp8Matrix::new(
            name, data, shape[0], shape[1], row0, col0, &scales, scale_cols, block,
        )
    }

    fn qtensor(&self, name: &str, shard: Option<Shard>) -> Result<QTensor> {
        let (dtype, shape, data) = self.gguf_bytes(name, shard)?;
        Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &data,
            shape,
            &self.device,
        )?)
    }

    /// A GGUF tensor's (or shard's) raw blocks, dtype and shape.
    fn gguf_bytes(
        &self,
        name: &str,
        shard: Option<Shard>,
    ) -> Result<(GgmlDType, Vec<usize>, Vec<u8>)> {
        let Source::Gguf { mmap, content } = &*self.source else {
            unreachable!("called on GGUF only")
        };
        let info = gguf_name(name)
            .and_then(|g| content.tensor_infos.get(&g))
            .ok_or_else(|| Error::MissingWeight(name.into()))?;
        let dims = info.shape.dims().to_vec();
        let dtype = info.ggml_dtype;
        let start = content.tensor_data_offset as usize + info.offset as usize;
        let len = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        let bytes = mmap
            .get(start..start + len)
            .ok_or_else(|| Error::BadWeight {
                name: name.into(),
                msg: "tensor data runs past the end of the file".into(),
            })?;
        // Quantized rows are sliced in whole blocks; a column shard must
        // therefore start and end on a block boundary.
        if let Some(s) = shard {
            if s.dim == dims.len() - 1 && (dims[s.dim] / s.world_size) % dtype.block_size() != 0 {
                return Err(Error::BadWeight {
                    name: name.into(),
                    msg: format!(
                        "a {}-way shard of {} columns does not fall on {:?} block boundaries",
                        s.world_size, dims[s.dim], dtype
                    ),
                });
            }
        }
        let (shape, parts) = slice_rows_q(name, &dims, dtype, bytes, shard)?;
        let data: Vec<u8> = parts.concat();
        self.record(name, data.len());
        Ok((dtype, shape, data))
    }
}

/// The byte ranges of a row-major tensor's shard (elements of `elem` bytes).
fn slice_rows<'a>(
    name: &str,
    shape: &[usize],
    elem: usize,
    bytes: &'a [u8],
    shard: Option<Shard>,
) -> Result<(Vec<usize>, Vec<&'a [u8]>)> {
    let Some(s) = shard else {
        return Ok((shape.to_vec(), vec![bytes]));
    };
    if s.dim >= shape.len() {
        return Err(Error::BadWeight {
            name: name.into(),
            msg: format!("cannot shard dimension {} of shape {shape:?}", s.dim),
        });
    }
    let (lo, hi) = s.range(name, shape[s.dim])?;
    let inner: usize = shape[s.dim + 1..].iter().product::<usize>() * elem;
    let outer: usize = shape[..s.dim].iter().product();
    let stride = shape[s.dim] * inner;
    let parts = (0..outer)
        .map(|o| &bytes[o * stride + lo * inner..o * stride + hi * inner])
        .collect();
    let mut new_shape = shape.to_vec();
    new_shape[s.dim] = hi - lo;
    Ok((new_shape, parts))
}

/// Like [`slice_rows`] for a quantized tensor, whose last dimension is stored
/// in blocks of `block_size` elements.
fn slice_rows_q<'a>(
    name: &str,
    dims: &[usize],
    dtype: GgmlDType,
    bytes: &'a [u8],
    shard: Option<Shard>,
) -> Result<(Vec<usize>, Vec<&'a [u8]>)> {
    let Some(s) = shard else {
        return Ok((dims.to_vec(), vec![bytes]));
    };
    let last = dims.len() - 1;
    if s.dim == last {
        // Column shard: treat each run of blocks as one "element".
        let blocks_per_row = dims[last] / dtype.block_size();
        let mut block_dims = dims.to_vec();
        block_dims[last] = blocks_per_row;
        let block_shard = Shard { ..s };
        let (mut shape, parts) = slice_rows(
            name,
            &block_dims,
            dtype.type_size(),
            bytes,
            Some(block_shard),
        )?;
        shape[last] *= dtype.block_size();
        Ok((shape, parts))
    } else {
        let mut row_dims = dims.to_vec();
        row_dims[last] = dims[last] / dtype.block_size() * dtype.type_size();
        let (mut shape, parts) = slice_rows(name, &row_dims, 1, bytes, Some(s))?;
        shape[last] = dims[last];
        Ok((shape, parts))
    }
}

fn safetensors_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(Error::UnknownFormat(path.to_path_buf()));
    }
    let index = path.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index.clone(),
                source,
            })?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| Error::BadWeight {
                name: index.display().to_string(),
                msg: "no `weight_map` object".into(),
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| path.join(f)).collect());
    }
    let single = path.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::UnknownFormat(path.to_path_buf()))
}

/// The FP8 block size from the `config.json` beside a checkpoint, if it
/// names one (DeepSeek's `quantization_config.weight_block_size`).
fn fp8_block(path: &Path) -> Result<Option<[usize; 2]>> {
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    };
    let cfg = dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&cfg) else {
        return Ok(None);
    };
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", cfg.display())))?;
    let block = &json["quantization_config"]["weight_block_size"];
    if block.is_null() {
        return Ok(None);
    }
    match block
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64()).collect::<Vec<_>>())
    {
        Some(v) if v.len() == 2 && v.iter().all(|x| x.is_some_and(|x| x > 0)) => {
            Ok(Some([v[0].unwrap() as usize, v[1].unwrap() as usize]))
        }
        _ => Err(Error::Config(format!(
            "quantization_config.weight_block_size {block} is not two positive sizes"
        ))),
    }
}

/// The GGUF spelling (llama.cpp's) of a Hugging Face weight name of the
/// Llama family (Qwen's norms and biases included).
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        "rope_freqs.weight" => Some("rope_freqs.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_map_to_gguf_names() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.weight").as_deref(),
            Some("blk.12.attn_q.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(gguf_name("model.layers.0.mystery.weight"), None);
    }

    #[test]
    fn row_and_column_shards_pick_the_right_bytes() {
        // A 2x4 tensor of single-byte "elements" 0..8.
        let bytes: Vec<u8> = (0..8).collect();
        let (shape, parts) =
            slice_rows("t", &[2, 4], 1, &bytes, Some(Shard::new(0, 1, 2))).unwrap();
        assert_eq!((shape, parts.concat()), (vec![1, 4], vec![4, 5, 6, 7]));
        let (shape, parts) =
            slice_rows("t", &[2, 4], 1, &bytes, Some(Shard::new(1, 0, 2))).unwrap();
        assert_eq!((shape, parts.concat()), (vec![2, 2], vec![0, 1, 4, 5]));
        assert!(slice_rows("t", &[2, 4], 1, &bytes, Some(Shard::new(1, 0, 3))).is_err());
    }
}
