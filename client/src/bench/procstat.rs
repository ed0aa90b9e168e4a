//! CPU time and memory of processes, read from Linux's `/proc`: the server processes under
//! test, the RabbitMQ broker (`beam.smp`) and the bench itself, so a report can say where
//! the machine's time went. Also a sampler that records RSS every 500 ms during a run, to
//! show whether memory grows with the number of orders.

use std::{
    collections::BTreeMap,
    fs, io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

/// Clock ticks per second of `utime`/`stime` in `/proc/<pid>/stat` (`getconf CLK_TCK`). It
/// is 100 on every Linux architecture the bench can run on (the kernel's USER_HZ); reading
/// it through `sysconf` would need `libc` and `unsafe` for a constant.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// How often the sampler records RSS.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// One reading of one process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Reading {
    /// User plus system CPU time since the process started, in seconds.
    pub(crate) cpu_s: f64,
    /// Resident set size now, in KiB (`VmRSS`).
    pub(crate) rss_kib: u64,
    /// Peak resident set size, in KiB (`VmHWM`).
    pub(crate) peak_rss_kib: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub(crate) fn read(pid: u32) -> io::Result<Reading> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let cpu_ticks = cpu_ticks(&stat).ok_or_else(|| malformed("stat", pid))?;
    Ok(Reading {
        cpu_s: cpu_ticks as f64 / CLOCK_TICKS_PER_SEC,
        rss_kib: status_kib(&status, "VmRSS").ok_or_else(|| malformed("status", pid))?,
        peak_rss_kib: status_kib(&status, "VmHWM").ok_or_else(|| malformed("status", pid))?,
    })
}

/// The bench's own process.
pub(crate) fn read_self() -> io::Result<Reading> {
    read(std::process::id())
}

fn malformed(file: &str, pid: u32) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected format of /proc/{pid}/{file}"),
    )
}

/// `utime + stime` from a `stat` line. The command name (field 2) is in parentheses and may
/// itself contain spaces or parentheses, so fields are counted from the *last* `)`: after it
/// come field 3 (state) onwards, which puts utime (14) and stime (15) at offsets 11 and 12.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A `Key:   1234 kB` line of `/proc/<pid>/status`, in KiB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// CPU time of the whole machine since boot, from the `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct MachineReading {
    /// user + nice + system + irq + softirq, in seconds over all CPUs.
    pub(crate) busy_s: f64,
    /// Time CPUs sat idle waiting for disk I/O, in seconds over all CPUs.
    pub(crate) iowait_s: f64,
}

/// Reads the machine's CPU counters: what every process together used, so a run can show
/// how much went to processes other than the ones measured (a build next door, say).
pub(crate) fn read_machine() -> io::Result<MachineReading> {
    let stat = fs::read_to_string("/proc/stat")?;
    machine_ticks(&stat)
        .map(|(busy, iowait)| MachineReading {
            busy_s: busy as f64 / CLOCK_TICKS_PER_SEC,
            iowait_s: iowait as f64 / CLOCK_TICKS_PER_SEC,
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/stat"))
}

/// (busy, iowait) ticks from the aggregate `cpu ` line: user nice system idle iowait irq
/// softirq steal ….
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let field = |i: usize| fields.get(i).copied();
    let busy = field(0)? + field(1)? + field(2)? + field(5)? + field(6)?;
    Some((busy, field(4)?))
}

/// The 1-minute load average, as a hint of how busy the machine was before a run.
pub(crate) fn load_average() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The pid of the local RabbitMQ node, if there is exactly one; the bench only reports the
/// broker's CPU when it can tell which process that is. `rabbitmqctl` runs a short-lived
/// `beam.smp` of its own, so the node is recognised by its boot arguments, not the name.
pub(crate) fn find_broker() -> Option<u32> {
    let mut found = None;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let is_beam = fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim() == "beam.smp");
        if is_beam
            && fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| is_rabbit_node(&cmdline))
        {
            if found.is_some() {
                return None;
            }
            found = Some(pid);
        }
    }
    found
}

/// Whether a NUL-separated `beam.smp` command line boots a RabbitMQ node (`-s rabbit boot`).
fn is_rabbit_node(cmdline: &[u8]) -> bool {
    cmdline
        .split(|&b| b == 0)
        .collect::<Vec<_>>()
        .windows(3)
        .any(|w| w == [&b"-s"[..], b"rabbit", b"boot"])
}

