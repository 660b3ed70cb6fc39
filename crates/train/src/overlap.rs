//! Gradient buckets, reduced over the ranks either after the backward pass or
//! while it still runs (PyTorch DDP's overlap).
//!
//! [`GradientBuckets`] packs the parameters into buckets of at most
//! [`crate::ddp::BUCKET_FLOATS`] floats (in training) in reverse parameter order, the order in which a
//! backward pass finishes their gradients (last layers first), as DDP does.
//! Both paths reduce exactly these buckets in exactly this order, so their
//! results are bit-identical whatever the world size:
//!
//! * [`GradientBuckets::reduce_after_backward`]: every bucket once the whole
//!   backward pass is done;
//! * [`GradientBuckets::backward_and_reduce`]: a post-accumulate-grad hook on
//!   every parameter ([`rsb_torch_shim::hooks`]) counts the gradients of each bucket
//!   down while the backward pass runs; a scoped thread reduces bucket 0 as
//!   soon as all of its gradients are accumulated, then bucket 1, and so on,
//!   while the backward pass computes the rest. The buckets are reduced in
//!   index order on every rank (the collectives are sequential protocols); a
//!   bucket still waiting when the pass ends is issued then, and a parameter
//!   that got no gradient in the pass is an error naming it.
//!
//! On both paths every bucket is issued first and all are finished
//! ([`crate::ddp::finish`]) once the pass is done: NCCL runs them on its
//! own stream, alongside the backward kernels queued after them, and only
//! the unpacking into the gradients waits for them (on the device).
//!
//! With gradient accumulation only the last micro-batch's backward pass
//! overlaps (the earlier ones only accumulate locally, like DDP's `no_sync`).
//!
//! With `distributed.gradient_compression: bf16` every bucket, on either
//! path, is reduced as [`Reduction::SumBf16`] (DDP's `bf16_compress_hook`).

use crate::ddp::{abandon, finish, issue_tensors, Calls, Issued, Reduction};
use crate::error::TrainError;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rsb_collective::Collective;
use rsb_recipes::GradientCompression;
use rsb_torch_shim::GradReadyHooks;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;

/// Sent after the backward pass has returned (no more hooks will fire).
const BACKWARD_DONE: usize = usize::MAX;
/// Sent instead when the backward pass failed (or panicked): the reducer
/// stops at once, so no rank reduces a bucket that its peers would reduce
/// with other gradients; the rank then fails with the backward pass's error.
const BACKWARD_FAILED: usize = usize::MAX - 1;

/// Disarms the hooks and tells the reducer how the backward pass ended,
/// also when it panics.
struct EndOfBackward<'a> {
    overlap: &'a Overlap,
    message: usize,
}

impl Drop for EndOfBackward<'_> {
    fn drop(&mut self) {
        self.overlap.armed.store(false, Ordering::Release);
        // The receiver lives as long as `overlap`.
        let _ = self.overlap.done.send(self.message);
    }
}

/// The hooks of an overlapped reduction and their channel.
struct Overlap {
    ready: Receiver<usize>,
    done: Sender<usize>,
    armed: Arc<AtomicBool>,
    _hooks: GradReadyHooks,
}

/// The parameters' gradient buckets and, with overlap, their hooks.
pub struct GradientBuckets {
    params: Vec<Tensor>,
    /// The parameters' names, for errors (empty: they are named by index).
    names: Vec<String>,
    /// How each bucket is reduced: [`Reduction::Sum`], or
    /// [`Reduction::SumBf16`] with bf16 gradient compression.
    reduction: Reduction,
    /// Parameter indices of each bucket, in reduction order.
    buckets: Vec<Vec<usize>>,
    /// The bucket of each parameter.
    bucket_of: Vec<usize>,
    overlap: Option<Overlap>,
}

impl std::fmt::Debug for GradientBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradientBuckets")
            .field("params", &self.params.len())
            .field("buckets", &self.buckets.len())
            .field("overlap", &self.overlap.is_some())
            .finish()
    }
}

