//! Data parallelism over a [`Collective`]: gradients are packed into flat
//! buckets (about 25 MB, as PyTorch DDP's default) and summed across ranks,
//! parameters, buffers and optimizer state are broadcast from rank 0 at the
//! start, BN running statistics are averaged at the end of an epoch (timm's
//! `--dist-bn reduce`), and metric and evaluation sums are summed.
//!
//! One device path: every call, gradients and scalars alike, reduces a flat
//! f32 tensor on the training device through [`reduce_flat`]. Scalars are
//! packed into such a tensor (f64 as two f32 parts, integers as 16-bit
//! parts, so both stay exact). CUDA memory goes to a backend that reduces
//! device memory (NCCL) as it is; for the others (the TCP ring) it is staged
//! through a pinned host tensor: copied there, reduced, copied back. So a
//! multi-rank CUDA job runs on either backend, and the ring on the CPU runs
//! exactly the code NCCL runs but for that staging.
//!
//! Gradient buckets may travel as bf16 ([`Reduction::SumBf16`], DDP's
//! `bf16_compress_hook`): over the ring as bf16 on the wire (half the
//! bytes), over NCCL rounded to bf16 around an f32 reduction (same values
//! for two ranks, no saving in bytes: NCCL would need a bf16 `CudaBuffer`).
//!
//! At world size 1 every call returns at once, unless [`Calls`] asks for
//! them (`distributed.collectives_at_world_size_one`, to exercise a backend
//! on one device). Every failure names the collective call ([`TrainError::Collective`]).

use crate::error::TrainError;
use crate::host_read;
use rsb_collective::{Buffer, Collective, CollectiveError};
use tch::{Device, Kind, Tensor};

/// Floats per bucket: 25 MB of f32.
pub const BUCKET_FLOATS: usize = 25 * 1024 * 1024 / 4;

/// What to do with each bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Element-wise sum over ranks.
    Sum,
    /// Element-wise sum over ranks of the bucket rounded to bf16, the sum
    /// rounded to bf16 and widened back to f32: PyTorch DDP's
    /// `bf16_compress_hook` (`distributed.gradient_compression: bf16`).
    /// DDP's hook also divides by the world size, because DDP averages; our
    /// gradients come already divided by the global number of micro-batches
    /// (the loss is), so the sum is the mean and nothing is divided here.
    SumBf16,
    /// Element-wise mean over ranks.
    Mean,
    /// Rank `root`'s values everywhere.
    Broadcast(usize),
}

/// How a rank makes its collective calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calls {
    /// The training device: scalars are packed into tensors there.
    pub device: Device,
    /// Make the calls even at world size 1 (normally skipped there).
    pub at_world_size_one: bool,
}

impl Calls {
    /// Whether a call on `collective` is made at all.
    pub fn made(&self, collective: &dyn Collective) -> bool {
        self.at_world_size_one || collective.world_size() > 1
    }
}

/// The error of collective call `what`.
fn failed(what: &str, error: CollectiveError) -> TrainError {
    TrainError::Collective { operation: what.to_string(), error }
}

/// Runs `reduction` on a flat, contiguous f32 tensor in place, on its
/// device (staged through pinned host memory for a backend that cannot
/// reduce CUDA memory).
fn reduce_flat(
    collective: &mut dyn Collective,
    flat: &mut Tensor,
    reduction: Reduction,
    what: &str,
) -> Result<(), TrainError> {
    let len = flat.numel();
    if len == 0 {
        return Ok(());
    }
    if reduction == Reduction::SumBf16 && !collective.sums_bf16() {
        // A backend without bf16 sums (NCCL here, whose buffers are f32):
        // the values are rounded to bf16 before, and the sum rounded after,
        // as a bf16 all-reduce of two ranks leaves it; the wire carries f32.
        round_to_bf16(flat)?;
        reduce_flat(collective, flat, Reduction::Sum, what)?;
        return round_to_bf16(flat);
    }
    match flat.device() {
        Device::Cpu if reduction == Reduction::SumBf16 => {
            // The ring carries bf16: 2 bytes per element on the wire.
            let half = flat.f_to_kind(Kind::BFloat16)?.f_contiguous()?;
            // SAFETY: `half` is a contiguous bf16 CPU tensor of `len`
            // elements (2 bytes each, the layout `Buffer::HostBf16` means)
            // that only this function holds, for the duration of the call.
            let data = unsafe { std::slice::from_raw_parts_mut(half.data_ptr() as *mut u16, len) };
            run(collective, Buffer::HostBf16(data), reduction, what)?;
            flat.f_copy_(&half)?;
        }
        Device::Cpu => {
            // SAFETY: `flat` is a contiguous f32 CPU tensor of `len` elements
            // that we own exclusively for the duration of the call.
            let data = unsafe { std::slice::from_raw_parts_mut(flat.data_ptr() as *mut f32, len) };
            run(collective, Buffer::Host(data), reduction, what)?;
        }
        Device::Cuda(device) if collective.reduces_device_memory() => {
            // SAFETY: `flat` is a contiguous f32 tensor of `len` elements on
            // CUDA device `device` that we own exclusively and keep alive past
            // the collective below; the backend enqueues on libtorch's default
            // stream, so the tensor is neither freed nor reused before it ran.
            let buffer =
                unsafe { rsb_collective::CudaBuffer::new(flat.data_ptr() as u64, len, device) };
            run(collective, Buffer::Cuda(buffer), reduction, what)?;
        }
        Device::Cuda(device) => {
            // The only branch CI cannot run: stage through pinned host memory
            // (blocking copies), then reduce the host copy like any CPU tensor.
            let mut host = Tensor::f_empty([len as i64], (Kind::Float, Device::Cpu))?
                .f_pin_memory(Device::Cuda(device))?;
            host.f_copy_(flat)?;
            reduce_flat(collective, &mut host, reduction, what)?;
            flat.f_copy_(&host)?;
            return Ok(());
        }
        _ => {
            return Err(failed(
                what,
                CollectiveError::WrongMemory {
                    backend: "rsb-train's data parallelism",
                    location: "memory other than the host's or CUDA's",
                },
            ))
        }
    }
    if let Reduction::Mean = reduction {
        let _ = flat.f_div_scalar_(collective.world_size() as f64)?;
    }
    Ok(())
}

