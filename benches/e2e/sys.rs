//! What the benchmark asks of the operating system: CPU pinning, the fd limit,
//! and per-process and per-thread CPU time, child processes and memory from
//! `/proc`.

use std::io;
use std::time::Duration;

/// The CPUs this process may run on, lowest first.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: we pass the size of the set we own; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: `set` was filled by the kernel; CPU_ISSET only reads it.
    (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect()
}

/// Pins the calling thread (and every thread it starts later) to `cpu`.
///
/// Only makes the `sched_setaffinity` syscall, so it is also safe to call in a
/// child between `fork` and `exec`.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    pin_to_cpus(&[cpu])
}

/// Lets the calling thread (and every thread it starts later) run on `cpus` only.
///
/// Like `pin_to`, it only reads the slice and makes one syscall, so it is safe
/// between `fork` and `exec` (the slice is allocated before the fork).
pub fn pin_to_cpus(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: `cpu_set_t` is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPU_SET writes one bit of the set we own; `cpu` < CPU_SETSIZE (checked by the caller's list).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: we pass the size of the set we own; pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises `RLIMIT_NOFILE` to at least `want` if allowed (root may raise the hard
/// limit), else to the hard limit; returns the soft limit in force.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    let wanted = libc::rlimit { rlim_cur: want.max(limit.rlim_cur), rlim_max: want.max(limit.rlim_max) };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
        return wanted.rlim_cur;
    }
    let hard = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &hard) } == 0 {
        return hard.rlim_cur;
    }
    limit.rlim_cur
}

/// The command name and the fields after it of a `/proc/.../stat` file.
fn stat(path: &str) -> io::Result<(String, Vec<String>)> {
    let stat = std::fs::read_to_string(path)?;
    // The command name may hold spaces and parentheses; the fields after its last `)` are fixed.
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("unexpected {path}: {stat}"));
    let (head, rest) = stat.rsplit_once(')').ok_or_else(bad)?;
    let (_, comm) = head.split_once('(').ok_or_else(bad)?;
    Ok((comm.to_string(), rest.split_whitespace().map(str::to_string).collect()))
}

/// CPU time (user + system) in a `/proc/.../stat` file so far.
fn stat_cpu(path: &str) -> io::Result<Duration> {
    let (_, fields) = stat(path)?;
    // After `)`: state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{path}: no utime and stime")));
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos((utime + stime) * 1_000_000_000 / hz))
}

/// CPU time (user + system) of process `pid` so far, every thread of it, from `/proc/PID/stat`.
pub fn process_cpu(pid: u32) -> io::Result<Duration> {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// CPU time (user + system) of thread `tid` of process `pid` so far.
pub fn thread_cpu(pid: u32, tid: u32) -> io::Result<Duration> {
    stat_cpu(&format!("/proc/{pid}/task/{tid}/stat"))
}

/// The threads of process `pid`: id and name (at most 15 bytes of it: the kernel cuts longer names).
pub fn threads(pid: u32) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut threads: Vec<(u32, String)> = dir
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        // A thread may end between the listing and the read; it is left out.
        .filter_map(|tid| Some((tid, stat(&format!("/proc/{pid}/task/{tid}/stat")).ok()?.0)))
        .collect();
    threads.sort_unstable();
    threads
}

/// The processes whose parent is `pid`, by a scan of every `/proc/*/stat`
/// (`/proc/PID/task/*/children` needs a kernel option that not every kernel has).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut children: Vec<u32> = dir
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            // After `)`: state, then ppid (field 4 of stat(5)). A process gone meanwhile is not a child.
            stat(&format!("/proc/{child}/stat"))
                .is_ok_and(|(_, fields)| fields.get(1).and_then(|f| f.parse::<u32>().ok()) == Some(pid))
        })
        .collect();
    children.sort_unstable();
    children
}

/// CPU time (user + system) of this whole process (every thread) so far.
pub fn self_cpu() -> Duration {
    // SAFETY: `rusage` is plain data; getrusage writes into the struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// Busy and total clock ticks of every CPU so far (`/proc/stat`); busy is all but idle and iowait.
pub fn cpu_ticks() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut cpus = Vec::new();
    for line in stat.lines() {
        let Some(rest) = line.strip_prefix("cpu") else { continue };
        let mut fields = rest.split_whitespace();
        let Some(Ok(cpu)) = fields.next().map(str::parse::<usize>) else { continue }; // skips the "cpu" total
        let ticks: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal (guest time is already in user)
        let total: u64 = ticks.iter().take(8).sum();
        let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
        if cpus.len() <= cpu {
            cpus.resize(cpu + 1, (0, 0));
        }
        cpus[cpu] = (total - idle, total);
    }
    cpus
}

/// Resident memory of process `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS line"))
}

/// A one-line description of the machine: CPU model, CPU count, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} × {model}, Linux {}", kernel.trim())
}