/// One RSS sample of every watched process.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RssPoint {
    /// Seconds since the sampler started.
    pub(crate) t_s: f64,
    /// Orders finished at that moment.
    pub(crate) orders_done: u64,
    /// RSS in KiB by process name; a process that could not be read is left out.
    pub(crate) rss_kib: BTreeMap<String, u64>,
}

/// Samples RSS of named processes every [`SAMPLE_EVERY`] until stopped.
#[derive(Debug)]
pub(crate) struct Sampler {
    stop: CancellationToken,
    task: JoinHandle<Vec<RssPoint>>,
}

impl Sampler {
    /// Starts sampling `processes` (name, pid); `done` is the run's finished-orders counter.
    pub(crate) fn start(processes: Vec<(String, u32)>, done: Arc<AtomicU64>) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut points = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    _ = token.cancelled() => true,
                    _ = tick.tick() => false,
                };
                // One last sample when stopped, so the timeline covers the run's last orders.
                let rss_kib = processes
                    .iter()
                    .filter_map(|(name, pid)| Some((name.clone(), read(*pid).ok()?.rss_kib)))
                    .collect();
                points.push(RssPoint {
                    t_s: start.elapsed().as_secs_f64(),
                    orders_done: done.load(Ordering::Relaxed),
                    rss_kib,
                });
                if stopping {
                    return points;
                }
            }
        });
        Self { stop, task }
    }

    /// Stops sampling and returns the samples.
    pub(crate) async fn finish(self) -> Vec<RssPoint> {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

/// RSS of `process` at the first sample taken once `orders` orders were done, for the
/// "does memory grow with N" figures.
pub(crate) fn rss_when_done(points: &[RssPoint], process: &str, orders: u64) -> Option<u64> {
    points
        .iter()
        .find(|p| p.orders_done >= orders)
        .and_then(|p| p.rss_kib.get(process).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_ticks_even_with_odd_command_names() {
        // Fields 14 and 15 are 1500 and 250.
        let stat = "4242 (orderflow (x) 1) S 1 4242 4242 0 -1 4194560 900 0 0 0 1500 250 0 0 20 0 9 0 123 456 789";
        assert_eq!(cpu_ticks(stat), Some(1750));
        assert_eq!(cpu_ticks("garbage"), None);
        assert_eq!(cpu_ticks("1 (a) S 1 2"), None);
    }

    #[test]
    fn parses_status_sizes() {
        let status = "Name:\torderflow-serv\nVmPeak:\t  900000 kB\nVmHWM:\t   51234 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(40_960));
        assert_eq!(status_kib(status, "VmHWM"), Some(51_234));
        assert_eq!(status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn parses_machine_cpu_time() {
        let stat = "cpu  100 5 50 9000 30 2 3 7 0 0\ncpu0 50 2 25 4500 15 1 1 3 0 0\n";
        assert_eq!(machine_ticks(stat), Some((160, 30)));
        assert_eq!(machine_ticks("cpu0 1 2 3\n"), None);
        let now = read_machine().unwrap();
        assert!(now.busy_s > 0.0);
    }

    #[test]
    fn recognises_the_broker_node_but_not_rabbitmqctl() {
        let node = b"/usr/lib/erlang/bin/beam.smp\0-W\0w\0--\0-s\0rabbit\0boot\0-noshell\0";
        assert!(is_rabbit_node(node));
        let ctl = b"/usr/lib/erlang/bin/beam.smp\0--\0-s\0rabbitmqctl_escript\0main\0";
        assert!(!is_rabbit_node(ctl));
    }

    #[test]
    fn reads_this_process() {
        let me = read_self().unwrap();
        assert!(me.rss_kib > 0 && me.peak_rss_kib >= me.rss_kib);
        assert!(me.cpu_s >= 0.0);
    }

    #[test]
    fn finds_rss_at_a_milestone() {
        let point = |orders_done, rss| RssPoint {
            t_s: 0.0,
            orders_done,
            rss_kib: BTreeMap::from([("server".to_owned(), rss)]),
        };
        let points = [point(0, 10), point(900, 20), point(1_200, 30)];
        assert_eq!(rss_when_done(&points, "server", 1_000), Some(30));
        assert_eq!(rss_when_done(&points, "server", 0), Some(10));
        assert_eq!(rss_when_done(&points, "server", 5_000), None);
        assert_eq!(rss_when_done(&points, "other", 0), None);
    }
}
