//! The candle path: `s·L·R` as an f64 matmul on a candle device (CUDA with the `cuda`
//! feature). The result comes back to the host, where the same fused pass as the CPU
//! path adds it to `W` and rounds once, so both paths round identically.
//!
//! Unchecked here: this workspace's machines have no GPU. The same code runs on candle's
//! CPU device in the unit test below, which pins its numerics; on a GPU, compare a port
//! with `--device cuda:0` against the CPU result before relying on it.

use std::sync::{Mutex, OnceLock};

use crate::device::Device;
use crate::error::EngineError;
use crate::kernel::LowRankDelta;

fn device_error(device: Device, e: &candle_core::Error) -> EngineError {
    EngineError::Device {
        device: device.to_string(),
        message: e.to_string(),
    }
}

/// The candle device for `device`, created once per process and ordinal.
fn candle_device(device: Device) -> Result<candle_core::Device, EngineError> {
    static DEVICES: OnceLock<Mutex<Vec<(usize, candle_core::Device)>>> = OnceLock::new();
    let ordinal = match device {
        Device::Cpu => return Ok(candle_core::Device::Cpu),
        Device::Cuda(n) => n,
    };
    let cache = DEVICES.get_or_init(|| Mutex::new(Vec::new()));
    let mut cache = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, d)) = cache.iter().find(|(n, _)| *n == ordinal) {
        return Ok(d.clone());
    }
    let d = candle_core::Device::new_cuda(ordinal).map_err(|e| match e {
        candle_core::Error::NotCompiledWithCudaSupport => EngineError::Device {
            device: device.to_string(),
            message: "this build has no CUDA support (build with the cuda feature)".to_owned(),
        },
        e => device_error(device, &e),
    })?;
    cache.push((ordinal, d.clone()));
    Ok(d)
}

/// `s·L·R`, `[rows, cols]` row-major, computed on `device` in f64.
pub(crate) fn delta(device: Device, delta: &LowRankDelta) -> Result<Vec<f64>, EngineError> {
    let dev = candle_device(device)?;
    delta_on(&dev, delta).map_err(|e| device_error(device, &e))
}

fn delta_on(dev: &candle_core::Device, d: &LowRankDelta) -> candle_core::Result<Vec<f64>> {
    let l = candle_core::Tensor::from_slice(d.left(), (d.rows(), d.rank()), dev)?;
    let r = candle_core::Tensor::from_slice(d.right(), (d.rank(), d.cols()), dev)?;
    l.matmul(&r)?
        .affine(d.scale(), 0.0)?
        .flatten_all()?
        .to_vec1::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::merge_in_place;
    use patchport_core::safetensors::Dtype;

    #[test]
    fn candle_path_matches_the_cpu_kernel() {
        let (rank, inf, outf) = (5, 37, 29);
        let a: Vec<f64> = (0..rank * inf)
            .map(|i| ((i * 7 % 13) as f64 - 6.0) * 0.013)
            .collect();
        let b: Vec<f64> = (0..outf * rank)
            .map(|i| ((i * 5 % 11) as f64 - 5.0) * 0.021)
            .collect();
        let d = LowRankDelta::from_lora(&a, &b, rank, inf, outf, 1.5, false).unwrap();
        let on_candle = delta_on(&candle_core::Device::Cpu, &d).unwrap();
        let mut w = vec![0u8; outf * inf * 8];
        merge_in_place(Dtype::F64, &mut w, &d, Device::Cpu).unwrap();
        for (x, c) in on_candle.iter().zip(w.chunks_exact(8)) {
            let y = f64::from_le_bytes(c.try_into().unwrap());
            assert!((x - y).abs() <= 1e-15 * y.abs().max(1e-300), "{x} vs {y}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let d = LowRankDelta::from_lora(&[1.0], &[1.0], 1, 1, 1, 1.0, false).unwrap();
        let err = delta(Device::Cuda(0), &d).unwrap_err();
        assert!(err.to_string().contains("cuda:0"), "{err}");
    }
}
