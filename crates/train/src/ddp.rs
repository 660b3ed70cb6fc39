//! Data parallelism over a [`Collective`]: gradients are packed into flat
//! buckets (about 25 MB, as PyTorch DDP's default) and summed across ranks,
//! parameters, buffers and optimizer state are broadcast from rank 0 at the
//! start, BN running statistics are averaged at the end of an epoch (timm's
//! `--dist-bn reduce`), and evaluation counts are summed.
//!
//! Buckets live on the tensors' device: host memory goes through the TCP
//! ring, CUDA memory through NCCL (see `rsb_collective::nccl` for the stream
//! ordering that makes this safe without extra synchronisation).

use crate::error::TrainError;
use rsb_collective::{Buffer, Collective, CollectiveError};
use tch::{Device, Kind, Tensor};

/// Floats per bucket: 25 MB of f32.
pub const BUCKET_FLOATS: usize = 25 * 1024 * 1024 / 4;

/// What to do with each bucket.
#[derive(Debug, Clone, Copy)]
pub enum Reduction {
    /// Element-wise sum over ranks.
    Sum,
    /// Element-wise mean over ranks.
    Mean,
    /// Rank `root`'s values everywhere.
    Broadcast(usize),
}

/// Runs `reduction` on a flat, contiguous f32 tensor in place.
fn reduce_flat(
    collective: &mut dyn Collective,
    flat: &mut Tensor,
    reduction: Reduction,
) -> Result<(), TrainError> {
    let len = flat.numel();
    if len == 0 {
        return Ok(());
    }
    let buffer = match flat.device() {
        Device::Cpu => {
            // SAFETY: `flat` is a contiguous f32 CPU tensor of `len` elements
            // that we own exclusively for the duration of the call.
            let data = unsafe { std::slice::from_raw_parts_mut(flat.data_ptr() as *mut f32, len) };
            Buffer::Host(data)
        }
        // SAFETY: `flat` is a contiguous f32 tensor of `len` elements on CUDA
        // device `device` that we own exclusively and keep alive past the
        // collective below; the backends enqueue on libtorch's default stream.
        Device::Cuda(device) => Buffer::Cuda(unsafe {
            rsb_collective::CudaBuffer::new(flat.data_ptr() as u64, len, device)
        }),
        _ => {
            return Err(TrainError::Collective(CollectiveError::WrongMemory {
                backend: "rsb-train's data parallelism",
                location: "memory other than the host's or CUDA's",
            }))
        }
    };
    match reduction {
        Reduction::Sum | Reduction::Mean => collective.all_reduce_sum(buffer)?,
        Reduction::Broadcast(root) => collective.broadcast(buffer, root)?,
    }
    if let Reduction::Mean = reduction {
        let _ = flat.f_div_scalar_(collective.world_size() as f64)?;
    }
    Ok(())
}

/// Applies `reduction` to every tensor (in place), packed into buckets of at
/// most [`BUCKET_FLOATS`] floats in the given order (the same on every rank).
/// Undefined tensors (parameters without a gradient) are skipped on every
/// rank alike only if they are undefined everywhere; callers pass gradients
/// after a backward pass that reached every parameter.
pub fn reduce_tensors(
    collective: &mut dyn Collective,
    tensors: &[Tensor],
    reduction: Reduction,
) -> Result<(), TrainError> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    let _guard = tch::no_grad_guard();
    let mut start = 0;
    while start < tensors.len() {
        let mut end = start;
        let mut floats = 0;
        while end < tensors.len()
            && (end == start || floats + tensors[end].numel() <= BUCKET_FLOATS)
        {
            floats += tensors[end].numel();
            end += 1;
        }
        let bucket = &tensors[start..end];
        let views: Vec<Tensor> = bucket
            .iter()
            .map(|t| t.f_to_kind(Kind::Float)?.f_reshape([-1]))
            .collect::<Result<_, _>>()?;
        let mut flat = Tensor::f_cat(&views, 0)?.f_contiguous()?;
        reduce_flat(collective, &mut flat, reduction)?;
        let mut offset = 0;
        for t in bucket {
            let n = t.numel() as i64;
            let mut target = t.shallow_clone();
            let part = flat.f_narrow(0, offset, n)?.f_view(t.size().as_slice())?;
            target.f_copy_(&part)?;
            offset += n;
        }
        start = end;
    }
    Ok(())
}

/// Sums a few host scalars over ranks (metrics, evaluation counts).
pub fn sum_scalars(collective: &mut dyn Collective, values: &mut [f64]) -> Result<(), TrainError> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    // f64 carried as two f32 parts (high and residual) keeps ~48 bits.
    let mut parts: Vec<f32> = Vec::with_capacity(values.len() * 2);
    for v in values.iter() {
        let high = *v as f32;
        parts.push(high);
        parts.push((*v - f64::from(high)) as f32);
    }
    collective.all_reduce_sum(Buffer::Host(&mut parts))?;
    for (i, v) in values.iter_mut().enumerate() {
        *v = f64::from(parts[2 * i]) + f64::from(parts[2 * i + 1]);
    }
    Ok(())
}

/// Broadcasts a few unsigned integers from `root` exactly (16 bits per float).
pub fn broadcast_integers(
    collective: &mut dyn Collective,
    values: &mut [u64],
    root: usize,
) -> Result<(), TrainError> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    let mut parts: Vec<f32> = values
        .iter()
        .flat_map(|v| (0..4).map(move |k| ((v >> (16 * k)) & 0xffff) as f32))
        .collect();
    collective.broadcast(Buffer::Host(&mut parts), root)?;
    for (i, v) in values.iter_mut().enumerate() {
        *v = (0..4).map(|k| (parts[4 * i + k] as u64) << (16 * k)).sum();
    }
    Ok(())
}
