//! strata's kernels: each is a candle op with a CPU implementation (its
//! reference, in [`reference`]) and, with the `cuda` feature, a CUDA one
//! (`kernels/*.cu`), so model code calls one function on either device.
//!
//! With the `cuda` feature the build script compiles `kernels/*.cu` to PTX
//! and [`ptx`] embeds it; launchers load each function by its name
//! (`<kernel>_<f32|f16|bf16>`) through candle's CUDA device. Without the
//! feature nothing here needs CUDA. [`check`] runs every op on a device and
//! compares it with the CPU references (the GPU check's first part).

mod attention;
pub mod check;
#[cfg(feature = "cuda")]
mod cuda;
mod ops;
pub mod reference;
mod sampling;

pub use attention::{
    paged_attention, write_kv, PrefillPlan, PrefillTiles, RopeTables, PREFILL_TILE,
};
pub use ops::{add_rms_norm, rms_norm, rotary, silu_and_mul};
pub use sampling::argmax_rows;

/// Head geometry of one tensor-parallel shard: `num_heads` query heads share
/// `num_kv_heads` KV heads (GQA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// The PTX of each `kernels/*.cu`, by module name.
#[cfg(feature = "cuda")]
pub mod ptx {
    macro_rules! module {
        ($name:ident, $file:literal) => {
            pub const $name: &str = include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx"));
        };
    }
    module!(ACTIVATION, "activation");
    module!(KV_CACHE, "kv_cache");
    module!(PAGED_ATTENTION, "paged_attention");
    module!(PREFILL_ATTENTION, "prefill_attention");
    module!(RMS_NORM, "rms_norm");
    module!(ROTARY, "rotary");
    module!(SAMPLING, "sampling");
}

/// Tokens per KV-cache block the kernels assume (`STRATA_BLOCK_SIZE` in
/// `kernels/common.cuh`).
pub const KERNEL_BLOCK_SIZE: usize = 16;
const _: () = assert!(KERNEL_BLOCK_SIZE == strata_types::BLOCK_SIZE);

fn err(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(msg.into())
}
