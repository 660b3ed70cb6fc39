//! How much memory a CPU evaluation may take on this host: what the kernel
//! says is available (`MemAvailable`, within this process's cgroup limit
//! when it has one), and the peak memory a piece of work took, measured as
//! the growth of the process's peak resident set (`VmHWM`, reset first
//! through `/proc/self/clear_refs`). Linux only; `None` where a figure
//! cannot be read, and the caller then goes on without the check.

use std::path::PathBuf;

/// Bytes this process may still take: `MemAvailable` of `/proc/meminfo`,
/// or less where its cgroup (v2) limit leaves less.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let host = kib_field(&meminfo, "MemAvailable:")?;
    Some(match cgroup_headroom() {
        Some(cgroup) => host.min(cgroup),
        None => host,
    })
}

/// What this process's memory cgroup still allows: its limit less what it
/// holds, page cache that can be dropped (`inactive_file`) not counted.
/// cgroup v2 (`memory.max`, `memory.current`) or v1 (`memory.limit_in_bytes`,
/// `memory.usage_in_bytes`); `None` without a limit or a memory cgroup.
fn cgroup_headroom() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let in_hierarchy =
        |root: &str, path: &str| PathBuf::from(root).join(path.trim_start_matches('/'));
    // v1: `4:memory:/path`; v2: `0::/path`.
    let (dir, limit, usage, inactive) = if let Some(path) =
        membership.lines().find_map(|line| line.split_once(":memory:").map(|(_, path)| path))
    {
        let dir = in_hierarchy("/sys/fs/cgroup/memory", path);
        (dir, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    } else {
        let path = membership.lines().find_map(|line| line.strip_prefix("0::"))?;
        (in_hierarchy("/sys/fs/cgroup", path), "memory.max", "memory.current", "inactive_file")
    };
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    // `max` (v2) does not parse: no limit. v1 says none with a huge number.
    let limit: u64 = read(limit)?.trim().parse().ok()?;
    if limit >= 1 << 60 {
        return None;
    }
    let usage: u64 = read(usage)?.trim().parse().ok()?;
    let droppable = read("memory.stat")
        .and_then(|stat| {
            stat.lines().find_map(|line| line.strip_prefix(inactive)?.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    Some(limit.saturating_sub(usage.saturating_sub(droppable)))
}

/// Runs `work` and returns its result with how far it raised the process's
/// peak resident set above what was resident before it: the memory it took
/// at its peak (memory freed earlier and reused by it is not counted, so
/// this is a floor). `None` for the growth where the peak cannot be reset
/// or read.
pub fn peak_growth<R>(work: impl FnOnce() -> R) -> (R, Option<u64>) {
    release_free_heap();
    let before = reset_peak().then(|| status_kib("VmRSS:")).flatten();
    let result = work();
    let growth = before.and_then(|before| {
        let peak = status_kib("VmHWM:")?;
        Some(peak.saturating_sub(before))
    });
    (result, growth)
}

/// Hands the heap's free memory back to the kernel (glibc's
/// `malloc_trim`), so that work measured after it finds none resident to
/// reuse: what it takes then shows in the resident set.
fn release_free_heap() {
    extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: glibc's malloc_trim takes no pointer and may be called at
    // any time from any thread; it only returns free pages to the kernel.
    unsafe {
        malloc_trim(0);
    }
}

/// Resets the peak resident set (`VmHWM`) to the current one.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn status_kib(field: &str) -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/self/status").ok()?, field)
}

/// The value of a `NAME:   123 kB` line, in bytes.
fn kib_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(field))?;
    let kib: u64 = line[field.len()..].trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// `bytes` in GiB, or MiB below one GiB, for messages.
pub fn human(bytes: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    if bytes < 1 << 30 {
        format!("{:.0} MiB", bytes as f64 / MIB)
    } else {
        format!("{:.1} GiB", bytes as f64 / (1024.0 * MIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_shown_in_mib_or_gib() {
        assert_eq!(human(100 << 20), "100 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    #[test]
    fn fields_are_read_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(kib_field(text, "MemAvailable:"), Some(1_024_000));
        assert_eq!(kib_field(text, "MemFree:"), None);
        assert_eq!(kib_field("MemAvailable: lots", "MemAvailable:"), None);
    }

    #[test]
    fn the_growth_of_work_that_touches_memory_is_measured() {
        let available = available_bytes().expect("MemAvailable on Linux");
        assert!(available > 0);
        const SIZE: usize = 256 << 20;
        let (sum, growth) = peak_growth(|| {
            // Touched, so resident; freed before the peak is read.
            let block = vec![1u8; SIZE];
            block.iter().step_by(4096).map(|&b| u64::from(b)).sum::<u64>()
        });
        assert_eq!(sum, (SIZE / 4096) as u64);
        let growth = growth.expect("VmHWM resets through clear_refs");
        assert!(growth >= SIZE as u64 * 9 / 10, "{growth}");
        // Nothing touched: far less.
        let ((), idle) = peak_growth(|| ());
        assert!(idle.unwrap() < SIZE as u64 / 4, "{idle:?}");
    }
}