/// `flat` rounded to bf16 (round to nearest even) and widened back, in place.
fn round_to_bf16(flat: &mut Tensor) -> Result<(), TrainError> {
    let rounded = flat.f_to_kind(Kind::BFloat16)?.f_to_kind(Kind::Float)?;
    flat.f_copy_(&rounded)?;
    Ok(())
}

fn run(
    collective: &mut dyn Collective,
    buffer: Buffer<'_>,
    reduction: Reduction,
    what: &str,
) -> Result<(), TrainError> {
    match reduction {
        Reduction::Sum | Reduction::Mean | Reduction::SumBf16 => collective.all_reduce_sum(buffer),
        Reduction::Broadcast(root) => collective.broadcast(buffer, root),
    }
    .map_err(|e| failed(what, e))
}

/// Applies `reduction` to every tensor (in place), packed into buckets of at
/// most [`BUCKET_FLOATS`] floats in the given order (the same on every rank).
/// Undefined tensors (parameters without a gradient) are skipped on every
/// rank alike only if they are undefined everywhere; callers pass gradients
/// after a backward pass that reached every parameter.
/// `what` names the call in errors (the bucket number is added).
pub fn reduce_tensors(
    collective: &mut dyn Collective,
    calls: Calls,
    tensors: &[Tensor],
    reduction: Reduction,
    what: &str,
) -> Result<(), TrainError> {
    if !calls.made(collective) {
        return Ok(());
    }
    let _guard = tch::no_grad_guard();
    let mut start = 0;
    let mut bucket_index = 0;
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
        bucket_index += 1;
        let bucket_what = format!("{what}, bucket {bucket_index} (tensors {start}..{end})");
        reduce_flat(collective, &mut flat, reduction, &bucket_what)?;
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

/// Sums a few host scalars over ranks (metrics, evaluation counts), packed
/// into a tensor on the training device: each f64 travels as two f32 parts
/// (high and residual), which keeps about 48 bits. `what` names the call.
pub fn sum_scalars(
    collective: &mut dyn Collective,
    calls: Calls,
    values: &mut [f64],
    what: &str,
) -> Result<(), TrainError> {
    if !calls.made(collective) {
        return Ok(());
    }
    let mut parts: Vec<f32> = Vec::with_capacity(values.len() * 2);
    for v in values.iter() {
        let high = *v as f32;
        parts.push(high);
        parts.push((*v - f64::from(high)) as f32);
    }
    let parts = reduce_parts(collective, calls, &parts, Reduction::Sum, what)?;
    for (i, v) in values.iter_mut().enumerate() {
        *v = f64::from(parts[2 * i]) + f64::from(parts[2 * i + 1]);
    }
    Ok(())
}

/// Broadcasts a few unsigned integers from `root` exactly (16 bits per
/// float), packed into a tensor on the training device. `what` names the call.
pub fn broadcast_integers(
    collective: &mut dyn Collective,
    calls: Calls,
    values: &mut [u64],
    root: usize,
    what: &str,
) -> Result<(), TrainError> {
    if !calls.made(collective) {
        return Ok(());
    }
    let parts: Vec<f32> = values
        .iter()
        .flat_map(|v| (0..4).map(move |k| ((v >> (16 * k)) & 0xffff) as f32))
        .collect();
    let parts = reduce_parts(collective, calls, &parts, Reduction::Broadcast(root), what)?;
    for (i, v) in values.iter_mut().enumerate() {
        *v = (0..4).map(|k| (parts[4 * i + k] as u64) << (16 * k)).sum();
    }
    Ok(())
}

/// `parts` as a tensor on the training device, reduced there, read back.
fn reduce_parts(
    collective: &mut dyn Collective,
    calls: Calls,
    parts: &[f32],
    reduction: Reduction,
    what: &str,
) -> Result<Vec<f32>, TrainError> {
    let _guard = tch::no_grad_guard();
    let mut flat = Tensor::f_from_slice(parts)?.f_to_device(calls.device)?.f_contiguous()?;
    reduce_flat(collective, &mut flat, reduction, what)?;
    Ok(host_read::f32s_of(&flat)?)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
pub(crate) mod tests {
    use super::*;
    use rsb_collective::ring::{RingConfig, RingKey, RingListener, TcpRing};
    use std::time::Duration;

    const CPU: Calls = Calls { device: Device::Cpu, at_world_size_one: false };

    /// Runs `f` on each rank of a ring of `n` CPU ranks (one thread each).
    pub(crate) fn on_ring<T: Send>(n: usize, f: impl Fn(&mut TcpRing) -> T + Sync) -> Vec<T> {
        on_ring_with_timeout(n, Duration::from_secs(60), f)
    }

    /// [`on_ring`] whose calls fail after `timeout` without a peer's data.
    pub(crate) fn on_ring_with_timeout<T: Send>(
        n: usize,
        timeout: Duration,
        f: impl Fn(&mut TcpRing) -> T + Sync,
    ) -> Vec<T> {
        let listeners: Vec<RingListener> =
            (0..n).map(|_| RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap()).collect();
        let addresses: Vec<String> =
            listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        let key = RingKey::derive(b"ddp tests");
        std::thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (addresses, key, f) = (&addresses, &key, &f);
                    scope.spawn(move || {
                        let config = RingConfig { timeout, ..RingConfig::default() };
                        f(&mut listener.connect(rank, addresses, key, config).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn scalars_integers_and_tensors_go_through_the_device_path_exactly() {
        // Values whose f32 rounding would show: only the two-part packing keeps them.
        let results = on_ring(3, |ring| {
            let r = ring.rank() as f64;
            let mut sums = [1e9 + 0.125 * (r + 1.0), -3.5 * r, 7.0];
            sum_scalars(ring, CPU, &mut sums, "test sum").unwrap();
            let mut ints = if ring.rank() == 1 {
                vec![u64::MAX, 0, 123_456_789_012_345, 1 << 48]
            } else {
                vec![9; 4]
            };
            broadcast_integers(ring, CPU, &mut ints, 1, "test broadcast").unwrap();
            let grads = [
                Tensor::from_slice(&[r as f32, 1.0, 2.0]),
                Tensor::from_slice(&[10.0 * r as f32; 4]).view([2, 2]),
            ];
            reduce_tensors(ring, CPU, &grads, Reduction::Sum, "test gradients").unwrap();
            let means = [Tensor::from_slice(&[3.0 * r as f32])];
            reduce_tensors(ring, CPU, &means, Reduction::Mean, "test mean").unwrap();
            let grads: Vec<Vec<f32>> =
                grads.iter().map(|t| Vec::<f32>::try_from(&t.reshape([-1])).unwrap()).collect();
            (sums, ints, grads, means[0].double_value(&[]))
        });
        for (rank, (sums, ints, grads, mean)) in results.iter().enumerate() {
            assert_eq!(sums, &[3e9 + 0.125 * 6.0, -3.5 * 3.0, 21.0], "rank {rank}");
            assert_eq!(ints, &[u64::MAX, 0, 123_456_789_012_345, 1 << 48], "rank {rank}");
            assert_eq!(grads, &[vec![3.0, 3.0, 6.0], vec![30.0; 4]], "rank {rank}");
            assert_eq!(*mean, 3.0, "rank {rank}");
        }
    }

    /// `v` rounded to bf16 (nearest even) and back, as libtorch rounds.
    fn bf16(v: f32) -> f32 {
        Tensor::from_slice(&[v]).to_kind(Kind::BFloat16).to_kind(Kind::Float).double_value(&[])
            as f32
    }

    #[test]
    fn bf16_compression_is_the_bf16_rounding_of_the_sum_of_bf16_inputs() {
        // 2 ranks: one addition, so the result is exactly what a bf16
        // all-reduce computes: bf16(bf16(a) + bf16(b)).
        let n = 300;
        let value = |rank: usize, i: usize| ((i * 7 + rank * 13) as f32 * 0.37).sin() * 3.0;
        let results = on_ring(2, |ring| {
            let r = ring.rank();
            let grads = [Tensor::from_slice(&(0..n).map(|i| value(r, i)).collect::<Vec<f32>>())];
            reduce_tensors(ring, CPU, &grads, Reduction::SumBf16, "compressed").unwrap();
            Vec::<f32>::try_from(&grads[0]).unwrap()
        });
        assert_eq!(results[0], results[1], "the ranks disagree");
        let mut rounded = 0;
        for (i, got) in results[0].iter().enumerate() {
            let (a, b) = (value(0, i), value(1, i));
            assert_eq!(got.to_bits(), bf16(bf16(a) + bf16(b)).to_bits(), "element {i}");
            rounded += usize::from(*got != a + b);
        }
        assert!(rounded > n / 2, "only {rounded} of {n} sums were rounded");
        // 3 ranks: identical everywhere, bf16 values, within bf16's
        // rounding of the exact sum.
        let results = on_ring(3, |ring| {
            let r = ring.rank();
            let grads = [Tensor::from_slice(&(0..n).map(|i| value(r, i)).collect::<Vec<f32>>())];
            reduce_tensors(ring, CPU, &grads, Reduction::SumBf16, "compressed").unwrap();
            Vec::<f32>::try_from(&grads[0]).unwrap()
        });
        assert_eq!(results[0], results[1]);
        assert_eq!(results[0], results[2]);
        for (i, got) in results[0].iter().enumerate() {
            let terms = [value(0, i), value(1, i), value(2, i)];
            let exact: f32 = terms.iter().sum();
            let magnitude: f32 = terms.iter().map(|t| t.abs()).sum();
            assert_eq!(got.to_bits() & 0xffff, 0, "element {i}: {got} is not a bf16 value");
            assert!((got - exact).abs() <= 3.0 * 2f32.powi(-9) * magnitude, "element {i}");
        }
    }

    /// A world of one rank that counts the calls made on it.
    #[derive(Default)]
    pub(crate) struct Counting {
        pub(crate) calls: usize,
    }

    impl Collective for Counting {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            1
        }
        fn all_reduce_sum(&mut self, _buffer: Buffer<'_>) -> Result<(), CollectiveError> {
            self.calls += 1;
            Ok(())
        }
        fn broadcast(&mut self, _buffer: Buffer<'_>, _root: usize) -> Result<(), CollectiveError> {
            self.calls += 1;
            Ok(())
        }
    }

    fn calls_made(calls: Calls) -> usize {
        let mut counting = Counting::default();
        let tensors = [Tensor::from_slice(&[1.0f32, 2.0])];
        reduce_tensors(&mut counting, calls, &tensors, Reduction::Sum, "t").unwrap();
        reduce_tensors(&mut counting, calls, &tensors, Reduction::Broadcast(0), "t").unwrap();
        sum_scalars(&mut counting, calls, &mut [1.5], "s").unwrap();
        broadcast_integers(&mut counting, calls, &mut [7], 0, "i").unwrap();
        counting.calls
    }

    #[test]
    fn world_size_one_skips_the_calls_unless_asked_to_make_them() {
        assert_eq!(calls_made(CPU), 0);
        assert_eq!(calls_made(Calls { at_world_size_one: true, ..CPU }), 4);
    }

    /// A collective whose every call fails, as a dead peer makes them.
    struct Broken;

    impl Collective for Broken {
        fn rank(&self) -> usize {
            2
        }
        fn world_size(&self) -> usize {
            3
        }
        fn all_reduce_sum(&mut self, _buffer: Buffer<'_>) -> Result<(), CollectiveError> {
            Err(CollectiveError::Timeout {
                rank: 2,
                peer: 1,
                address: "10.0.0.1:7000".into(),
                waited: Duration::from_secs(15),
            })
        }
        fn broadcast(&mut self, buffer: Buffer<'_>, _root: usize) -> Result<(), CollectiveError> {
            self.all_reduce_sum(buffer)
        }
    }

    #[test]
    fn a_failed_call_names_the_call_the_rank_and_the_peer() {
        let tensors: Vec<Tensor> = (0..3).map(|_| Tensor::from_slice(&[1.0f32])).collect();
        let e =
            reduce_tensors(&mut Broken, CPU, &tensors, Reduction::Sum, "all-reduce of gradients")
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("all-reduce of gradients, bucket 1 (tensors 0..3) failed: "), "{e}");
        assert!(e.contains("rank 2: rank 1 (10.0.0.1:7000) did not answer for 15 s"), "{e}");
        let e = sum_scalars(&mut Broken, CPU, &mut [1.0], "metric sum").unwrap_err().to_string();
        assert!(e.starts_with("metric sum failed: rank 2: rank 1"), "{e}");
    }
}