impl GradientBuckets {
    /// Buckets `params` (the optimizer's parameters, the same order on every
    /// rank) into buckets of at most `bucket_floats` floats (a larger
    /// parameter gets a bucket of its own; [`crate::ddp::BUCKET_FLOATS`] in
    /// training);
    /// with `overlap`, hooks them so that their reduction can start during
    /// the backward pass; with `compression` the buckets travel as bf16
    /// ([`Reduction::SumBf16`], on both paths).
    pub fn new(
        params: Vec<Tensor>,
        bucket_floats: usize,
        overlap: bool,
        compression: GradientCompression,
    ) -> Result<GradientBuckets, TrainError> {
        let reduction = match compression {
            GradientCompression::None => Reduction::Sum,
            GradientCompression::Bf16 => Reduction::SumBf16,
        };
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut floats = 0;
        for index in (0..params.len()).rev() {
            let n = params[index].numel();
            match buckets.last_mut() {
                Some(bucket) if floats + n <= bucket_floats => {
                    bucket.push(index);
                    floats += n;
                }
                _ => {
                    buckets.push(vec![index]);
                    floats = n;
                }
            }
        }
        let mut bucket_of = vec![0; params.len()];
        for (b, bucket) in buckets.iter().enumerate() {
            for &i in bucket {
                bucket_of[i] = b;
            }
        }
        let overlap = if overlap {
            let (sender, ready) = crossbeam_channel::unbounded();
            let armed = Arc::new(AtomicBool::new(false));
            let hook_sender = sender.clone();
            let hook_armed = armed.clone();
            // SAFETY: the trainer's thread installs the hooks, runs every
            // backward pass that reaches these parameters (blocking until it
            // is done) and drops the hooks with these buckets: none runs
            // while they are installed or removed.
            let hooks = unsafe {
                GradReadyHooks::install(
                    &params,
                    Arc::new(move |index| {
                        if hook_armed.load(Ordering::Acquire) {
                            // The receiver lives as long as the hooks.
                            let _ = hook_sender.send(index);
                        }
                    }),
                )
            }
            .map_err(|e| TrainError::GradientReduction(e.to_string()))?;
            Some(Overlap { ready, done: sender, armed, _hooks: hooks })
        } else {
            None
        };
        Ok(GradientBuckets { params, names: Vec::new(), reduction, buckets, bucket_of, overlap })
    }

    /// Names the parameters (in their order) in errors.
    pub fn with_names(mut self, names: Vec<String>) -> GradientBuckets {
        self.names = names;
        self
    }

    /// What the reduction of update `update`'s gradients works with.
    fn plan(&self, calls: Calls, update: u64) -> Plan<'_> {
        Plan {
            params: &self.params,
            names: &self.names,
            buckets: &self.buckets,
            bucket_of: &self.bucket_of,
            calls,
            update,
            reduction: self.reduction,
        }
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether there is no parameter.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Whether the reduction overlaps the backward pass.
    pub fn overlaps(&self) -> bool {
        self.overlap.is_some()
    }

    /// Sums every bucket's gradients over the ranks, after the backward
    /// pass of optimizer update `update` (0-based; named in errors).
    pub fn reduce_after_backward(
        &self,
        collective: &mut dyn Collective,
        calls: Calls,
        update: u64,
    ) -> Result<(), TrainError> {
        let mut issued = Vec::new();
        let plan = self.plan(calls, update);
        for b in 0..self.buckets.len() {
            match issue_bucket(collective, &plan, b) {
                Ok(bucket) => issued.extend(bucket),
                Err(e) => {
                    abandon(collective, issued);
                    return Err(e);
                }
            }
        }
        finish(collective, issued, &gradients_of(update))
    }

