//! Data parallelism over a [`Collective`]: gradients are packed into flat
//! buckets (about 25 MB, as PyTorch DDP's default) and summed across ranks,
//! parameters, buffers and optimizer state are broadcast from rank 0 at the
//! start, BN running statistics are averaged at the end of an epoch (timm's
//! `--dist-bn reduce`), and metric and evaluation sums are summed.
//!
//! One device path: every call, gradients and scalars alike, reduces a flat
//! f32 tensor on the training device through `issue_flat`. Scalars are
//! packed into such a tensor (f64 as two f32 parts, integers as 16-bit
//! parts, so both stay exact). CUDA memory goes to a backend that reduces
//! device memory (NCCL) as it is; for the others (the TCP ring) it is staged
//! through a pinned host tensor: copied there, reduced, copied back. So a
//! multi-rank CUDA job runs on either backend, and the ring on the CPU runs
//! exactly the code NCCL runs but for that staging.
//!
//! A call is issued, then finished ([`issue_tensors`], [`finish`]): NCCL
//! runs its collectives on a stream of its own, so a bucket's values are
//! unpacked into its tensors only after [`Collective::join`], which orders
//! libtorch's default stream after them without waiting on the host. The
//! overlapped backward pass issues its buckets as they become ready and
//! finishes them all once the pass is done; the other calls finish at once.
//! The ring completes a collective before it returns, so there the join is
//! a no-op, and the order is the same.
//!
//! Gradient buckets may travel as bf16 ([`Reduction::SumBf16`], DDP's
//! `bf16_compress_hook`): over the ring and over NCCL as bf16 on the wire
//! (half the bytes; summed in bf16).
//!
//! At world size 1 every call returns at once, unless [`Calls`] asks for
//! them (`distributed.collectives_at_world_size_one`, to exercise a backend
//! on one device). Every failure names the collective call ([`TrainError::Collective`]).

use crate::error::TrainError;
use crate::host_read;
use rsb_collective::{Buffer, Collective, CollectiveError, DeviceElement};
use tch::{Device, Kind, TchError, Tensor};

/// Floats per bucket: 25 MiB (26.2 MB) of f32.
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

/// Issues `reduction` of a flat, contiguous f32 tensor on its device
/// (staged through pinned host memory for a backend that cannot reduce
/// CUDA memory) and returns the tensor that holds the result once the
/// collective is joined ([`Collective::join`]): `flat` itself, or the bf16
/// copy that [`Reduction::SumBf16`] reduced. A [`Reduction::Mean`] is
/// issued as a sum (the division comes after the join). The caller keeps
/// the returned tensor alive until after the join.
fn issue_flat(
    collective: &mut dyn Collective,
    flat: Tensor,
    reduction: Reduction,
    what: &str,
) -> Result<Tensor, TrainError> {
    let len = flat.numel();
    if len == 0 {
        return Ok(flat);
    }
    if reduction == Reduction::SumBf16 && !collective.sums_bf16() {
        // A backend without bf16 sums: the values are rounded to bf16
        // before, and the sum rounded after, as a bf16 all-reduce of two
        // ranks leaves it; the wire carries f32.
        let mut flat = flat;
        round_to_bf16(&mut flat)?;
        let mut sum = issue_flat(collective, flat, Reduction::Sum, what)?;
        collective.join().map_err(|e| failed(what, e))?;
        round_to_bf16(&mut sum)?;
        return Ok(sum);
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
            Ok(half)
        }
        Device::Cpu => {
            // SAFETY: `flat` is a contiguous f32 CPU tensor of `len` elements
            // that we own exclusively for the duration of the call.
            let data = unsafe { std::slice::from_raw_parts_mut(flat.data_ptr() as *mut f32, len) };
            run(collective, Buffer::Host(data), reduction, what)?;
            Ok(flat)
        }
        Device::Cuda(device) if collective.reduces_device_memory() => {
            let (buffer, element) = match reduction {
                // NCCL sums bf16: half the bytes on the wire.
                Reduction::SumBf16 => {
                    (flat.f_to_kind(Kind::BFloat16)?.f_contiguous()?, DeviceElement::Bf16)
                }
                _ => (flat, DeviceElement::F32),
            };
            // SAFETY: `buffer` is a contiguous tensor of `len` elements of
            // `element` on CUDA device `device`, written by work queued on
            // libtorch's default stream; we own it exclusively and return it
            // to the caller, who keeps it alive until after the join.
            let memory = unsafe {
                rsb_collective::CudaBuffer::new(buffer.data_ptr() as u64, len, device, element)
            };
            run(collective, Buffer::Cuda(memory), reduction, what)?;
            Ok(buffer)
        }
        Device::Cuda(device) => {
            // The only branch CI cannot run: stage through pinned host memory
            // (blocking copies), then reduce the host copy like any CPU
            // tensor (a host backend completes before it returns, and the
            // copies block: the buffer is free again once copied back).
            let mut host = take_staging(device, len as i64)?;
            host.f_copy_(&flat)?;
            let reduced = issue_flat(collective, host.shallow_clone(), reduction, what)?;
            let mut flat = flat;
            flat.f_copy_(&reduced)?;
            put_back_staging(device, host);
            Ok(flat)
        }
        _ => Err(failed(
            what,
            CollectiveError::WrongMemory {
                backend: "rsb-train's data parallelism",
                location: "memory other than the host's or CUDA's",
            },
        )),
    }
}

