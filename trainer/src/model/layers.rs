//! The building blocks of the networks: linear layers (with an optional
//! LoRA adapter), LayerNorm and RMSNorm, each creating its parameters under
//! the checkpoint's names.

use candle_core::{D, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::ops;

#[derive(Clone)]
pub(crate) struct Linear {
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
    /// Low-rank adapter (`llm_lora`): `y += scale * x A^T B^T`.
    pub(crate) lora: Option<Lora>,
}

#[derive(Clone)]
pub(crate) struct Lora {
    /// `[r, in]`, `lora_A.weight` in PEFT's names.
    pub(crate) a: Tensor,
    /// `[out, r]`, `lora_B.weight`; zero at the start, so the adapted model
    /// starts as the base model.
    pub(crate) b: Tensor,
    pub(crate) scale: f64,
}

impl Linear {
    pub(crate) fn new(vb: &VarBuilder, inp: usize, out: usize, bias: bool) -> Result<Self> {
        let bound = 1.0 / (inp as f64).sqrt();
        let w = vb.get_with_hints(
            (out, inp),
            "weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let b = if bias {
            Some(vb.get_with_hints(out, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Linear { w, b, lora: None })
    }

    /// Its parameters: weight, bias and adapter.
    pub(crate) fn params(&self) -> impl Iterator<Item = Tensor> + '_ {
        let lora = self.lora.iter().flat_map(|l| [l.a.clone(), l.b.clone()]);
        std::iter::once(self.w.clone())
            .chain(self.b.clone())
            .chain(lora)
    }

    /// `x` is [.., inp].
    /// The weights take `x`'s dtype (half-precision compute over f32
    /// master weights, whose gradients come back in f32).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let like = |w: &Tensor| w.to_dtype(x.dtype());
        let mut y = x.broadcast_matmul(&like(&self.w)?.t()?)?;
        if let Some(l) = &self.lora {
            let low = x
                .broadcast_matmul(&like(&l.a)?.t()?)?
                .broadcast_matmul(&like(&l.b)?.t()?)?;
            y = (y + (low * l.scale)?)?;
        }
        match &self.b {
            Some(b) => y.broadcast_add(&like(b)?),
            None => Ok(y),
        }
    }
}

#[derive(Clone)]
pub(crate) struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(vb: &VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            w: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
            b: vb.get_with_hints(size, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    pub(crate) fn params(&self) -> [Tensor; 2] {
        [self.w.clone(), self.b.clone()]
    }

    /// In f32 whatever `x`'s dtype; the result in `x`'s.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(candle_core::DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.w)?
            .broadcast_add(&self.b)?
            .to_dtype(dtype)
    }
}

#[derive(Clone)]
pub(crate) struct RmsNorm {
    w: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn new(vb: &VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            w: vb.get_with_hints(size, "weight", Init::Const(1.0))?,
            eps,
        })
    }

    pub(crate) fn params(&self) -> [Tensor; 1] {
        [self.w.clone()]
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.w, self.eps as f32)
    }
}