    /// Runs `backward` (the update's last backward pass) and sums the
    /// gradients over the ranks, each bucket as soon as its gradients are
    /// accumulated (without overlap: after `backward`). A bucket still
    /// waiting for gradients after `deadline` is an error naming it.
    /// Returns how long the caller waited for the sums once `backward` had
    /// returned (the other ranks' lateness, on a host-synchronous backend).
    pub fn backward_and_reduce(
        &self,
        collective: &mut dyn Collective,
        calls: Calls,
        update: u64,
        deadline: Duration,
        backward: impl FnOnce() -> Result<(), TrainError>,
    ) -> Result<Duration, TrainError> {
        let overlap = match &self.overlap {
            Some(overlap) if calls.made(collective) => overlap,
            _ => {
                backward()?;
                let backward_done = Instant::now();
                self.reduce_after_backward(collective, calls, update)?;
                return Ok(backward_done.elapsed());
            }
        };
        // Left over from a pass that failed half way: not this pass's.
        while overlap.ready.try_recv().is_ok() {}
        overlap.armed.store(true, Ordering::Release);
        let (backward_result, reduce_result, backward_done) = std::thread::scope(|scope| {
            let collective = &mut *collective;
            // Tensors are not `Sync`: the thread gets its own handles.
            let params: Vec<Tensor> = self.params.iter().map(Tensor::shallow_clone).collect();
            let ready = &overlap.ready;
            let (names, buckets, bucket_of) = (&self.names, &self.buckets, &self.bucket_of);
            let reduction = self.reduction;
            let reducer = std::thread::Builder::new().name("grad-reducer".into()).spawn_scoped(
                scope,
                move || {
                    // Its libtorch warnings are logged as the training thread's.
                    rsb_torch_shim::warnings::route_this_threads_warnings_too();
                    let plan = Plan {
                        params: &params,
                        names,
                        buckets,
                        bucket_of,
                        calls,
                        update,
                        reduction,
                    };
                    reduce_as_ready(collective, &plan, ready, deadline)
                },
            );
            let reducer = match reducer {
                Ok(reducer) => reducer,
                Err(e) => {
                    // Nothing issued, nothing to wait for: the hooks stand down.
                    overlap.armed.store(false, Ordering::Release);
                    return Err(TrainError::GradientReduction(format!(
                        "{}: cannot start the reducing thread: {e}",
                        gradients_of(update)
                    )));
                }
            };
            let mut end = EndOfBackward { overlap, message: BACKWARD_FAILED };
            let result = backward();
            let backward_done = Instant::now();
            if result.is_ok() {
                end.message = BACKWARD_DONE;
            }
            drop(end);
            let reduced = reducer.join().unwrap_or_else(|_| {
                Err(TrainError::GradientReduction("the reducing thread panicked".into()))
            });
            Ok((result, reduced, backward_done))
        })?;
        match (backward_result, reduce_result) {
            (Ok(()), Ok(issued)) => {
                finish(collective, issued, &gradients_of(update))?;
                Ok(backward_done.elapsed())
            }
            (Err(e), Ok(issued)) => {
                abandon(collective, issued);
                Err(e)
            }
            // The reducer abandoned what it had issued.
            (Err(e), Err(_)) | (Ok(()), Err(e)) => Err(e),
        }
    }
}

/// Names the reduction of an update's gradients in errors.
fn gradients_of(update: u64) -> String {
    format!("all-reduce of the gradients of update {}", update + 1)
}

