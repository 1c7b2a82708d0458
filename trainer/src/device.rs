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
