//! Activation checkpointing: a block's forward pass keeps only its input,
//! and the backward pass recomputes the block from it.
//!
//! Candle records every intermediate tensor of the forward pass for the
//! backward pass; over a decoder of L layers at T tokens that is L times
//! a layer's activations (its MLP alone holds several `[T, intermediate]`
//! tensors). [`Recompute::apply`] runs a block on a detached copy of its
//! input, so the block's graph is freed as soon as the output is read, and
//! puts a custom op in the graph in its place. When the backward pass
//! reaches that op it runs the block again on its input, with recording,
//! backpropagates the incoming gradient through it, hands the input's
//! gradient on and collects the block's parameter gradients here. The
//! training step merges them into the backward pass's own
//! ([`Recompute::merge_into`]), so the optimizer sees the same gradients as
//! without checkpointing. Peak memory is the block inputs plus one block's
//! activations.

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, Var, bail};

/// A block's forward function of its input.
pub(crate) type BlockFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// The parameter gradients the recomputations of one backward pass found.
#[derive(Default)]
pub(crate) struct Recompute {
    grads: Mutex<Vec<(Tensor, Tensor)>>,
}

impl Recompute {
    /// `block(x)`, recording only `x` for the backward pass. `params` are
    /// the tensors `block` reads that may need gradients.
    pub(crate) fn apply(
        self: &Arc<Self>,
        x: &Tensor,
        params: Vec<Tensor>,
        block: BlockFn,
    ) -> Result<Tensor> {
        if !x.track_op() {
            // Nothing before the block needs a gradient, so the custom op
            // would not be recorded and the parameters would get none: run
            // the block as it is.
            return block(x);
        }
        // The block's graph lives only as long as `y`'s op; detaching
        // frees it.
        let y = block(&x.detach())?.detach();
        x.apply_op1(Checkpoint {
            y: Mutex::new(Some(y)),
            block,
            params,
            sink: self.clone(),
        })
    }

    /// Adds the collected parameter gradients to `grads` (summing with any
    /// gradient the parameter already has there), and forgets them.
    pub(crate) fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let collected = std::mem::take(&mut *self.grads.lock().expect("recompute gradients"));
        for (param, grad) in collected {
            let total = match grads.get(&param) {
                Some(before) => (before + grad)?,
                None => grad,
            };
            grads.insert(&param, total);
        }
        Ok(())
    }
}

/// The recorded stand-in for a block of input `x`: its forward hands out
/// the output computed without recording, its backward recomputes the
/// block from `x`.
struct Checkpoint {
    /// The block's output, until the forward hands it out.
    y: Mutex<Option<Tensor>>,
    block: BlockFn,
    params: Vec<Tensor>,
    sink: Arc<Recompute>,
}

impl Checkpoint {
    fn output(&self) -> Result<Tensor> {
        let Some(y) = self.y.lock().expect("recomputed output").take() else {
            bail!("recompute: the block's output was already handed out")
        };
        y.contiguous()
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "recompute"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.output()?;
        let (storage, at) = y.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            bail!("recompute: the block's output left the CPU")
        };
        let span = at.start_offset()..at.start_offset() + y.elem_count();
        let data = match storage {
            CpuStorage::F32(d) => CpuStorage::F32(d[span].to_vec()),
            CpuStorage::BF16(d) => CpuStorage::BF16(d[span].to_vec()),
            CpuStorage::F16(d) => CpuStorage::F16(d[span].to_vec()),
            _ => bail!("recompute: a float block output expected"),
        };
        Ok((data, y.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let y = self.output()?;
        let (storage, at) = y.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            bail!("recompute: the block's output left the GPU")
        };
        Ok((storage.try_clone(&at)?, y.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = (self.block)(x.as_tensor())?;
        let grads = (y * grad_res)?.sum_all()?.backward()?;
        let mut sink = self.sink.grads.lock().expect("recompute gradients");
        for p in &self.params {
            if let Some(g) = grads.get(p) {
                sink.push((p.clone(), g.clone()));
            }
        }
        Ok(grads.get(x.as_tensor()).cloned())
    }
}
