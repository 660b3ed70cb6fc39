//! How much memory a CPU evaluation may take on this host: what the kernel
//! says is available (`MemAvailable`, within this process's cgroup limit
//! when it has one), and the peak memory a piece of work took, measured as
//! the growth of the process's peak resident set (`VmHWM`, reset first
//! through `/proc/self/clear_refs`). Linux only; `None` where a figure
//! cannot be read, and the caller then goes on without the check.

use std::path::PathBuf;

/// Bytes this process may still take: `MemAvailable` of `/proc/meminfo`,
/// or less where a memory cgroup it is in leaves less.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let host = kib_field(&meminfo, "MemAvailable:")?;
    Some(cgroup_headroom().map_or(host, |cgroup| host.min(cgroup)))
}

/// The files of one cgroup version's memory controller.
struct CgroupFiles {
    /// Where the hierarchy is mounted.
    mount: &'static str,
    limit: &'static str,
    usage: &'static str,
    /// The `memory.stat` fields of the file pages on the kernel's lists
    /// (which it reclaims before it kills; shared memory, on the anonymous
    /// lists, is not among them) and of those mapped by a process (in use:
    /// libtorch's own code), which are not counted as reclaimable (the
    /// `total_` fields of v1 count the descendants too).
    active_file: &'static str,
    inactive_file: &'static str,
    mapped_file: &'static str,
}

const CGROUP_V1: CgroupFiles = CgroupFiles {
    mount: "/sys/fs/cgroup/memory",
    limit: "memory.limit_in_bytes",
    usage: "memory.usage_in_bytes",
    active_file: "total_active_file",
    inactive_file: "total_inactive_file",
    mapped_file: "total_mapped_file",
};

const CGROUP_V2: CgroupFiles = CgroupFiles {
    mount: "/sys/fs/cgroup",
    limit: "memory.max",
    usage: "memory.current",
    active_file: "active_file",
    inactive_file: "inactive_file",
    mapped_file: "file_mapped",
};

/// What the memory cgroups this process is in still allow: for its own
/// cgroup and each one above it (a limit set on a parent, as a systemd
/// slice or a batch system's job sets it, binds too), the limit less what
/// the cgroup holds, reclaimable page cache not counted; the least of them.
/// cgroup v1 (`memory.limit_in_bytes`) or v2 (`memory.max`). Inside a
/// container whose own cgroup is mounted as the hierarchy's root, the path
/// `/proc/self/cgroup` names is not all there: its longest tail that is
/// (or the root) is read. `None` without a limit or a memory cgroup.
fn cgroup_headroom() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // v1: `4:memory:/path`; v2: `0::/path`.
    let (files, path) =
        match membership.lines().find_map(|line| line.split_once(":memory:").map(|(_, path)| path))
        {
            Some(path) => (CGROUP_V1, path),
            None => (CGROUP_V2, membership.lines().find_map(|line| line.strip_prefix("0::"))?),
        };
    let mount = PathBuf::from(files.mount);
    let parts: Vec<&str> = path.trim().split('/').filter(|part| !part.is_empty()).collect();
    let start = (0..=parts.len())
        .map(|skip| parts[skip..].iter().fold(mount.clone(), |dir, part| dir.join(part)))
        .find(|dir| dir.is_dir())?;
    start
        .ancestors()
        .take_while(|dir| dir.starts_with(&mount))
        .filter_map(|dir| headroom_of(dir, &files))
        .min()
}

/// One cgroup's limit less what it holds but its reclaimable page cache;
/// `None` without a limit (`max` on v2, a huge number on v1) or its files.
fn headroom_of(dir: &std::path::Path, files: &CgroupFiles) -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let limit: u64 = read(files.limit)?.trim().parse().ok()?;
    if limit >= 1 << 60 {
        return None;
    }
    let usage: u64 = read(files.usage)?.trim().parse().ok()?;
    let stat = read("memory.stat").unwrap_or_default();
    let field = |wanted: &str| {
        stat.lines()
            .find_map(|line| {
                let (name, value) = line.split_once(' ')?;
                (name == wanted).then(|| value.trim().parse::<u64>().ok()).flatten()
            })
            .unwrap_or(0)
    };
    let reclaimable = (field(files.active_file) + field(files.inactive_file))
        .saturating_sub(field(files.mapped_file));
    Some(limit.saturating_sub(usage.saturating_sub(reclaimable)))
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
    fn a_cgroup_leaves_its_limit_less_what_it_holds_but_its_reclaimable_page_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(tmp.path().join(name), text).unwrap();
        write("memory.max", "1000\n");
        write("memory.current", "600\n");
        // 100 of file pages, 30 of them mapped (in use); shared memory is
        // not on the file lists.
        write(
            "memory.stat",
            "anon 400\nfile 150\nfile_mapped 30\nshmem 50\nactive_file 60\ninactive_file 40\n",
        );
        assert_eq!(headroom_of(tmp.path(), &CGROUP_V2), Some(470));
        // No such fields: nothing counted as reclaimable.
        write("memory.stat", "anon 600\n");
        assert_eq!(headroom_of(tmp.path(), &CGROUP_V2), Some(400));
        write("memory.max", "max\n");
        assert_eq!(headroom_of(tmp.path(), &CGROUP_V2), None);
        write("memory.limit_in_bytes", "9223372036854771712\n");
        write("memory.usage_in_bytes", "600\n");
        assert_eq!(headroom_of(tmp.path(), &CGROUP_V1), None);
        write("memory.limit_in_bytes", "2000\n");
        write(
            "memory.stat",
            "active_file 5\ntotal_active_file 200\ntotal_inactive_file 100\ntotal_mapped_file 50\n",
        );
        assert_eq!(headroom_of(tmp.path(), &CGROUP_V1), Some(1650));
    }

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
