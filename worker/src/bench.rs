//! `worker bench step`: the time of one training step (forward, BCE loss,
//! backward, LAMB update) on random data, the same work as
//! `bench/timm/step_bench.py` does with timm; `bench/compare_train_step.py`
//! runs both and prints the ratio. Prints one JSON line.

use crate::commands::parse_device;
use anyhow::Result;
use clap::Args;
use rsb_recipes::schema::LambOptimizer;
use rsb_torch_shim::op_count;
use rsb_train::lamb::{Lamb, UpdatePath};
use rsb_train::loss::Loss;
use rsb_vision::{ForwardMode, Model, ModelConfig};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Arguments of `worker bench step`.
#[derive(Debug, Args)]
pub struct StepArgs {
    /// Registered model name.
    #[arg(long, default_value = "resnet18")]
    pub model: String,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    pub batch: i64,
    /// Image side.
    #[arg(long, default_value_t = 32)]
    pub size: i64,
    /// Classes.
    #[arg(long, default_value_t = 10)]
    pub num_classes: i64,
    /// Timed steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// libtorch intra-op threads (0 = libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Channels-last memory layout.
    #[arg(long)]
    pub channels_last: bool,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// bf16 activations (GPU).
    #[arg(long)]
    pub bf16: bool,
    /// On a GPU, also time forward, backward and the optimizer apart, which
    /// synchronises the device between them (and so slows the step a little).
    /// A CPU step is synchronous: its phase times are always reported.
    #[arg(long)]
    pub phase_times: bool,
    /// After the timed steps, run one more step while counting the ATen
    /// operators it calls outside other operators (see
    /// `rsb_torch_shim::op_count`), reported as `aten_ops_per_step`.
    #[arg(long)]
    pub count_ops: bool,
    /// How LAMB walks the parameters: `auto` (packed on a GPU, per tensor on
    /// a CPU, as timm's `foreach` default), `packed` or `per-tensor`.
    #[arg(long, value_enum, default_value_t = UpdatePathArg::Auto)]
    pub update_path: UpdatePathArg,
}

/// `--update-path` of `worker bench step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpdatePathArg {
    /// The optimizer's default for the device.
    Auto,
    /// [`UpdatePath::Packed`].
    Packed,
    /// [`UpdatePath::PerTensor`].
    PerTensor,
}