/// Pinned f32 host buffers that stage CUDA tensors for a host backend, one
/// per device and length (a bucket's, a scalar pack's), kept as DDP keeps
/// its buckets: made once, not pinned again (with an uninitialised copy) at
/// every update. Shared by the threads that reduce (the overlapped backward
/// pass reduces on a thread of its own): a buffer is taken out while it
/// stages, and put back after.
static STAGING: std::sync::Mutex<Vec<((usize, i64), Tensor)>> = std::sync::Mutex::new(Vec::new());

/// A pinned staging buffer of `len` f32 for CUDA device `device`, taken
/// out of [`STAGING`] (or made); [`put_back_staging`] returns it. One lost
/// on an error path is only made again. Pinned by `_pin_memory`, as
/// batches are (`pin_memory(device)` warns).
fn take_staging(device: usize, len: i64) -> Result<Tensor, TchError> {
    let mut buffers = STAGING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(at) = buffers.iter().position(|(key, _)| *key == (device, len)) {
        return Ok(buffers.swap_remove(at).1);
    }
    drop(buffers);
    Tensor::f_empty([len], (Kind::Float, Device::Cpu))?.f_internal_pin_memory(Device::Cuda(device))
}

/// Returns a buffer from [`take_staging`] for the next call to use.
fn put_back_staging(device: usize, buffer: Tensor) {
    let len = buffer.numel() as i64;
    STAGING.lock().unwrap_or_else(|p| p.into_inner()).push(((device, len), buffer));
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

/// A bucket whose collective has been issued, perhaps not yet completed (a
/// device backend runs it on a stream of its own): [`finish`] unpacks it
/// into its tensors after the join. Dropped without [`finish`] only after a
/// join ([`abandon`]), so that its memory cannot be reused before the
/// collective that writes it has run.
#[derive(Debug)]
pub struct Issued {
    /// The tensors the bucket packs, in order.
    targets: Vec<Tensor>,
    /// The reduced values once joined (f32, or bf16 for [`Reduction::SumBf16`]).
    result: Tensor,
    /// [`Reduction::Mean`]: the world size to divide by after the join.
    mean_over: Option<usize>,
}

/// Issues `reduction` of every tensor, packed into buckets of at most
/// [`BUCKET_FLOATS`] floats in the given order (the same on every rank);
/// [`finish`] completes them. Undefined tensors (parameters without a
/// gradient) are skipped on every rank alike only if they are undefined
/// everywhere; callers pass gradients after a backward pass that reached
/// every parameter. `what` names the call in errors (the bucket number is
/// added).
pub fn issue_tensors(
    collective: &mut dyn Collective,
    calls: Calls,
    tensors: &[Tensor],
    reduction: Reduction,
    what: &str,
) -> Result<Vec<Issued>, TrainError> {
    let mut issued = Vec::new();
    if !calls.made(collective) {
        return Ok(issued);
    }
    let _guard = tch::no_grad_guard();
    let mean_over = (reduction == Reduction::Mean).then(|| collective.world_size());
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
        let bucket_what = format!("{what}, bucket {} (tensors {start}..{end})", issued.len() + 1);
        let packed = bucket
            .iter()
            .map(|t| t.f_to_kind(Kind::Float)?.f_reshape([-1]))
            .collect::<Result<Vec<Tensor>, _>>()
            .and_then(|views| Tensor::f_cat(&views, 0)?.f_contiguous());
        let result = match packed {
            Ok(flat) => issue_flat(collective, flat, reduction, &bucket_what),
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(result) => issued.push(Issued {
                targets: bucket.iter().map(Tensor::shallow_clone).collect(),
                result,
                mean_over,
            }),
            Err(e) => {
                abandon(collective, issued);
                return Err(e);
            }
        }
        start = end;
    }
    Ok(issued)
}

