//! What a bench run produced and how it is shown: the records of every (mode, system) run,
//! the side-by-side table people read, the JSON with every raw number for tools, and the
//! two SVG figures (latency CDFs, RSS over time) drawn from the same records.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

use clap::ValueEnum as _;
use orderflow_server::db::DbSync;

use super::{
    Mode,
    batches::Batches,
    plot::{self, Axis, Figure, Panel, Scale, Series},
    stats::{Latencies, Summary},
    timeline,
};
use crate::{
    deployment::{Exit, Layout},
    procstat::{self, Reading, RssPoint},
};

/// Share of the machine's CPU that other processes may use before a run is flagged noisy.
const NOISY: f64 = 0.1;

/// Which system a run measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum System {
    Orderflow,
    Baseline,
}

impl System {
    fn as_str(self) -> &'static str {
        match self {
            Self::Orderflow => "orderflow",
            Self::Baseline => "baseline",
        }
    }
}

/// The whole bench: where it ran, how it was configured, and every run.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) started_unix_s: u64,
    pub(crate) machine: Machine,
    pub(crate) config: Config,
    pub(crate) runs: Vec<Run>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) cpu_model: Option<String>,
    pub(crate) memory_mib: Option<u64>,
    pub(crate) kernel: Option<String>,
}

impl Machine {
    pub(crate) fn detect() -> Self {
        use procfs::Current as _;
        let kernel = procfs::sys::kernel::Version::current().ok();
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: procfs::CpuInfo::current()
                .ok()
                .and_then(|info| info.model_name(0).map(str::to_owned)),
            memory_mib: procfs::Meminfo::current()
                .ok()
                .map(|m| m.mem_total / (1024 * 1024)),
            kernel: kernel.map(|v| format!("{}.{}.{}", v.major, v.minor, v.patch)),
        }
    }
}

/// The settings every run shared.
#[derive(Debug, Serialize)]
pub(crate) struct Config {
    pub(crate) deployment: Layout,
    /// The server's own setting, written as its `--db-sync` value.
    #[serde(serialize_with = "db_sync_name")]
    pub(crate) db_sync: DbSync,
    /// Where orderflow keeps its state: `sqlite` or `postgresql`.
    pub(crate) store: &'static str,
    pub(crate) prefetch: u16,
    pub(crate) orders: u64,
    pub(crate) serial_orders: u64,
    pub(crate) in_flight: usize,
    pub(crate) rate_per_s: f64,
    pub(crate) max_outstanding: usize,
    pub(crate) warmup_orders: u64,
    pub(crate) duration_limit_s: f64,
    pub(crate) server_bin: String,
}

/// CPU and memory of one process over a run's measured phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Usage {
    pub(crate) name: String,
    /// CPU seconds spent during the measured phase.
    pub(crate) cpu_s: f64,
    /// RSS at the end of the phase, KiB.
    pub(crate) rss_kib: Option<u64>,
    /// Peak RSS over the process's life, KiB (for the bench itself: over the whole bench).
    pub(crate) peak_rss_kib: Option<u64>,
}

impl Usage {
    pub(crate) fn between(name: &str, before: Option<Reading>, after: Option<Reading>) -> Self {
        Self {
            name: name.to_owned(),
            cpu_s: match (before, after) {
                (Some(b), Some(a)) => (a.cpu_s - b.cpu_s).max(0.0),
                _ => f64::NAN,
            },
            rss_kib: after.map(|a| a.rss_kib),
            peak_rss_kib: after.map(|a| a.peak_rss_kib),
        }
    }
}

/// What the whole machine did during a run's measured phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MachineUsage {
    /// Wall time of the phase times the number of CPUs.
    pub(crate) capacity_cpu_s: f64,
    /// CPU seconds used by every process together.
    pub(crate) busy_cpu_s: Option<f64>,
    /// Of those, CPU seconds of processes the bench did not measure (builds, other tests):
    /// the noise in this run's numbers.
    pub(crate) other_cpu_s: Option<f64>,
    /// CPU seconds spent idle waiting for disk.
    pub(crate) iowait_s: Option<f64>,
    /// 1-minute load average when the phase started.
    pub(crate) load_before: Option<f64>,
}

