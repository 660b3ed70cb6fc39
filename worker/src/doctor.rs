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

/// No candidate NCCL library could be loaded.
#[derive(Debug)]
pub struct NcclNotFound {
    /// Each library tried, with the dynamic loader's message.
    pub attempts: Vec<(PathBuf, String)>,
}

impl std::fmt::Display for NcclNotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (path, reason)) in self.attempts.iter().enumerate() {
            let separator = if i == 0 { "" } else { "; " };
            write!(f, "{separator}{}: {reason}", path.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for NcclNotFound {}

/// Where NCCL was found and its version, or every place tried and why it failed.
pub fn find_nccl(torch_lib: Option<&Path>) -> Result<(String, String), NcclNotFound> {
    let mut candidates = vec![PathBuf::from("libnccl.so.2")];
    if let Some(site) =
        torch_lib.and_then(|l| l.parent()).and_then(|t| t.parent()).and_then(|t| t.parent())
    {
        candidates.push(site.join("nvidia/nccl/lib/libnccl.so.2"));
    }
    let mut attempts = Vec::new();
    for candidate in candidates {
        // SAFETY: loading NCCL runs its (side-effect free) initialisers only.
        match unsafe { libloading::Library::new(&candidate) } {
            Ok(lib) => {
                // SAFETY: ncclGetVersion(int*) is NCCL's stable C API.
                let version = unsafe {
                    lib.get::<unsafe extern "C" fn(*mut i32) -> i32>(b"ncclGetVersion\0")
                        .ok()
                        .and_then(|f| {
                            let mut v = 0i32;
                            (f(&mut v) == 0).then_some(v)
                        })
                };
                let version = version
                    .map(|v| format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
                    .unwrap_or_else(|| "unknown".into());
                return Ok((candidate.display().to_string(), version));
            }
            Err(e) => attempts.push((candidate, e.to_string())),
        }
    }
    Err(NcclNotFound { attempts })
}

/// Prints the report; returns it as JSON as well.
pub fn run() -> serde_json::Value {
    // Touch libtorch so that it is loaded before reading the memory map.
    let cuda = tch::Cuda::is_available();
    let devices = tch::Cuda::device_count();
    let cudnn = tch::Cuda::cudnn_is_available();
    let lib = loaded_libtorch();
    let version = lib.as_deref().and_then(torch_version);
    let nccl = find_nccl(lib.as_deref());
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
        "nccl": match &nccl { Ok((path, v)) => serde_json::json!({"found": true, "path": path, "version": v}), Err(e) => serde_json::json!({"found": false, "error": e.to_string()}) },
    });
    println!(
        "libtorch        {}",
        lib.map(|p| p.display().to_string()).unwrap_or_else(|| "not found in memory map".into())
    );
    println!(
        "torch version   {} (built for {})",
        version.unwrap_or_else(|| "unknown".into()),
        rsb_torch_link::pinned_torch_version()
    );
    println!("CPU             {}", cpu.model);
    println!("CPU extensions  {}", cpu.extensions.join(" "));
    println!("CPU precision   `auto` picks {auto_on_cpu} on the CPU: {}", cpu.auto_reason());
    println!("CUDA available  {cuda}");
    println!("CUDA devices    {devices}");
    println!("cuDNN available {cudnn}");
    println!("torch threads   {}", tch::get_num_threads());
    match nccl {
        Ok((path, v)) => println!("NCCL            found: {path} (version {v})"),
        Err(e) => println!("NCCL            not found ({e})"),
    }
    report
}
