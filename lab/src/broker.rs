//! Controlling the local RabbitMQ node for chaos: closing connections (all, or one
//! deployment's), restarting the broker application and raising a memory alarm. Goes through
//! the node's control command ([`Ctl`]), so it only works against a broker on this machine.

use std::{process::Stdio, time::Duration};

use anyhow::Context as _;
use tokio::process::Command;

/// The environment variable holding the control command line (split on whitespace).
pub const CTL_ENV: &str = "RABBITMQCTL";
/// The control command when [`CTL_ENV`] is not set.
pub const CTL_DEFAULT: &str = "rabbitmqctl";

/// The broker's control command, e.g. `rabbitmqctl` or `scripts/rabbitmq4.sh ctl`: every
/// caller (chaos tool, tests) builds its commands here, so one setting points them all at
/// another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ctl {
    program: String,
    args: Vec<String>,
}

impl Ctl {
    /// A command line split on whitespace; empty means the default.
    pub fn parse(line: &str) -> Ctl {
        let mut words = line.split_whitespace().map(str::to_owned);
        match words.next() {
            Some(program) => Ctl {
                program,
                args: words.collect(),
            },
            None => Ctl::parse(CTL_DEFAULT),
        }
    }

    /// From `RABBITMQCTL`, else `rabbitmqctl`.
    pub fn from_env() -> Ctl {
        Ctl::parse(&std::env::var(CTL_ENV).unwrap_or_default())
    }

    /// A synchronous command with `args` appended (for `Drop` guards and blocking tests).
    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(&self.program);
        command.args(&self.args).args(args).stdin(Stdio::null());
        command
    }

    /// Runs the control command with `args` (at most 120 s); its trimmed stdout.
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            Command::from(self.command(args))
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("{self} timed out"))?
        .with_context(|| {
            format!("running {self} (is RabbitMQ installed on this machine? set {CTL_ENV})")
        })?;
        anyhow::ensure!(
            output.status.success(),
            "{self} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

impl std::fmt::Display for Ctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.program)?;
        self.args.iter().try_for_each(|a| write!(f, " {a}"))
    }
}

/// Closes, from the broker side, every connection whose name contains `(namespace)` (the
/// services name their connections `orderflow <service> (<namespace>)`); returns how many.
pub async fn close_connections(ctl: &Ctl, namespace: &str) -> anyhow::Result<u32> {
    // The namespace is validated to [A-Za-z0-9_-], so it is safe inside an Erlang binary.
    let script = format!(
        "length([rabbit_networking:close_connection(P, \"chaos: connection closed by the broker\") || \
           P <- rabbit_networking:connections(), \
           [{{client_properties, Props}}] <- [rabbit_networking:connection_info(P, [client_properties])], \
           {{<<\"connection_name\">>, longstr, Name}} <- Props, \
           binary:match(Name, <<\"({namespace})\">>) =/= nomatch]).",
    );
    let closed = ctl.run(&["eval", &script]).await?;
    Ok(closed.parse().unwrap_or(0))
}

/// Stops the RabbitMQ application (the node stays up), waits `down`, starts it again and waits
/// until it serves. Every client loses its connection meanwhile.
pub async fn restart(ctl: &Ctl, down: Duration) -> anyhow::Result<()> {
    ctl.run(&["stop_app"]).await?;
    tokio::time::sleep(down).await;
    ctl.run(&["start_app"]).await?;
    ctl.run(&["await_startup"]).await?;
    Ok(())
}

/// A memory alarm on the node: the watermark is set so low that the broker blocks every
/// publishing connection, as it does when it runs out of memory. Dropping the guard (or
/// [`MemoryAlarm::clear`]) restores the watermark the node had, so a failing test never
/// leaves the shared broker blocked.
#[derive(Debug)]
pub struct MemoryAlarm {
    ctl: Ctl,
    /// The node's watermark before, as the Erlang term it reported.
    original: Option<String>,
}

impl MemoryAlarm {
    /// Raises the alarm.
    pub async fn raise(ctl: &Ctl) -> anyhow::Result<MemoryAlarm> {
        // Read and written back as an Erlang term, so a relative or an absolute watermark
        // returns exactly as it was.
        let original = ctl
            .run(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
            .await?;
        let alarm = MemoryAlarm {
            ctl: ctl.clone(),
            original: Some(original),
        };
        ctl.run(&[
            "eval",
            "vm_memory_monitor:set_vm_memory_high_watermark(0.000001).",
        ])
        .await?;
        Ok(alarm)
    }

    /// The watermark the node had before the alarm.
    pub fn original(&self) -> &str {
        self.original.as_deref().unwrap_or_default()
    }

    /// Restores the watermark; the broker unblocks its publishers.
    pub async fn clear(mut self) -> anyhow::Result<()> {
        if let Some(original) = self.original.take() {
            self.ctl.run(&["eval", &restore_script(&original)]).await?;
        }
        Ok(())
    }
}

fn restore_script(original: &str) -> String {
    format!("vm_memory_monitor:set_vm_memory_high_watermark({original}).")
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        if let Some(original) = self.original.take() {
            let _ = self
                .ctl
                .command(&["eval", &restore_script(&original)])
                .output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_command_is_split_on_whitespace() {
        let ctl = Ctl::parse("  /work/main/scripts/rabbitmq4.sh   ctl ");
        assert_eq!(ctl.to_string(), "/work/main/scripts/rabbitmq4.sh ctl");
        let command = ctl.command(&["status"]);
        assert_eq!(command.get_program(), "/work/main/scripts/rabbitmq4.sh");
        assert_eq!(command.get_args().collect::<Vec<_>>(), ["ctl", "status"]);
        assert_eq!(Ctl::parse("").to_string(), "rabbitmqctl");
    }
}