/// One (mode, system) run.
#[derive(Debug, Serialize)]
pub(crate) struct Run {
    pub(crate) mode: Mode,
    pub(crate) system: System,
    /// The arrival pattern in words, e.g. `200 in flight`.
    pub(crate) load: String,
    pub(crate) requested: u64,
    pub(crate) sent: u64,
    pub(crate) completed: u64,
    /// Orders that ended otherwise (gRPC error, non-COMPLETED terminal status, …).
    pub(crate) failed: u64,
    /// Sent but not finished when the duration limit cut the run.
    pub(crate) unfinished: u64,
    /// Every requested order was sent and finished before the limit.
    pub(crate) complete: bool,
    pub(crate) errors: BTreeMap<String, u64>,
    /// First send to last completion, seconds.
    pub(crate) wall_s: f64,
    pub(crate) orders_per_s: f64,
    pub(crate) e2e_ms: Option<Summary>,
    /// PlaceOrder returned (orderflow) / OrderCreated confirmed (baseline).
    pub(crate) accept_ms: Option<Summary>,
    pub(crate) max_send_lag_ms: f64,
    pub(crate) processes: Vec<Usage>,
    pub(crate) broker: Option<Usage>,
    /// PostgreSQL's processes together, when orderflow's state is there (`--postgres`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) database: Option<Usage>,
    pub(crate) bench: Usage,
    pub(crate) machine: MachineUsage,
    pub(crate) rss_timeline: Vec<RssPoint>,
    pub(crate) server_exits: Vec<Exit>,
    /// WARN/ERROR lines from the servers' logs (at most 50).
    pub(crate) server_warnings: Vec<String>,
    pub(crate) server_warning_count: usize,
    /// Queues holding ready messages when the measured phase ended, with their counts: work
    /// the system had not caught up with although the orders had completed.
    pub(crate) backlog_at_end: BTreeMap<String, u64>,
    /// orderflow: each queue's consumer batches (database transactions) during the measured
    /// phase.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) batches: BTreeMap<String, Batches>,
    /// Queues that still held messages when the namespace was deleted.
    pub(crate) leftover_messages: BTreeMap<String, u64>,
    pub(crate) notes: Vec<String>,
    #[serde(skip)]
    pub(crate) e2e: Latencies,
    /// The completed orders' e2e latencies by the second of the run they completed in.
    pub(crate) e2e_by_second: Vec<timeline::Second>,
    pub(crate) samples: Samples,
}

/// Every latency sample of a run, microseconds, ascending.
#[derive(Debug, Serialize)]
pub(crate) struct Samples {
    pub(crate) e2e_us: Vec<u64>,
    pub(crate) accept_us: Vec<u64>,
}

impl Run {
    /// RSS of each server process at milestones of orders done: every 10,000 for long runs,
    /// quarters otherwise.
    pub(crate) fn rss_milestones(&self) -> Vec<(u64, BTreeMap<String, u64>)> {
        let done = self.completed + self.failed;
        let milestones: Vec<u64> = if done >= 20_000 {
            (1..=done / 10_000).map(|k| k * 10_000).collect()
        } else if done >= 4 {
            (1..=4).map(|q| done * q / 4).collect()
        } else {
            Vec::new()
        };
        milestones
            .into_iter()
            .filter_map(|orders| {
                let at: BTreeMap<String, u64> = self
                    .processes
                    .iter()
                    .filter_map(|p| {
                        Some((
                            p.name.clone(),
                            procstat::rss_when_done(&self.rss_timeline, &p.name, orders)?,
                        ))
                    })
                    .collect();
                (!at.is_empty()).then_some((orders, at))
            })
            .collect()
    }
}

/// `full` or `normal`: the server's `--db-sync` value.
pub(crate) fn db_sync_arg(db_sync: DbSync) -> String {
    db_sync
        .to_possible_value()
        .map_or_else(String::new, |value| value.get_name().to_owned())
}

fn db_sync_name<S: serde::Serializer>(db_sync: &DbSync, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&db_sync_arg(*db_sync))
}

