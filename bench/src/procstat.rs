//! CPU time and resident memory of a process, from `/proc`.

use std::fs;

/// CPU time (user + system) used so far by every thread of `pid`, in microseconds. Read
/// from each thread's `schedstat` (nanoseconds), which is far finer than the clock ticks
/// of `/proc/<pid>/stat`; threads that ended are not counted, which for Envoy (a fixed set
/// of threads) changes nothing.
pub fn cpu_micros(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut nanos = 0u64;
    for task in tasks.filter_map(Result::ok) {
        let path = task.path().join("schedstat");
        if let Ok(text) = fs::read_to_string(path) {
            nanos += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    nanos / 1_000
}

/// Resident memory of `pid` in KiB (`VmRSS`), 0 if it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        let before = cpu_micros(pid);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_micros(pid) > before);
        assert!(rss_kib(pid) > 0);
    }
}
