//! Compiles the C++ shim against the project's libtorch headers (the PyPI
//! wheel's, as tch itself), with the wheel's C++ ABI.
use std::path::PathBuf;

fn main() {
    rsb_torch_link::emit();
    println!("cargo:rerun-if-changed=src/shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        panic!("LIBTORCH is not set; run scripts/setup (it creates .venv/libtorch)");
    };
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .file("src/shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("rsb_torch_shim");
}