impl Report {
    /// The human-readable report: results table, resources table, then anything abnormal.
    pub(crate) fn text(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "orderflow bench: {} deployment, {} store, db-sync {}, prefetch {}, warm-up {} orders per run",
            c.deployment,
            c.store,
            db_sync_arg(c.db_sync),
            c.prefetch,
            c.warmup_orders
        );
        let _ = writeln!(
            out,
            "machine: {} CPUs ({}), {} MiB RAM, Linux {}\n",
            self.machine.cpus,
            self.machine.cpu_model.as_deref().unwrap_or("unknown CPU"),
            self.machine.memory_mib.unwrap_or(0),
            self.machine.kernel.as_deref().unwrap_or("?")
        );
        let (headers, rows) = self.results_rows();
        out.push_str(&text_table(&headers, &rows));
        out.push_str(
            "\nlatencies in ms; e2e = send → COMPLETED seen by the client (rate mode: from the \
             scheduled send);\naccept = PlaceOrder returned (orderflow) / OrderCreated publish \
             confirmed (baseline)\n\n",
        );
        let (headers, rows) = self.resource_rows();
        out.push_str(&text_table(&headers, &rows));
        out.push_str(
            "\ncpu s = CPU seconds during the measured phase; bench = this process (the load \
             driver, and the whole baseline);\npeak RSS of the bench is over its whole life\n",
        );
        out.push_str(&self.notes_text());
        out
    }

    /// The same tables as Markdown, for BENCHMARKS.md.
    pub(crate) fn markdown(&self) -> String {
        let mut out = String::new();
        let (headers, rows) = self.results_rows();
        out.push_str(&markdown_table(&headers, &rows));
        out.push_str(
            "\nLatencies in ms. *e2e*: send → COMPLETED seen by the client (rate mode: from the \
             scheduled send). *accept*: PlaceOrder returned (orderflow) / OrderCreated publish \
             confirmed (baseline).\n\n",
        );
        let (headers, rows) = self.resource_rows();
        out.push_str(&markdown_table(&headers, &rows));
        out.push_str(
            "\n*cpu s*: CPU seconds during the measured phase. *bench*: this process (the load \
             driver, and the whole baseline). Peak RSS of the bench and of the broker is over \
             their whole life.\n",
        );
        let notes = self.notes_text();
        if !notes.trim().is_empty() {
            let _ = write!(out, "\n```text{notes}```\n");
        }
        out
    }

    fn results_rows(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        let headers = vec![
            "mode",
            "load",
            "system",
            "done/sent",
            "errors",
            "orders/s",
            "e2e p50",
            "p90",
            "p99",
            "max",
            "accept p50",
            "accept p99",
        ];
        let mut rows = Vec::new();
        for mode in self.modes() {
            let runs: Vec<&Run> = self.runs.iter().filter(|r| r.mode == mode).collect();
            for (i, run) in runs.iter().enumerate() {
                let e2e = run.e2e_ms;
                let accept = run.accept_ms;
                let flag = if run.complete { "" } else { " (incomplete)" };
                rows.push(vec![
                    if i == 0 {
                        mode.to_string()
                    } else {
                        String::new()
                    },
                    if i == 0 {
                        run.load.clone()
                    } else {
                        String::new()
                    },
                    format!("{}{flag}", run.system.as_str()),
                    format!("{}/{}", run.completed, run.sent),
                    (run.failed + run.unfinished).to_string(),
                    format!("{:.0}", run.orders_per_s),
                    ms(e2e.map(|s| s.p50_ms)),
                    ms(e2e.map(|s| s.p90_ms)),
                    ms(e2e.map(|s| s.p99_ms)),
                    ms(e2e.map(|s| s.max_ms)),
                    ms(accept.map(|s| s.p50_ms)),
                    ms(accept.map(|s| s.p99_ms)),
                ]);
            }
            let find = |system| runs.iter().find(|r| r.system == system);
            if let (Some(of), Some(base)) = (find(System::Orderflow), find(System::Baseline)) {
                let p99 = |r: &Run| r.e2e_ms.map(|s| s.p99_ms);
                let mut row = vec![String::new(); headers.len()];
                row[2] = "orderflow/baseline".to_owned();
                row[5] = ratio(Some(of.orders_per_s), Some(base.orders_per_s));
                row[8] = ratio(p99(of), p99(base));
                rows.push(row);
            }
        }
        (headers, rows)
    }

    fn resource_rows(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        let headers = vec![
            "mode",
            "system",
            "process",
            "cpu s",
            "cpu ms/order",
            "RSS end MiB",
            "peak RSS MiB",
        ];
        let mut rows = Vec::new();
        for run in &self.runs {
            let done = (run.completed + run.failed).max(1) as f64;
            let mut usages: Vec<(String, &Usage)> = run
                .processes
                .iter()
                .map(|u| (format!("server: {}", u.name), u))
                .collect();
            if let Some(broker) = &run.broker {
                usages.push(("rabbitmq (beam.smp)".to_owned(), broker));
            }
            if let Some(database) = &run.database {
                usages.push(("postgresql (postgres)".to_owned(), database));
            }
            usages.push(("bench (this process)".to_owned(), &run.bench));
            let other = run.machine.other_cpu_s.map(|cpu_s| Usage {
                name: "other".to_owned(),
                cpu_s,
                rss_kib: None,
                peak_rss_kib: None,
            });
            if let Some(other) = &other {
                usages.push(("other processes (noise)".to_owned(), other));
            }
            for (i, (label, usage)) in usages.into_iter().enumerate() {
                rows.push(vec![
                    if i == 0 {
                        run.mode.to_string()
                    } else {
                        String::new()
                    },
                    if i == 0 {
                        run.system.as_str().to_owned()
                    } else {
                        String::new()
                    },
                    label,
                    format!("{:.1}", usage.cpu_s),
                    format!("{:.2}", usage.cpu_s * 1000.0 / done),
                    mib(usage.rss_kib),
                    mib(usage.peak_rss_kib),
                ]);
            }
        }
        (headers, rows)
    }

    /// Machine load, incomplete runs, errors, server warnings, odd exits and memory
    /// milestones.
    fn notes_text(&self) -> String {
        let mut out = String::new();
        for run in &self.runs {
            let name = format!("{} / {}", run.mode, run.system.as_str());
            let m = &run.machine;
            if let (Some(busy), Some(iowait)) = (m.busy_cpu_s, m.iowait_s) {
                let _ = writeln!(
                    out,
                    "\n{name}: machine busy {busy:.1} of {:.1} CPU-s, iowait {iowait:.1} s, \
                     load average before {}",
                    m.capacity_cpu_s,
                    m.load_before.map_or("?".to_owned(), |l| format!("{l:.2}"))
                );
            }
            if let Some(other) = m.other_cpu_s
                && m.capacity_cpu_s > 0.0
                && other > NOISY * m.capacity_cpu_s
            {
                let _ = writeln!(
                    out,
                    "{name}: NOISY: other processes used {:.0}% of the machine's CPU during this run",
                    100.0 * other / m.capacity_cpu_s
                );
            }
            if !run.complete {
                let _ = writeln!(
                    out,
                    "\n{name}: INCOMPLETE: {} of {} sent, {} unfinished{}",
                    run.sent,
                    run.requested,
                    run.unfinished,
                    if run.unfinished > 0 || run.sent < run.requested {
                        " when the duration limit was reached"
                    } else {
                        ""
                    }
                );
            }
            if !run.errors.is_empty() {
                let _ = writeln!(out, "\n{name}: errors by kind:");
                for (kind, count) in &run.errors {
                    let _ = writeln!(out, "  {count:>7}  {kind}");
                }
            }
            for exit in &run.server_exits {
                if exit.killed || exit.code != Some(0) {
                    let _ = writeln!(
                        out,
                        "\n{name}: server {} did not stop cleanly on SIGTERM (exit code {:?}, killed: {})",
                        exit.name, exit.code, exit.killed
                    );
                }
            }
            if run.server_warning_count > 0 {
                let _ = writeln!(
                    out,
                    "\n{name}: {} WARN/ERROR lines in the server logs, first ones:",
                    run.server_warning_count
                );
                for line in run.server_warnings.iter().take(5) {
                    let _ = writeln!(out, "  {}", shorten(line, 240));
                }
            }
            if !run.backlog_at_end.is_empty() {
                let _ = writeln!(
                    out,
                    "\n{name}: messages still queued when the last order completed:"
                );
                for (queue, count) in &run.backlog_at_end {
                    let _ = writeln!(out, "  {count:>7}  {queue}");
                }
            }
            if !run.batches.is_empty() {
                let transactions: f64 = run.batches.values().map(|b| b.batches).sum();
                let per_order = transactions / (run.completed + run.failed).max(1) as f64;
                let _ = writeln!(
                    out,
                    "\n{name}: consumer transactions: {per_order:.2} per order; by queue, \
                     deliveries per transaction (mean), transactions, and ms from a delivery's \
                     receipt to its settlement (mean):"
                );
                for (queue, batches) in &run.batches {
                    let mean = batches.mean().unwrap_or_default();
                    let ms = batches.mean_handling_ms().unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  {mean:>7.1}  {:>7}  {ms:>7.2}  {queue}",
                        batches.batches
                    );
                }
            }
            // Only worth reading over enough seconds to have a typical one.
            if run.e2e_by_second.len() >= 5 {
                let typical = timeline::typical_p99_ms(&run.e2e_by_second).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "\n{name}: e2e by second of completion: the typical second's p99 {typical:.1} \
                     ms; the seconds with the slowest orders (second, orders, p50, p99, max ms):"
                );
                for second in timeline::slowest(&run.e2e_by_second, 3) {
                    let _ = writeln!(
                        out,
                        "  {:>7}  {:>7}  {:>7.1}  {:>7.1}  {:>7.1}",
                        second.t_s,
                        second.e2e.count,
                        second.e2e.p50_ms,
                        second.e2e.p99_ms,
                        second.e2e.max_ms
                    );
                }
            }
            for note in &run.notes {
                let _ = writeln!(out, "\n{name}: {note}");
            }
            let milestones = run.rss_milestones();
            if run.system == System::Orderflow && !milestones.is_empty() {
                let _ = writeln!(out, "\n{name}: server RSS by orders done:");
                for (orders, rss) in milestones {
                    let list: Vec<String> = rss
                        .iter()
                        .map(|(process, kib)| format!("{process} {}", mib(Some(*kib))))
                        .collect();
                    let _ = writeln!(out, "  {orders:>7}  {} MiB", list.join(", "));
                }
            }
        }
        out
    }

    fn modes(&self) -> Vec<Mode> {
        let mut modes: Vec<Mode> = Vec::new();
        for run in &self.runs {
            if !modes.contains(&run.mode) {
                modes.push(run.mode);
            }
        }
        modes
    }

    /// The end-to-end latency CDFs, one panel per mode.
    pub(crate) fn latency_figure(&self) -> Figure {
        let panels = self
            .modes()
            .into_iter()
            .map(|mode| {
                let series = self
                    .runs
                    .iter()
                    .filter(|r| r.mode == mode && !r.e2e.is_empty())
                    .map(|run| Series {
                        label: format!("{} ({:.0}/s)", run.system.as_str(), run.orders_per_s),
                        color: match run.system {
                            System::Orderflow => plot::PALETTE[0],
                            System::Baseline => plot::PALETTE[1],
                        },
                        dashed: run.system == System::Baseline,
                        points: run.e2e.cdf(400),
                    })
                    .collect();
                let load = self
                    .runs
                    .iter()
                    .find(|r| r.mode == mode)
                    .map_or(String::new(), |r| r.load.clone());
                Panel {
                    title: format!("{mode}: {load}"),
                    series,
                }
            })
            .collect();
        Figure {
            title: format!(
                "End-to-end latency, orderflow vs raw RabbitMQ ({}, db-sync {})",
                self.config.deployment,
                db_sync_arg(self.config.db_sync)
            ),
            x: Axis {
                label: "latency from send to completion (ms, log scale)".to_owned(),
                scale: Scale::Log,
            },
            y: Axis {
                label: "percentile of orders".to_owned(),
                scale: Scale::Percentile,
            },
            panels,
        }
    }

    /// RSS of the server processes over each orderflow run.
    pub(crate) fn memory_figure(&self) -> Figure {
        let panels = self
            .runs
            .iter()
            .filter(|r| r.system == System::Orderflow && !r.rss_timeline.is_empty())
            .map(|run| {
                let series = run
                    .processes
                    .iter()
                    .enumerate()
                    .map(|(i, process)| Series {
                        label: process.name.clone(),
                        color: plot::PALETTE[(i + 2) % plot::PALETTE.len()],
                        dashed: false,
                        points: run
                            .rss_timeline
                            .iter()
                            .filter_map(|p| {
                                Some((p.t_s, *p.rss_kib.get(&process.name)? as f64 / 1024.0))
                            })
                            .collect(),
                    })
                    .collect();
                Panel {
                    title: format!(
                        "{}: {}, {} orders done",
                        run.mode,
                        run.load,
                        run.completed + run.failed
                    ),
                    series,
                }
            })
            .collect();
        Figure {
            title: format!(
                "orderflow-server resident memory during each run ({})",
                self.config.deployment
            ),
            x: Axis {
                label: "time since the measured phase started (s)".to_owned(),
                scale: Scale::Linear,
            },
            y: Axis {
                label: "RSS (MiB)".to_owned(),
                scale: Scale::Linear,
            },
            panels,
        }
    }

    /// Writes results.json, report.txt, report.md, latency.svg and memory.svg into `dir`.
    pub(crate) fn write(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, contents: String| {
            let path = dir.join(name);
            fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
        };
        write("results.json", serde_json::to_string_pretty(self)?)?;
        write("report.txt", self.text())?;
        write("report.md", self.markdown())?;
        write("latency.svg", plot::render(&self.latency_figure())?)?;
        write("memory.svg", plot::render(&self.memory_figure())?)?;
        Ok(())
    }

    /// The report as JSON without the bulky parts (samples, RSS timelines), for `--json`.
    pub(crate) fn summary_json(&self) -> Result<serde_json::Value> {
        let mut value = serde_json::to_value(self)?;
        if let Some(runs) = value.get_mut("runs").and_then(|r| r.as_array_mut()) {
            for run in runs {
                if let Some(run) = run.as_object_mut() {
                    run.remove("samples");
                    run.remove("rss_timeline");
                }
            }
        }
        Ok(value)
    }
}

