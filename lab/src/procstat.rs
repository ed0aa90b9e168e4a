//! CPU time and memory of processes, read from Linux's `/proc` through the `procfs` crate:
//! the server processes under test, the RabbitMQ broker (`beam.smp`) and the caller itself,
//! so a report can say where the machine's time went. Also a sampler that records RSS every
//! 500 ms during a run, to show whether memory grows with the number of orders.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use procfs::{Current as _, CurrentSI as _, process::Process};
use serde::Serialize;
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

/// How often the sampler records RSS.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// One reading of one process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reading {
    /// User plus system CPU time since the process started, in seconds.
    pub cpu_s: f64,
    /// Resident set size now, in KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set size, in KiB (`VmHWM`).
    pub peak_rss_kib: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn read(pid: u32) -> procfs::ProcResult<Reading> {
    let pid = i32::try_from(pid).map_err(|_| procfs::ProcError::NotFound(None))?;
    reading(&Process::new(pid)?)
}

/// This process.
pub fn read_self() -> procfs::ProcResult<Reading> {
    reading(&Process::myself()?)
}

fn reading(process: &Process) -> procfs::ProcResult<Reading> {
    let stat = process.stat()?;
    let status = process.status()?;
    let missing = |field: &str| {
        procfs::ProcError::Incomplete(Some(
            format!("/proc/{}/status has no {field}", process.pid).into(),
        ))
    };
    Ok(Reading {
        cpu_s: (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64,
        rss_kib: status.vmrss.ok_or_else(|| missing("VmRSS"))?,
        peak_rss_kib: status.vmhwm.ok_or_else(|| missing("VmHWM"))?,
    })
}

/// CPU time of the whole machine since boot, from the `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineReading {
    /// user + nice + system + irq + softirq, in seconds over all CPUs.
    pub busy_s: f64,
    /// Time CPUs sat idle waiting for disk I/O, in seconds over all CPUs.
    pub iowait_s: f64,
}

/// Reads the machine's CPU counters: what every process together used, so a run can show
/// how much went to processes other than the ones measured (a build next door, say).
pub fn read_machine() -> procfs::ProcResult<MachineReading> {
    let total = procfs::KernelStats::current()?.total;
    let tps = procfs::ticks_per_second() as f64;
    let busy = total.user
        + total.nice
        + total.system
        + total.irq.unwrap_or(0)
        + total.softirq.unwrap_or(0);
    Ok(MachineReading {
        busy_s: busy as f64 / tps,
        iowait_s: total.iowait.unwrap_or(0) as f64 / tps,
    })
}

/// The 1-minute load average, as a hint of how busy the machine was before a run.
pub fn load_average() -> Option<f64> {
    procfs::LoadAverage::current()
        .ok()
        .map(|load| f64::from(load.one))
}

