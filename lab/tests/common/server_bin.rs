//! The `orderflow-server` binary for lab's test binaries (`#[path]`-included by each). It
//! belongs to another package, so cargo neither builds it for these tests nor tells them
//! where it is: it is built here, once per test binary, with the profile the tests were
//! built with, so a test never runs a stale server.

use std::{path::PathBuf, sync::OnceLock};

/// The freshly built server binary, next to the other workspace binaries.
pub(crate) fn server_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let bin = orderflow_lab::deployment::default_server_bin().expect("test binary path");
            let release = bin.parent().is_some_and(|dir| dir.ends_with("release"));
            let mut cargo = std::process::Command::new(env!("CARGO"));
            cargo
                .args([
                    "build",
                    "--quiet",
                    "-p",
                    "orderflow-server",
                    "--bin",
                    "orderflow-server",
                ])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if release {
                cargo.arg("--release");
            }
            let status = cargo.status().expect("cargo runs");
            assert!(
                status.success(),
                "building orderflow-server failed: {status}"
            );
            assert!(bin.is_file(), "no server binary at {}", bin.display());
            bin
        })
        .clone()
}
