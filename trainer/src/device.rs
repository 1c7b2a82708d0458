//! Which device a command computes on, as `--device` names it: `cpu`, or
//! `cuda` / `cuda:N` in a build with `--features cuda`; and in which
//! precision (`--dtype`).

use candle_core::{DType, Device};

use crate::{Error, Result};

/// The device `spec` names; a clear error where this build or machine
/// cannot give it.
pub fn parse(spec: &str) -> Result<Device> {
    let bad = |why: String| Error::Config(format!("--device {spec}: {why}"));
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| bad("expected cuda:N with N a GPU's number".into()))?,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(bad(
                    "this lvpipe was built without CUDA; build it with `cargo build --release --features cuda`"
                        .into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| bad(e.to_string()))
        }
        _ => Err(bad("expected cpu, cuda or cuda:N".into())),
    }
}

/// The compute dtype `spec` names (`--dtype`): `f32`, or `bf16` / `f16`
/// (mixed precision over f32 master weights; training in f16 scales its
/// loss, [`crate::optim::LossScale`]).
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(Error::Config(format!(
            "--dtype {other}: expected f32, bf16 or f16"
        ))),
    }
}

/// `device` as `--device` names it.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The most bytes the device's memory pool had handed out at once since
/// the last call with `reset`; `None` on the CPU (whose peak is the
/// process's, [`crate::bench::resident_bytes`]). Candle allocates CUDA
/// memory stream-ordered from the device's default pool, whose
/// `USED_MEM_HIGH` counter this reads.
#[allow(unsafe_code)]
pub fn peak_device_bytes(device: &Device, reset: bool) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        let failed = |e: result::DriverError| Error::Config(format!("CUDA memory pool: {e}"));
        device
            .synchronize()
            .map_err(|e| Error::Config(format!("CUDA synchronize: {e}")))?;
        let ctx = d.cuda_stream().context().clone();
        ctx.bind_to_thread().map_err(failed)?;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        let mut value: u64 = 0;
        // SAFETY: the pool is the device's own, and both attributes are
        // 64-bit counters, as `value` is.
        unsafe {
            let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(failed)?;
            let ptr = (&mut value as *mut u64).cast();
            result::mem_pool::get_attribute(pool, attr, ptr).map_err(failed)?;
            if reset {
                let mut zero: u64 = 0;
                let zero_ptr = (&mut zero as *mut u64).cast();
                result::mem_pool::set_attribute(pool, attr, zero_ptr).map_err(failed)?;
            }
        }
        return Ok(Some(value));
    }
    let _ = (device, reset);
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_named_as_the_flag_takes_them() {
        assert!(parse("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:x", "CPU"] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("--device {bad}")), "{err}");
        }
        if !candle_core::utils::cuda_is_available() {
            let err = parse("cuda:0").unwrap_err().to_string();
            assert!(err.contains("built without CUDA"), "{err}");
        }
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("f16").unwrap(), DType::F16);
        let err = parse_dtype("fp8").unwrap_err().to_string();
        assert!(err.contains("--dtype fp8"), "{err}");
    }
}