/// Joins the issued buckets' collectives and unpacks every bucket into its
/// tensors (dividing by the world size for a mean). `what` names the join
/// in errors.
pub fn finish(
    collective: &mut dyn Collective,
    issued: Vec<Issued>,
    what: &str,
) -> Result<(), TrainError> {
    if issued.is_empty() {
        return Ok(());
    }
    collective.join().map_err(|e| failed(what, e))?;
    let _guard = tch::no_grad_guard();
    for bucket in issued {
        let result = match bucket.mean_over {
            Some(world) => bucket.result.f_div_scalar(world as f64)?,
            None => bucket.result,
        };
        let mut offset = 0;
        for t in &bucket.targets {
            let n = t.numel() as i64;
            let part = result.f_narrow(0, offset, n)?.f_view(t.size().as_slice())?;
            t.shallow_clone().f_copy_(&part)?;
            offset += n;
        }
    }
    Ok(())
}

/// Drops issued buckets that will not be finished (a later call failed),
/// after a join, so that their memory is not reused before their
/// collectives ran. The join's own failure is the backend's, already
/// reported by the failure that got us here.
pub fn abandon(collective: &mut dyn Collective, issued: Vec<Issued>) {
    if !issued.is_empty() {
        let _ = collective.join();
    }
    drop(issued);
}

