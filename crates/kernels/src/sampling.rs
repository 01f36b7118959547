//! The greedy choice as a candle op, so a step whose requests all decode
//! greedily brings back one id per row instead of every row's logits
//! (`[64, 128256]` f32 is 33 MB a step).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::ops::rows;
use crate::{err, reference};

/// The first index of each row's largest value (NaN counts as -inf), as
/// u32 `[rows]`: the CPU sampler's greedy rule. `logits` is `[rows, vocab]`
/// with contiguous rows.
pub fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    logits.apply_op1_no_bwd(&ArgmaxRows)
}

struct ArgmaxRows;

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "argmax_rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, cols, stride) = rows(l, "argmax_rows")?;
        let x = match s {
            CpuStorage::F32(v) => &v[l.start_offset()..],
            _ => return Err(err("argmax_rows on the CPU takes f32")),
        };
        let out: Vec<u32> = (0..n)
            .map(|r| reference::argmax(&x[r * stride..r * stride + cols]))
            .collect();
        Ok((CpuStorage::U32(out), Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{by_dtype, load, per_token, view, KernelType};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::{CudaStorage, WrapErr};

        fn run<T: KernelType>(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
            let (n, cols, stride) = rows(l, "argmax_rows")?;
            if stride != cols {
                return Err(err("argmax_rows on CUDA needs contiguous logits"));
            }
            let dev = s.device().clone();
            // SAFETY: the kernel writes every element.
            let out = unsafe { dev.alloc::<u32>(n.max(1)) }?;
            if n == 0 {
                return Ok(CudaStorage::wrap_cuda_slice(out, dev));
            }
            let f = load(
                &dev,
                "argmax_rows",
                s.dtype(),
                "sampling",
                crate::ptx::SAMPLING,
            )?;
            let x = view::<T>(s, l)?;
            let cols = cols as i64;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&x).arg(&cols).arg(&out);
            // SAFETY: the arguments match argmax_rows in sampling.cu.
            unsafe { b.launch(per_token(n, 1024)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let n = rows(l, "argmax_rows")?.0;
        Ok((by_dtype!(s.dtype(), run(s, l))?, Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn the_first_maximum_wins_and_nan_counts_as_minus_infinity() {
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        let rows: [[f32; 4]; 5] = [
            [1.0, 3.0, 3.0, 2.0],
            [nan, 2.0, 5.0, 5.0],
            [nan, -inf, nan, -inf],
            [-inf, nan, -inf, -inf],
            [0.0, -1.0, inf, nan],
        ];
        let t = Tensor::new(&rows, &Device::Cpu).unwrap();
        let got = super::argmax_rows(&t).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(got, [1, 2, 0, 0, 2]);
        // A column slice (rows with a stride) reads only its columns.
        let sliced = super::argmax_rows(&t.narrow(1, 0, 2).unwrap()).unwrap();
        assert_eq!(sliced.to_vec1::<u32>().unwrap(), [1, 1, 0, 0, 0]);
    }

    #[test]
    fn rows_longer_than_the_lanes_find_the_first_maximum() {
        // 40 columns: two chunks of 16 lanes and a tail of 8.
        let row = |marks: &[(usize, f32)]| {
            let mut r: Vec<f32> = (0..40).map(|i| (i % 7) as f32 * 0.1).collect();
            for &(i, v) in marks {
                r[i] = v;
            }
            r
        };
        let rows = [
            row(&[(3, 9.0), (19, 9.0)]), // same lane, two chunks
            row(&[(20, 9.0), (5, 9.0)]), // different lanes
            row(&[(37, 9.0)]),           // in the tail
            row(&[(2, f32::NAN), (30, f32::INFINITY)]),
            vec![f32::NEG_INFINITY; 40],
        ];
        let flat: Vec<f32> = rows.concat();
        let t = Tensor::from_vec(flat, (5, 40), &Device::Cpu).unwrap();
        let got = super::argmax_rows(&t).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(got, [3, 5, 37, 30, 0]);
    }
}
