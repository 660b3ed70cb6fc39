//! The compute precision a run uses, and the CPU facts that decide it.
//!
//! `precision: auto` means bf16 activations on a GPU, and on a CPU only where
//! the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16, read from CPUID,
//! with the operating system's support for the AVX-512 or AMX register
//! state): elsewhere libtorch's bf16 convolutions fall back to slow kernels
//! (about 10x slower than f32 on an AVX2-only CPU), so `auto` picks f32.
//!
//! oneDNN and ATen can be capped below what the CPU has
//! (`ONEDNN_MAX_CPU_ISA=AVX2`, `ATEN_CPU_CAPABILITY=avx2`, which is also how
//! an AVX2-only CPU is emulated on a newer one); `auto` honours such a cap,
//! since the capped libraries run bf16 as slowly as an older CPU would.

use rsb_recipes::Precision;
use tch::{Device, Kind};

/// What this CPU offers for the choice of precision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuFeatures {
    /// The CPU's brand string (CPUID leaves 0x80000002..4), or "unknown".
    pub model: String,
    /// Vector extensions present and enabled by the OS, in a fixed order
    /// (`avx2`, `avx512f`, `avx512_bf16`, `amx_bf16`, ...).
    pub extensions: Vec<&'static str>,
    /// bf16 arithmetic in hardware (AVX512-BF16 or AMX-BF16).
    pub native_bf16: bool,
    /// A cap set through the environment that keeps libtorch from using it
    /// (`ONEDNN_MAX_CPU_ISA=...` or `ATEN_CPU_CAPABILITY=...`), if any.
    pub capped_by: Option<String>,
}

impl CpuFeatures {
    /// Reads this CPU and the process environment.
    pub fn detect() -> CpuFeatures {
        let (model, extensions, native_bf16) = cpuid::read();
        let capped_by = isa_cap(
            std::env::var("ONEDNN_MAX_CPU_ISA")
                .ok()
                .or_else(|| std::env::var("DNNL_MAX_CPU_ISA").ok()),
            std::env::var("ATEN_CPU_CAPABILITY").ok(),
        );
        CpuFeatures { model, extensions, native_bf16, capped_by }
    }

    /// Whether libtorch runs bf16 natively here: the CPU has it and no cap
    /// keeps libtorch from using it.
    pub fn fast_bf16(&self) -> bool {
        self.native_bf16 && self.capped_by.is_none()
    }

    /// One line for logs and `worker doctor`: why `auto` picks what it picks.
    pub fn auto_reason(&self) -> String {
        match (self.native_bf16, &self.capped_by) {
            (true, None) => "the CPU has native bf16 (AVX512-BF16 or AMX)".to_string(),
            (true, Some(cap)) => format!("native bf16 is capped off by {cap}"),
            (false, _) => "the CPU has no native bf16 (no AVX512-BF16 or AMX)".to_string(),
        }
    }
}

/// The environment's cap on libtorch's instruction sets, when it rules out
/// native bf16: oneDNN's `*_MAX_CPU_ISA` below `AVX512_CORE_BF16`, or ATen's
/// `ATEN_CPU_CAPABILITY` below `avx512`.
fn isa_cap(onednn: Option<String>, aten: Option<String>) -> Option<String> {
    // oneDNN's ISA names that include bf16 instructions (every newer one does).
    const ONEDNN_BF16: [&str; 9] = [
        "AVX512_CORE_BF16",
        "AVX512_CORE_FP16",
        "AVX512_CORE_AMX",
        "AVX512_CORE_AMX_FP16",
        "AVX10_1_512",
        "AVX10_1_512_AMX",
        "AVX10_1_512_AMX_FP16",
        "AVX10_2_512",
        "AVX10_2_512_AMX_2",
    ];
    if let Some(isa) = onednn.map(|v| v.trim().to_ascii_uppercase()).filter(|v| !v.is_empty()) {
        if !(isa == "ALL" || isa == "DEFAULT" || ONEDNN_BF16.contains(&isa.as_str())) {
            return Some(format!("ONEDNN_MAX_CPU_ISA={isa}"));
        }
    }
    if let Some(cap) = aten.map(|v| v.trim().to_ascii_lowercase()).filter(|v| !v.is_empty()) {
        if cap == "default" || cap == "avx2" || cap == "zvector" || cap == "vsx" {
            return Some(format!("ATEN_CPU_CAPABILITY={cap}"));
        }
    }
    None
}