/// CPU seconds so far of every process named `comm` (e.g. `postgres`: the server and one
/// backend per connection), by pid: a database's cost is spread over all of them.
pub fn cpu_by_name(comm: &str) -> BTreeMap<i32, f64> {
    let Ok(all) = procfs::process::all_processes() else {
        return BTreeMap::new();
    };
    all.flatten()
        .filter_map(|process| {
            let stat = process.stat().ok()?;
            (stat.comm == comm).then(|| {
                let cpu = (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64;
                (process.pid, cpu)
            })
        })
        .collect()
}

/// CPU seconds the processes of `after` spent since `before`; one that started in between
/// counts whole. (One that ended in between is lost: the bench's connections stay open.)
pub fn cpu_since(before: &BTreeMap<i32, f64>, after: &BTreeMap<i32, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, cpu)| (cpu - before.get(pid).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// The pid of the local RabbitMQ node, if there is exactly one; the bench only reports the
/// broker's CPU when it can tell which process that is. `rabbitmqctl` runs a short-lived
/// `beam.smp` of its own, so the node is recognised by its boot arguments, not the name.
pub fn find_broker() -> Option<u32> {
    let mut found = None;
    for process in procfs::process::all_processes().ok()?.flatten() {
        let is_beam = process.stat().is_ok_and(|stat| stat.comm == "beam.smp");
        if is_beam
            && process
                .cmdline()
                .is_ok_and(|cmdline| is_rabbit_node(&cmdline))
        {
            if found.is_some() {
                return None;
            }
            found = u32::try_from(process.pid).ok();
        }
    }
    found
}

/// Whether a `beam.smp` command line boots a RabbitMQ node (`-s rabbit boot`).
fn is_rabbit_node(cmdline: &[String]) -> bool {
    cmdline.windows(3).any(|w| w == ["-s", "rabbit", "boot"])
}

/// One RSS sample of every watched process.
#[derive(Debug, Clone, Serialize)]
pub struct RssPoint {
    /// Seconds since the sampler started.
    pub t_s: f64,
    /// Orders finished at that moment.
    pub orders_done: u64,
    /// RSS in KiB by process name; a process that could not be read is left out.
    pub rss_kib: BTreeMap<String, u64>,
}

/// Samples RSS of named processes every [`SAMPLE_EVERY`] until stopped.
#[derive(Debug)]
pub struct Sampler {
    stop: CancellationToken,
    task: JoinHandle<Vec<RssPoint>>,
}

impl Sampler {
    /// Starts sampling `processes` (name, pid); `done` is the run's finished-orders counter.
    pub fn start(processes: Vec<(String, u32)>, done: Arc<AtomicU64>) -> Self {
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
    pub async fn finish(self) -> Vec<RssPoint> {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

/// RSS of `process` at the first sample taken once `orders` orders were done, for the
/// "does memory grow with N" figures.
pub fn rss_when_done(points: &[RssPoint], process: &str, orders: u64) -> Option<u64> {
    points
        .iter()
        .find(|p| p.orders_done >= orders)
        .and_then(|p| p.rss_kib.get(process).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_since_counts_new_processes_whole_and_never_goes_negative() {
        let before = BTreeMap::from([(10, 1.0), (11, 5.0)]);
        let after = BTreeMap::from([(10, 1.5), (11, 4.0), (12, 0.25)]);
        assert_eq!(cpu_since(&before, &after), 0.5 + 0.0 + 0.25);
        // This very process is found by its name.
        let me = Process::myself().unwrap().stat().unwrap().comm;
        assert!(cpu_by_name(&me).contains_key(&Process::myself().unwrap().pid));
    }

    #[test]
    fn reads_the_machine() {
        let now = read_machine().unwrap();
        assert!(now.busy_s > 0.0);
        assert!(load_average().is_some());
    }

    #[test]
    fn recognises_the_broker_node_but_not_rabbitmqctl() {
        let words = |line: &str| line.split(' ').map(str::to_owned).collect::<Vec<_>>();
        let node = words("/usr/lib/erlang/bin/beam.smp -W w -- -s rabbit boot -noshell");
        assert!(is_rabbit_node(&node));
        let ctl = words("/usr/lib/erlang/bin/beam.smp -- -s rabbitmqctl_escript main");
        assert!(!is_rabbit_node(&ctl));
    }

    #[test]
    fn reads_this_process() {
        let me = read_self().unwrap();
        assert!(me.rss_kib > 0 && me.peak_rss_kib >= me.rss_kib);
        assert!(me.cpu_s >= 0.0);
        // By pid too. Not compared with the reading above: the kernel's RSS counters are
        // per-CPU approximations, and other test threads free memory in between, so a later
        // peak can read lower than an earlier RSS.
        let by_pid = read(std::process::id()).unwrap();
        assert!(by_pid.rss_kib > 0 && by_pid.peak_rss_kib >= by_pid.rss_kib);
        assert!(read(u32::MAX).is_err());
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