/// Runs the benchmark.
pub fn step(args: StepArgs) -> Result<()> {
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let device = parse_device(&args.device)?;
    if device != Device::Cpu {
        // As timm's train.py on a GPU.
        tch::Cuda::cudnn_set_benchmark(true);
    }
    tch::manual_seed(0);
    let mut model = Model::new(
        &args.model,
        ModelConfig { num_classes: args.num_classes, ..Default::default() },
        device,
    )?;
    if args.channels_last {
        model.to_channels_last()?;
    }
    if args.bf16 {
        model.set_compute_kind(Kind::BFloat16);
    }
    let config = LambOptimizer {
        lr: 5e-3,
        weight_decay: 0.02,
        betas: [0.9, 0.999],
        eps: 1e-6,
        max_grad_norm: Some(1.0),
        trust_clip: false,
        always_adapt: false,
    };
    let mut optimizer = Lamb::new(&model, &config)?;
    match args.update_path {
        UpdatePathArg::Auto => {}
        UpdatePathArg::Packed => optimizer.set_update_path(UpdatePath::Packed),
        UpdatePathArg::PerTensor => optimizer.set_update_path(UpdatePath::PerTensor),
    }
    let loss_fn = Loss::Bce { target_threshold: Some(0.2) };
    let mut xs = Tensor::randn([args.batch, 3, args.size, args.size], (Kind::Float, device));
    if args.channels_last {
        xs = xs.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
    }
    let ys = Tensor::rand([args.batch, args.num_classes], (Kind::Float, device));
    let sync = |t: &Tensor| {
        if device != Device::Cpu {
            tch::Cuda::synchronize(device_index(device));
        } else {
            let _ = t.double_value(&[]);
        }
    };
    // Between phases: only when their times are asked for (GPU) or free (CPU).
    let phase_sync = |t: &Tensor| {
        if device == Device::Cpu || args.phase_times {
            sync(t);
        }
    };
    let mut times = Vec::with_capacity(args.steps);
    let mut optimizer_times = Vec::with_capacity(args.steps);
    let mut forward_times = Vec::with_capacity(args.steps);
    let mut backward_times = Vec::with_capacity(args.steps);
    let mut zero_grad_times = Vec::with_capacity(args.steps);
    for i in 0..args.warmup + args.steps {
        let start = Instant::now();
        optimizer.zero_grad()?;
        let before_forward = Instant::now();
        let logits = model.forward(&xs, ForwardMode::Train)?;
        let loss = loss_fn.compute(&logits, &ys)?;
        phase_sync(&loss);
        let before_backward = Instant::now();
        loss.f_backward()?;
        phase_sync(&loss);
        let before_step = Instant::now();
        // As the trainer does: the update is skipped on a non-finite gradient
        // norm, decided on the device.
        optimizer.step_unless_nonfinite(5e-3, None)?;
        sync(&loss);
        if i >= args.warmup {
            times.push(start.elapsed().as_secs_f64());
            optimizer_times.push(before_step.elapsed().as_secs_f64());
            zero_grad_times.push((before_forward - start).as_secs_f64());
            forward_times.push((before_backward - before_forward).as_secs_f64());
            backward_times.push((before_step - before_backward).as_secs_f64());
        }
    }
    // The same step once more, each phase's operators counted apart (no
    // synchronisation inside the step, so that only its own operators are
    // counted): the forward pass with the loss, the backward pass, and the
    // update with the gradients' reset.
    let aten_ops_per_step = if args.count_ops {
        let (reset, mut update) = op_count::count(|| optimizer.zero_grad())?;
        reset?;
        let (loss, forward) = op_count::count(|| -> Result<Tensor> {
            let logits = model.forward(&xs, ForwardMode::Train)?;
            Ok(loss_fn.compute(&logits, &ys)?)
        })?;
        let loss = loss?;
        let (backward_done, backward) = op_count::count(|| loss.f_backward())?;
        backward_done?;
        let (updated, step_ops) = op_count::count(|| optimizer.step_unless_nonfinite(5e-3, None))?;
        updated?;
        sync(&loss);
        for (name, calls) in step_ops {
            *update.entry(name).or_default() += calls;
        }
        Some(serde_json::json!({ "forward": forward, "backward": backward, "update": update }))
    } else {
        None
    };
    // Phase times are null when they were not measured (a GPU without --phase-times).
    let phases_measured = device == Device::Cpu || args.phase_times;
    let median_ms = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        let median = v.get(v.len() / 2).copied().unwrap_or(f64::NAN) * 1e3;
        phases_measured.then_some(median)
    };
    let total: f64 = times.iter().sum();
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    let report = serde_json::json!({
        "impl": "ours",
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "threads": tch::get_num_threads(),
        "channels_last": args.channels_last,
        // Spelled as torch spells it, so the comparison script can match sides.
        "device": match device {
            Device::Cuda(_) => "cuda",
            _ => "cpu",
        },
        "images_per_sec": (args.batch as f64 * args.steps as f64) / total,
        "step_ms_median": median * 1e3,
        "zero_grad_ms_median": median_ms(zero_grad_times),
        "forward_ms_median": median_ms(forward_times),
        "backward_ms_median": median_ms(backward_times),
        "optimizer_ms_median": median_ms(optimizer_times),
        "update_path": match optimizer.update_path() {
            UpdatePath::Packed => "packed",
            UpdatePath::PerTensor => "per-tensor",
        },
        // Parameter groups the last update took the packed path for.
        "packed_groups": optimizer.groups_packed_last_update(),
        // With --count-ops: calls of each ATen operator in one step, by phase.
        "aten_ops_per_step": aten_ops_per_step,
    });
    rsb_logging::output!("{report}");
    Ok(())
}

fn device_index(device: Device) -> i64 {
    match device {
        Device::Cuda(i) => i as i64,
        _ => 0,
    }
}