/// The activation kind of a run: bf16, fp16 or f32 (weights, BN statistics, the
/// loss and LAMB stay f32 whatever this says). `auto` on a CPU logs its
/// choice and the reason.
pub fn compute_kind(precision: Precision, device: Device) -> Kind {
    let cpu = CpuFeatures::detect();
    let kind = compute_kind_with(precision, device, &cpu);
    if precision == Precision::Auto && device == Device::Cpu {
        tracing::info!(cpu = %cpu.model, "precision auto: {kind:?}, since {}", cpu.auto_reason());
    }
    kind
}

/// [`compute_kind`] with the CPU facts given (tests).
pub fn compute_kind_with(precision: Precision, device: Device, cpu: &CpuFeatures) -> Kind {
    match precision {
        Precision::Bf16 => Kind::BFloat16,
        Precision::Fp16 => Kind::Half,
        Precision::Fp32 => Kind::Float,
        Precision::Auto if device != Device::Cpu => Kind::BFloat16,
        Precision::Auto if cpu.fast_bf16() => Kind::BFloat16,
        Precision::Auto => Kind::Float,
    }
}

#[cfg(target_arch = "x86_64")]
mod cpuid {
    //! CPUID on x86-64.
    use std::arch::x86_64::{__cpuid, __cpuid_count, CpuidResult};

    fn leaf(eax: u32, ecx: u32) -> CpuidResult {
        // CPUID is available on every x86-64 CPU; leaves above the maximum
        // are not queried (see `read`).
        __cpuid_count(eax, ecx)
    }

