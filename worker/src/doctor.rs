//! `worker doctor`: what this process can see — the libtorch it loaded (path
//! and version), CUDA and cuDNN availability, GPU count, and whether an NCCL
//! library can be loaded (and which one), and the CPU's model, vector
//! extensions and the precision `auto` picks on it.

use rsb_recipes::Precision;
use rsb_train::precision::{compute_kind_with, CpuFeatures};
use std::path::{Path, PathBuf};

/// The loaded `libtorch_cpu.so`, from this process's memory map.
fn loaded_libtorch() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .map(PathBuf::from)
}

/// Version of the torch install holding `lib/libtorch_cpu.so`: `version.py`
/// of a PyPI wheel, or `build-version` of a libtorch archive.
fn torch_version(lib_file: &Path) -> Option<String> {
    let root = lib_file.parent()?.parent()?;
    rsb_torch_link::installed_torch_version(root).or_else(|| {
        std::fs::read_to_string(root.join("build-version")).ok().map(|s| s.trim().to_string())
    })
}

/// NCCL as a GPU rank loads it (the same loader, so that what this reports
/// is what a rank finds): its file and version, and whether it makes a
/// unique id (which needs no GPU); or why it cannot be loaded.
pub fn nccl_report() -> Result<(String, String, Result<(), String>), String> {
    let nccl = rsb_collective::nccl::library::Nccl::get().map_err(|e| e.to_string())?;
    let unique_id = rsb_collective::nccl::unique_id().map(|_| ()).map_err(|e| e.to_string());
    Ok((nccl.path().to_string(), nccl.version(), unique_id))
}

/// Prints the report; returns it as JSON as well.
pub fn run() -> anyhow::Result<serde_json::Value> {
    // Touch libtorch so that it is loaded before reading the memory map.
    let cuda = tch::Cuda::is_available();
    let devices = tch::Cuda::device_count();
    let cudnn = tch::Cuda::cudnn_is_available();
    let lib = loaded_libtorch();
    let version = lib.as_deref().and_then(torch_version);
    let nccl = nccl_report();
    let cpu = CpuFeatures::detect();
    let auto_on_cpu = match compute_kind_with(Precision::Auto, tch::Device::Cpu, &cpu) {
        tch::Kind::BFloat16 => "bf16",
        _ => "fp32",
    };
    let report = serde_json::json!({
        "cpu_model": cpu.model,
        "cpu_extensions": cpu.extensions,
        "cpu_native_bf16": cpu.native_bf16,
        "cpu_isa_cap": cpu.capped_by,
        "cpu_auto_precision": auto_on_cpu,
        "libtorch": lib.as_ref().map(|p| p.display().to_string()),
        "torch_version": version,
        "built_for_torch": rsb_torch_link::pinned_torch_version(),
        "cuda_available": cuda,
        "cuda_device_count": devices,
        "cudnn_available": cudnn,
        "torch_threads": tch::get_num_threads(),
        "nccl": match &nccl {
            Ok((path, v, id)) => serde_json::json!({
                "found": true, "path": path, "version": v,
                "unique_id": id.as_ref().map(|()| "made").unwrap_or_else(|e| e.as_str()),
            }),
            Err(e) => serde_json::json!({"found": false, "error": e}),
        },
    });
    rsb_logging::output!(
        "libtorch        {}",
        lib.map(|p| p.display().to_string()).unwrap_or_else(|| "not found in memory map".into())
    );
    rsb_logging::output!(
        "torch version   {} (built for {})",
        version.unwrap_or_else(|| "unknown".into()),
        rsb_torch_link::pinned_torch_version()
    );
    rsb_logging::output!("CPU             {}", cpu.model);
    rsb_logging::output!("CPU extensions  {}", cpu.extensions.join(" "));
    rsb_logging::output!(
        "CPU precision   `auto` picks {auto_on_cpu} on the CPU: {}",
        cpu.auto_reason()
    );
    rsb_logging::output!("CUDA available  {cuda}");
    rsb_logging::output!("CUDA devices    {devices}");
    rsb_logging::output!("cuDNN available {cudnn}");
    rsb_logging::output!("torch threads   {}", tch::get_num_threads());
    match nccl {
        Ok((path, v, id)) => {
            let id = id.map(|()| "a unique id made".to_string()).unwrap_or_else(|e| e);
            rsb_logging::output!("NCCL            found: {path} (version {v}; {id})")
        }
        Err(e) => rsb_logging::output!("NCCL            unusable: {e}"),
    }
    Ok(report)
}