/// Issues the sum of the gradients of bucket `b`'s parameters. Every one
/// must have a gradient, as PyTorch DDP requires (without
/// `find_unused_parameters`): a parameter this backward pass did not reach
/// has none (gradients are set to none between updates), and leaving it out
/// here could sum different parameters on different ranks. It is an error
/// naming the parameter.
fn issue_bucket(
    collective: &mut dyn Collective,
    plan: &Plan<'_>,
    b: usize,
) -> Result<Vec<Issued>, TrainError> {
    let bucket = &plan.buckets[b];
    let what = format!("{}, bucket {} of {}", gradients_of(plan.update), b + 1, plan.buckets.len());
    let mut grads = Vec::with_capacity(bucket.len());
    for &i in bucket {
        let grad = plan.params[i].grad();
        if !grad.defined() {
            let name = plan.names.get(i).map_or(format!("parameter {i}"), |n| format!("`{n}`"));
            return Err(TrainError::GradientReduction(format!(
                "{what}: {name} has no gradient: the backward pass did not reach it, and \
                 data parallelism sums every parameter's gradient on every rank"
            )));
        }
        grads.push(grad);
    }
    issue_tensors(collective, plan.calls, &grads, plan.reduction, &what)
}

/// What the reducing thread reduces.
struct Plan<'a> {
    params: &'a [Tensor],
    /// The parameters' names (may be empty).
    names: &'a [String],
    buckets: &'a [Vec<usize>],
    bucket_of: &'a [usize],
    calls: Calls,
    update: u64,
    reduction: Reduction,
}

/// The reducing thread: issues bucket after bucket, each once all its
/// gradients are ready or the backward pass has ended; returns them for
/// [`finish`] (on a failure, abandoned after a join).
fn reduce_as_ready(
    collective: &mut dyn Collective,
    plan: &Plan<'_>,
    ready: &Receiver<usize>,
    deadline: Duration,
) -> Result<Vec<Issued>, TrainError> {
    let mut issued = Vec::new();
    match issue_as_ready(collective, plan, ready, deadline, &mut issued) {
        Ok(()) => Ok(issued),
        Err(e) => {
            abandon(collective, issued);
            Err(e)
        }
    }
}