/// Applies `reduction` to every tensor (in place): [`issue_tensors`], then
/// [`finish`].
pub fn reduce_tensors(
    collective: &mut dyn Collective,
    calls: Calls,
    tensors: &[Tensor],
    reduction: Reduction,
    what: &str,
) -> Result<(), TrainError> {
    let issued = issue_tensors(collective, calls, tensors, reduction, what)?;
    finish(collective, issued, what)
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
    let flat = Tensor::f_from_slice(parts)?.f_to_device(calls.device)?.f_contiguous()?;
    let result = issue_flat(collective, flat, reduction, what)?;
    collective.join().map_err(|e| failed(what, e))?;
    let read = host_read::f32s_of(&result)?;
    // Joined again once read: NCCL's watchdog may have aborted the
    // collective while the read waited for it, and an aborted kernel ends,
    // leaving half-reduced values for the read. The abort's failure is
    // recorded by then (the join waits for the watchdog's lock), so the
    // values are never taken for a result (an evaluation's counts, the
    // position a job starts from).
    collective.join().map_err(|e| failed(what, e))?;
    Ok(read)
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

    /// A world of two identical ranks whose collectives, like NCCL's on its
    /// own stream, take effect only at the join: each sum doubles its
    /// buffer then. Results read before the join, or buffers freed before
    /// it, would be wrong.
    #[derive(Default)]
    pub(crate) struct OnItsOwnStream {
        /// Issued, not yet joined: (address, floats).
        issued: Vec<(usize, usize)>,
        pub(crate) joins: usize,
        pub(crate) sums: usize,
    }

    impl Collective for OnItsOwnStream {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&mut self, buffer: Buffer<'_>) -> Result<(), CollectiveError> {
            let Buffer::Host(data) = buffer else { panic!("a host buffer") };
            self.issued.push((data.as_mut_ptr() as usize, data.len()));
            self.sums += 1;
            Ok(())
        }
        fn broadcast(&mut self, _buffer: Buffer<'_>, _root: usize) -> Result<(), CollectiveError> {
            Ok(())
        }
        fn join(&mut self) -> Result<(), CollectiveError> {
            self.joins += 1;
            for (address, len) in self.issued.drain(..) {
                // SAFETY: the contract under test: an issued buffer stays
                // alive, and untouched by anyone else, until the join.
                let data = unsafe { std::slice::from_raw_parts_mut(address as *mut f32, len) };
                data.iter_mut().for_each(|v| *v *= 2.0);
            }
            Ok(())
        }
    }

    #[test]
    fn results_are_unpacked_after_the_join_and_buffers_live_until_it() {
        let mut stream = OnItsOwnStream::default();
        let calls = Calls { device: Device::Cpu, at_world_size_one: false };
        let grads = [Tensor::from_slice(&[1.0f32, -2.0]), Tensor::from_slice(&[0.5f32; 4])];
        reduce_tensors(&mut stream, calls, &grads, Reduction::Sum, "sum").unwrap();
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), [2.0, -4.0]);
        assert_eq!(Vec::<f32>::try_from(&grads[1]).unwrap(), [1.0; 4]);
        // A mean divides the joined sum: a division before it would halve.
        let stats = [Tensor::from_slice(&[3.0f32])];
        reduce_tensors(&mut stream, calls, &stats, Reduction::Mean, "mean").unwrap();
        assert_eq!(Vec::<f32>::try_from(&stats[0]).unwrap(), [3.0]);
        let mut sums = [1.25, 1e9 + 0.5];
        sum_scalars(&mut stream, calls, &mut sums, "scalars").unwrap();
        assert_eq!(sums, [2.5, 2e9 + 1.0]);
        // Issued together, joined once.
        let issued = issue_tensors(&mut stream, calls, &grads, Reduction::Sum, "sum").unwrap();
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), [2.0, -4.0], "not yet joined");
        finish(&mut stream, issued, "sum").unwrap();
        assert_eq!(Vec::<f32>::try_from(&grads[0]).unwrap(), [4.0, -8.0]);
        assert_eq!((stream.sums, stream.joins), (4, 5), "the scalars joined again once read");
    }

    /// A collective aborted (NCCL's watchdog, at its timeout) while its
    /// result was read: the first join passed, the next reports the abort.
    #[derive(Default)]
    struct AbortedWhileRead {
        joins: usize,
    }

    impl Collective for AbortedWhileRead {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&mut self, _buffer: Buffer<'_>) -> Result<(), CollectiveError> {
            Ok(())
        }
        fn broadcast(&mut self, _buffer: Buffer<'_>, _root: usize) -> Result<(), CollectiveError> {
            Ok(())
        }
        fn join(&mut self) -> Result<(), CollectiveError> {
            self.joins += 1;
            if self.joins == 1 {
                return Ok(());
            }
            Err(CollectiveError::Nccl("rank 0: aborted after 600 s (all-reduce)".into()))
        }
    }

    #[test]
    fn values_read_from_a_collective_aborted_meanwhile_are_not_taken() {
        let mut sums = [3.0, 4.0];
        let e = sum_scalars(&mut AbortedWhileRead::default(), CPU, &mut sums, "evaluation sums")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("evaluation sums failed: ") && e.contains("aborted"), "{e}");
        let mut position = [7, 9];
        let aborted = broadcast_integers(
            &mut AbortedWhileRead::default(),
            CPU,
            &mut position,
            0,
            "position broadcast",
        );
        assert!(aborted.is_err(), "{aborted:?}");
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
