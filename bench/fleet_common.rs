//! What the fleet benchmarks share: device ids shaped like the seeds' UUIDs, and memory.

/// A UUID-shaped id for device `n`, the same in every run.
pub fn uuid(n: u64) -> String {
    format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", n * 2_654_435_761 % (1 << 32), n % 65_536, n % 4096, n % 4096, n)
}

/// This process's resident set size, in KiB.
pub fn rss_kib() -> u64 {
    fwgate::loadgen::run::rss_kib(std::process::id()).unwrap_or(0)
}