/// `text` cut to at most `max` characters, marked with `…` when cut (SQL in sqlx's slow
/// statement warnings runs to kilobytes).
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

fn ms(value: Option<f64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("{:.2}x", a / b),
        _ => "-".to_owned(),
    }
}

/// Columns left-aligned for words, right-aligned for numbers (a cell that parses as one, or
/// ends in `x` after one).
fn text_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..headers.len())
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .chain(std::iter::once(headers[c].len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let numeric = |c: usize| c >= 3;
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let rendered: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if numeric(c) {
                    format!("{cell:>width$}", width = widths[c])
                } else {
                    format!("{cell:<width$}", width = widths[c])
                }
            })
            .collect();
        out.push_str(rendered.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn markdown_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n", headers.join(" | "));
    let align: Vec<&str> = (0..headers.len())
        .map(|c| if c >= 3 { "---:" } else { ":---" })
        .collect();
    let _ = writeln!(out, "|{}|", align.join("|"));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers_for_the_table() {
        assert_eq!(ms(Some(1.234)), "1.23");
        assert_eq!(ms(Some(12.34)), "12.3");
        assert_eq!(ms(Some(1234.5)), "1234");
        assert_eq!(ms(None), "-");
        assert_eq!(mib(Some(2048)), "2.0");
        assert_eq!(ratio(Some(1.0), Some(4.0)), "0.25x");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "-");
    }

    #[test]
    fn shortens_long_lines_on_char_boundaries() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("abcdef", 3), "abc…");
        assert_eq!(shorten("ééé", 2), "éé…");
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["a".into(), "b".into(), "c".into(), "1".into()],
            vec!["long".into(), "".into(), "".into(), "1000".into()],
        ];
        let text = text_table(&["m", "l", "s", "n"], &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "m     l  s     n");
        assert_eq!(lines[1], "a     b  c     1");
        assert_eq!(lines[2], "long        1000");
        let md = markdown_table(&["m", "n"], &[vec!["a".into(), "1".into()]]);
        assert_eq!(md, "| m | n |\n|:---|:---|\n| a | 1 |\n");
    }
}
