//! Build-script helper for every crate whose binaries or tests link libtorch.
//!
//! `tch`'s own build script adds the libtorch search path but neither an rpath
//! nor a hard dependency on `libtorch_cuda.so`: with the default `--as-needed`
//! linker flag the CUDA half of libtorch is dropped (nothing references it by
//! symbol) and `tch::Cuda::is_available()` then reports `false` even on a GPU
//! host. [`emit`] fixes both for the calling package, and refuses to build
//! against a libtorch whose version differs from the pin in `python/torch.txt`.

use std::path::{Path, PathBuf};

/// The `torch==X.Y.Z` pin shared with `scripts/setup`.
const TORCH_PIN: &str = include_str!("../../../python/torch.txt");

/// The pinned torch version, e.g. `2.11.0`.
pub fn pinned_torch_version() -> &'static str {
    TORCH_PIN
        .lines()
        .map(str::trim)
        .find_map(|line| line.strip_prefix("torch=="))
        .expect("python/torch.txt must contain a line `torch==X.Y.Z`")
}

/// Reads `__version__` from the `version.py` of a PyPI torch install (the
/// folder that holds `lib/`), e.g. `2.11.0+cu130`.
pub fn installed_torch_version(libtorch: &Path) -> Option<String> {
    let text = std::fs::read_to_string(libtorch.join("version.py")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("__version__")?;
        let value = rest.split('=').nth(1)?.trim();
        Some(value.trim_matches(|c| c == '\'' || c == '"').to_string())
    })
}

/// Emits the linker arguments for the calling package's binaries and tests:
/// an rpath to libtorch's `lib/` (the loader's `LD_LIBRARY_PATH` still wins,
/// which is how a binary built here runs against a GPU host's own torch) and,
/// when this libtorch has CUDA, a `--no-as-needed` link of `libtorch_cuda.so`.
pub fn emit() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!(
            "cargo:warning=LIBTORCH is not set; run scripts/setup (it creates .venv/libtorch)"
        );
        return;
    };
    let pinned = pinned_torch_version();
    match installed_torch_version(&libtorch) {
        Some(found) if found.split('+').next() == Some(pinned) => {}
        Some(found) => panic!(
            "libtorch at {} is torch {found}, but python/torch.txt pins torch=={pinned}; \
             run scripts/setup to reinstall it",
            libtorch.display()
        ),
        None => println!(
            "cargo:warning=cannot read the torch version from {}/version.py; not checked",
            libtorch.display()
        ),
    }
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
