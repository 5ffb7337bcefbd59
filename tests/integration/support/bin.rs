//! The `hephaestus` executable the process tests run: `HEPHAESTUS_BIN` when
//! set (a path), else built with `$CARGO build -p hephaestus-cli --bin
//! hephaestus` (printed), its path taken from cargo's JSON messages, so it
//! works on a clean clone and with any target directory.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The `hephaestus` executable (see the module documentation).
pub fn hephaestus_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("HEPHAESTUS_BIN").filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "HEPHAESTUS_BIN={} is not a file",
                path.display()
            );
            eprintln!("faults: using HEPHAESTUS_BIN={}", path.display());
            return path;
        }
        build_bin()
    })
    .clone()
}

fn build_bin() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    command
        .args([
            "build",
            "-p",
            "hephaestus-cli",
            "--bin",
            "hephaestus",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(super::repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("faults: building the worker binary: {command:?}");
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(
        output.status.success(),
        "building the hephaestus binary failed ({}); set HEPHAESTUS_BIN to a built one",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == "hephaestus")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the hephaestus executable")
}