    fn brand() -> String {
        let max_extended = __cpuid(0x8000_0000).eax;
        if max_extended < 0x8000_0004 {
            return "unknown".to_string();
        }
        let mut bytes = Vec::with_capacity(48);
        for l in 0x8000_0002u32..=0x8000_0004 {
            let r = leaf(l, 0);
            for word in [r.eax, r.ebx, r.ecx, r.edx] {
                bytes.extend_from_slice(&word.to_le_bytes());
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim_matches(char::from(0)).trim();
        if text.is_empty() {
            "unknown".to_string()
        } else {
            text.to_string()
        }
    }

    /// (brand, extensions, native bf16).
    pub(super) fn read() -> (String, Vec<&'static str>, bool) {
        let max_leaf = __cpuid(0).eax;
        let mut extensions = Vec::new();
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        let fma = std::arch::is_x86_feature_detected!("fma");
        // The OS-enabled check for the AVX-512 register state comes with this one.
        let avx512f = std::arch::is_x86_feature_detected!("avx512f");
        let (mut avx512_bf16, mut amx_bf16, mut avx512_vnni) = (false, false, false);
        if max_leaf >= 7 {
            let l7 = leaf(7, 0);
            avx512_vnni = avx512f && (l7.ecx >> 11) & 1 == 1;
            // AMX-BF16 (EDX bit 22) needs the OS to enable the tile state
            // (XCR0 bits 17 and 18), which the standard library reports for
            // AMX through no stable check; the AVX-512 state check is the
            // closest stable proxy (every AMX CPU has AVX-512).
            amx_bf16 = avx512f && (l7.edx >> 22) & 1 == 1;
            if l7.eax >= 1 {
                let l71 = leaf(7, 1);
                avx512_bf16 = avx512f && (l71.eax >> 5) & 1 == 1;
            }
        }
        for (present, name) in [
            (avx2, "avx2"),
            (fma, "fma"),
            (avx512f, "avx512f"),
            (avx512_vnni, "avx512_vnni"),
            (avx512_bf16, "avx512_bf16"),
            (amx_bf16, "amx_bf16"),
        ] {
            if present {
                extensions.push(name);
            }
        }
        (brand(), extensions, avx512_bf16 || amx_bf16)
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod cpuid {
    //! Other architectures: no x86 extensions, no native bf16 assumed.
    pub(super) fn read() -> (String, Vec<&'static str>, bool) {
        ("unknown".to_string(), Vec::new(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(native_bf16: bool, capped_by: Option<&str>) -> CpuFeatures {
        CpuFeatures {
            model: "test".into(),
            extensions: vec![],
            native_bf16,
            capped_by: capped_by.map(str::to_string),
        }
    }

    #[test]
    fn auto_is_bf16_on_gpus_and_on_cpus_with_native_bf16_only() {
        let fast = cpu(true, None);
        let slow = cpu(false, None);
        let capped = cpu(true, Some("ONEDNN_MAX_CPU_ISA=AVX2"));
        assert_eq!(compute_kind_with(Precision::Auto, Device::Cpu, &fast), Kind::BFloat16);
        assert_eq!(compute_kind_with(Precision::Auto, Device::Cpu, &slow), Kind::Float);
        assert_eq!(compute_kind_with(Precision::Auto, Device::Cpu, &capped), Kind::Float);
        assert_eq!(compute_kind_with(Precision::Auto, Device::Cuda(0), &slow), Kind::BFloat16);
        // Explicit choices are obeyed everywhere.
        assert_eq!(compute_kind_with(Precision::Bf16, Device::Cpu, &slow), Kind::BFloat16);
        assert_eq!(compute_kind_with(Precision::Fp32, Device::Cpu, &fast), Kind::Float);
        assert_eq!(compute_kind_with(Precision::Fp32, Device::Cuda(0), &fast), Kind::Float);
        assert_eq!(compute_kind_with(Precision::Fp16, Device::Cpu, &fast), Kind::Half);
        assert_eq!(compute_kind_with(Precision::Fp16, Device::Cuda(0), &slow), Kind::Half);
    }

    #[test]
    fn isa_caps_below_bf16_are_caps() {
        assert_eq!(isa_cap(Some("AVX2".into()), None).as_deref(), Some("ONEDNN_MAX_CPU_ISA=AVX2"));
        assert!(isa_cap(Some("avx512_core".into()), None).is_some());
        assert!(isa_cap(Some("AVX512_CORE_VNNI".into()), None).is_some());
        assert_eq!(isa_cap(Some("AVX512_CORE_BF16".into()), None), None);
        assert_eq!(isa_cap(Some("avx512_core_amx".into()), None), None);
        assert_eq!(isa_cap(Some("ALL".into()), None), None);
        assert_eq!(isa_cap(Some(String::new()), None), None);
        assert_eq!(isa_cap(None, Some("avx2".into())).as_deref(), Some("ATEN_CPU_CAPABILITY=avx2"));
        assert_eq!(isa_cap(None, Some("avx512".into())), None);
        assert_eq!(isa_cap(None, None), None);
    }

    #[test]
    fn detection_agrees_with_the_kernel() {
        // /proc/cpuinfo lists the flags the kernel saw; our CPUID reading
        // must agree with it on the two that decide `auto`.
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return };
        let Some(flags) = info.lines().find(|l| l.starts_with("flags")) else { return };
        let flags: Vec<&str> = flags.split_whitespace().collect();
        let features = CpuFeatures::detect();
        assert_eq!(
            features.extensions.contains(&"avx512_bf16"),
            flags.contains(&"avx512_bf16"),
            "{features:?}"
        );
        assert_eq!(features.extensions.contains(&"avx2"), flags.contains(&"avx2"));
        assert_eq!(
            features.native_bf16,
            flags.contains(&"avx512_bf16") || flags.contains(&"amx_bf16")
        );
        assert_ne!(features.model, "");
    }
}