/// [`reduce_as_ready`]'s loop, collecting into `issued`.
fn issue_as_ready(
    collective: &mut dyn Collective,
    plan: &Plan<'_>,
    ready: &Receiver<usize>,
    deadline: Duration,
    issued: &mut Vec<Issued>,
) -> Result<(), TrainError> {
    let (buckets, bucket_of) = (plan.buckets, plan.bucket_of);
    let mut waiting: Vec<usize> = buckets.iter().map(Vec::len).collect();
    let mut backward_done = false;
    let until = Instant::now() + deadline;
    for b in 0..buckets.len() {
        while waiting[b] > 0 && !backward_done {
            let left = until.saturating_duration_since(Instant::now());
            match ready.recv_timeout(left) {
                Ok(BACKWARD_DONE) => backward_done = true,
                // This rank fails with the backward pass's own error.
                Ok(BACKWARD_FAILED) => return Ok(()),
                Ok(index) => {
                    if let Some(&bucket) = bucket_of.get(index) {
                        waiting[bucket] = waiting[bucket].saturating_sub(1);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(TrainError::GradientReduction(format!(
                        "update {}, gradient bucket {} of {}: {} of its gradients still not \
                         ready {:.0} s after the backward pass began",
                        plan.update + 1,
                        b + 1,
                        buckets.len(),
                        waiting[b],
                        deadline.as_secs_f64()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => backward_done = true,
            }
        }
        issued.extend(issue_bucket(collective, plan, b)?);
    }
    // Drain the end marker if the last bucket completed before it came.
    while !backward_done {
        match ready.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(BACKWARD_DONE | BACKWARD_FAILED) | Err(_) => backward_done = true,
            Ok(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::ddp::tests::{on_ring, Counting, OnItsOwnStream};
    use crate::ddp::BUCKET_FLOATS;
    use tch::{nn, nn::Module, Device, Kind};

    const CALLS: Calls = Calls { device: Device::Cpu, at_world_size_one: false };

    /// A small MLP whose weights are the same on every rank, its
    /// loss on rank-specific data, and its gradients after one update of
    /// `micro_batches` accumulated micro-batches, reduced with or without
    /// overlap over a 3-rank ring of threads.
    fn gradients(
        overlap: bool,
        micro_batches: usize,
        bucket_floats: usize,
        compression: GradientCompression,
    ) -> Vec<Vec<Vec<f32>>> {
        on_ring(3, |ring| {
            let vs = nn::VarStore::new(Device::Cpu);
            let net = nn::seq()
                .add(nn::linear(vs.root() / "a", 16, 64, Default::default()))
                .add_fn(|x| x.relu())
                .add(nn::linear(vs.root() / "b", 64, 64, Default::default()))
                .add_fn(|x| x.tanh())
                .add(nn::linear(vs.root() / "c", 64, 10, Default::default()));
            let params = vs.trainable_variables();
            // The same weights on every rank, without libtorch's global
            // generator (which the crate's other tests draw from meanwhile).
            tch::no_grad(|| {
                for (k, p) in params.iter().enumerate() {
                    let values = (Tensor::arange(p.numel() as i64, (Kind::Float, Device::Cpu))
                        * (0.37 + k as f64))
                        .sin()
                        * 0.2;
                    p.shallow_clone().copy_(&values.reshape(p.size()));
                }
            });
            let buckets = GradientBuckets::new(
                params.iter().map(Tensor::shallow_clone).collect(),
                bucket_floats,
                overlap,
                compression,
            )
            .unwrap();
            for micro in 0..micro_batches {
                // Rank- and micro-batch-specific data, without the global generator.
                let phase = (1 + ring.rank() * micro_batches + micro) as f64;
                let x = (Tensor::arange(8 * 16, (Kind::Float, Device::Cpu)) * phase)
                    .sin()
                    .reshape([8, 16]);
                let loss = net.forward(&x).square().mean(Kind::Float);
                if micro + 1 < micro_batches {
                    loss.backward();
                } else {
                    buckets
                        .backward_and_reduce(ring, CALLS, 0, Duration::from_secs(30), || {
                            loss.f_backward()?;
                            Ok(())
                        })
                        .unwrap();
                }
            }
            params
                .iter()
                .map(|p| Vec::<f32>::try_from(p.grad().reshape([-1])).unwrap())
                .collect::<Vec<_>>()
        })
    }

    #[test]
    fn the_wait_after_backward_is_the_late_ranks_lateness_with_and_without_overlap() {
        // Rank 1's backward pass takes 400 ms longer: rank 0 waits for it
        // after its own pass, rank 1 finds rank 0's buckets ready.
        const LATE: Duration = Duration::from_millis(400);
        for overlap in [false, true] {
            let waits = on_ring(2, |ring| {
                let w = Tensor::ones([64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
                let buckets = GradientBuckets::new(
                    vec![w.shallow_clone()],
                    BUCKET_FLOATS,
                    overlap,
                    GradientCompression::None,
                )
                .unwrap();
                let late = ring.rank() == 1;
                let loss = (&w * 2.0).sum(Kind::Float);
                buckets
                    .backward_and_reduce(ring, CALLS, 0, Duration::from_secs(30), || {
                        if late {
                            std::thread::sleep(LATE);
                        }
                        loss.f_backward()?;
                        Ok(())
                    })
                    .unwrap()
            });
            assert!(waits[0] >= LATE / 2, "overlap {overlap}: rank 0 waited {:?}", waits[0]);
            assert!(waits[1] < LATE / 2, "overlap {overlap}: rank 1 waited {:?}", waits[1]);
        }
    }

    #[test]
    fn buckets_go_last_layers_first_and_never_exceed_the_bucket_size() {
        let big = Tensor::zeros([BUCKET_FLOATS as i64 - 10], (Kind::Float, Device::Cpu));
        let small = || Tensor::zeros([20], (Kind::Float, Device::Cpu));
        let buckets = GradientBuckets::new(
            vec![small(), big, small(), small()],
            BUCKET_FLOATS,
            false,
            GradientCompression::None,
        )
        .unwrap();
        assert_eq!(buckets.buckets, vec![vec![3, 2], vec![1], vec![0]]);
        assert_eq!(buckets.bucket_of, vec![2, 1, 0, 0]);
    }

    #[test]
    fn resnet50s_buckets_are_those_docs_scaling_md_predicts_with() {
        let model =
            rsb_vision::Model::new("resnet50", rsb_vision::ModelConfig::default(), Device::Cpu)
                .unwrap();
        let config = rsb_recipes::LambOptimizer {
            lr: 5e-3,
            weight_decay: 0.02,
            betas: [0.9, 0.999],
            eps: 1e-6,
            max_grad_norm: None,
            trust_clip: false,
            always_adapt: false,
        };
        let optimizer = crate::lamb::Lamb::new(&model, &config).unwrap();
        let params = optimizer.parameters();
        let buckets = GradientBuckets::new(
            params.iter().map(Tensor::shallow_clone).collect(),
            BUCKET_FLOATS,
            false,
            GradientCompression::None,
        )
        .unwrap();
        let sizes: Vec<usize> =
            buckets.buckets.iter().map(|b| b.iter().map(|&i| params[i].numel()).sum()).collect();
        eprintln!("resnet50's gradient buckets, in floats: {sizes:?}");
        // docs/scaling.md: K = 5 buckets, the last (the first convolutions
        // and every BN weight and bias: LAMB's no-decay group) 2.6 MB.
        assert_eq!(sizes.iter().sum::<usize>(), 25_557_032);
        assert_eq!(sizes.len(), 5, "{sizes:?}");
        assert!(sizes.iter().all(|&n| n <= BUCKET_FLOATS), "{sizes:?}");
        let last = sizes[4] * 4;
        assert!((2_500_000..2_700_000).contains(&last), "the last bucket holds {last} bytes");
    }

    #[test]
    fn overlapped_and_after_backward_reductions_give_identical_gradients() {
        // One bucket per parameter (100 floats), and everything in one.
        for (micro_batches, bucket_floats) in [(1, 100), (2, 100), (2, BUCKET_FLOATS)] {
            let none = GradientCompression::None;
            let after = gradients(false, micro_batches, bucket_floats, none);
            let overlapped = gradients(true, micro_batches, bucket_floats, none);
            // Every rank holds the same sum...
            assert_eq!(after[0], after[1]);
            assert_eq!(after[0], after[2]);
            // ...and the overlapped path the same bits.
            assert_eq!(after, overlapped, "micro-batches {micro_batches}, bucket {bucket_floats}");
            // The sum is not one rank's own gradient: the ranks' data differ.
            assert!(after[0].iter().flatten().any(|g| *g != 0.0));
        }
    }

    #[test]
    fn bf16_compression_applies_alike_on_both_paths_and_stays_near_the_exact_sum() {
        let bf16 = GradientCompression::Bf16;
        for (micro_batches, bucket_floats) in [(1, 100), (2, BUCKET_FLOATS)] {
            let exact = gradients(false, micro_batches, bucket_floats, GradientCompression::None);
            let after = gradients(false, micro_batches, bucket_floats, bf16);
            let overlapped = gradients(true, micro_batches, bucket_floats, bf16);
            assert_eq!(after, overlapped, "micro-batches {micro_batches}, bucket {bucket_floats}");
            assert_eq!(after[0], after[1]);
            assert_eq!(after[0], after[2]);
            let (mut error, mut largest) = (0f32, 0f32);
            for (c, e) in after[0].iter().flatten().zip(exact[0].iter().flatten()) {
                // A bf16 value: its low 16 bits are zero.
                assert_eq!(c.to_bits() & 0xffff, 0, "{c} is not a bf16 value");
                error = error.max((c - e).abs());
                largest = largest.max(e.abs());
            }
            // Three ranks' inputs and their sum rounded to bf16 (8
            // significant bits): a few bf16 ulps of the largest gradient,
            // and not exact.
            assert!(error > 0.0 && error <= 2f32.powi(-5) * largest, "{error} of {largest}");
        }
    }

    #[test]
    fn every_bucket_is_issued_during_the_pass_and_unpacked_after_one_join() {
        let a = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        for overlap in [false, true] {
            // One bucket per parameter.
            let params = vec![a.shallow_clone(), b.shallow_clone()];
            let buckets =
                GradientBuckets::new(params, 3, overlap, GradientCompression::None).unwrap();
            let mut stream = OnItsOwnStream::default();
            a.shallow_clone().zero_grad();
            b.shallow_clone().zero_grad();
            buckets
                .backward_and_reduce(&mut stream, CALLS, 0, Duration::from_secs(30), || {
                    ((&a * 3.0).sum(Kind::Float) + (&b * 5.0).sum(Kind::Float)).backward();
                    Ok(())
                })
                .unwrap();
            assert_eq!((stream.sums, stream.joins), (2, 1), "overlap {overlap}");
            // The world of two identical ranks: twice each gradient.
            assert_eq!(Vec::<f32>::try_from(a.grad()).unwrap(), [6.0; 3], "overlap {overlap}");
            assert_eq!(Vec::<f32>::try_from(b.grad()).unwrap(), [10.0; 2], "overlap {overlap}");
        }
    }

    #[test]
    fn a_parameter_the_backward_pass_did_not_reach_is_an_error_naming_it() {
        for overlap in [false, true] {
            let a = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let unused = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            // One bucket per parameter, the unused one's first.
            let params = vec![a.shallow_clone(), unused];
            let buckets = GradientBuckets::new(params, 3, overlap, GradientCompression::None)
                .unwrap()
                .with_names(vec!["fc.weight".into(), "head.bias".into()]);
            let mut stream = OnItsOwnStream::default();
            let err = buckets
                .backward_and_reduce(&mut stream, CALLS, 6, Duration::from_secs(30), || {
                    (&a * 3.0).sum(Kind::Float).backward();
                    Ok(())
                })
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "gradient reduction: all-reduce of the gradients of update 7, bucket 1 of 2: \
                 `head.bias` has no gradient: the backward pass did not reach it, and data \
                 parallelism sums every parameter's gradient on every rank",
                "overlap {overlap}"
            );
            assert_eq!(stream.sums, 0, "nothing summed, overlap {overlap}");
        }
    }

    #[test]
    fn a_failed_backward_pass_stops_the_reducer_at_once_with_its_own_error() {
        let a = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        // One bucket per parameter, `b`'s first; the calls made even at world size 1.
        let params = vec![a.shallow_clone(), b.shallow_clone()];
        let buckets = GradientBuckets::new(params, 3, true, GradientCompression::None).unwrap();
        let calls = Calls { device: Device::Cpu, at_world_size_one: true };
        let mut counting = Counting::default();
        let started = std::time::Instant::now();
        let err = buckets
            .backward_and_reduce(&mut counting, calls, 4, Duration::from_secs(30), || {
                // Only `a` gets its gradient, then the pass fails.
                (&a * 2.0).sum(Kind::Float).backward();
                Err(TrainError::GradientReduction("the backward pass failed".into()))
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "gradient reduction: the backward pass failed");
        assert!(started.elapsed() < Duration::from_secs(10), "waited {:?}", started.elapsed());
        // Nothing was reduced after the failure (peers would have reduced
        // other gradients): `a`'s bucket waits behind `b`'s, which never came.
        assert_eq!(counting.calls, 0);
        // Sanity of the setup: a pass that succeeds reduces both buckets.
        buckets
            .backward_and_reduce(&mut counting, calls, 5, Duration::from_secs(30), || {
                ((&a * 2.0).sum(Kind::Float) + (&b * 2.0).sum(Kind::Float)).backward();
                Ok(())
            })
            .unwrap();
        assert_eq!(counting.calls, 2);
    }
}
