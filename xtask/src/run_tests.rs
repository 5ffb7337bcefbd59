//! `cargo xtask test [--] [cargo test args...]`: the one command that runs every test.
//!
//! It finds a PostgreSQL by itself, in this order:
//! 1. `DATABASE_URL`, when set, is used as is;
//! 2. a local server on 127.0.0.1:5432, as user `postgres`, then as the current user
//!    (password from `PGPASSWORD` if set); a server that is installed but down is started
//!    with `pg_ctlcluster`; the database `hephaestus_test` is created if missing;
//! 3. Docker, when `docker info` succeeds: the tests then start a PostgreSQL container
//!    themselves (cargo feature `hephaestus-tests/testcontainers`);
//! 4. otherwise it says what to install and fails.
//!
//! Then it runs `cargo test --workspace` with the extra arguments.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};

const HOST: &str = "127.0.0.1";
const PORT: &str = "5432";
const TEST_DATABASE: &str = "hephaestus_test";

enum Database {
    /// A URL to export as `DATABASE_URL` (`None`: already set by the caller).
    Url(Option<String>),
    /// Run the tests with their Docker-backed feature.
    Docker,
}

pub fn run(mut extra: Vec<String>) -> Result<ExitCode> {
    if extra.first().is_some_and(|a| a == "--") {
        extra.remove(0);
    }
    let mut command = cargo();
    command.arg("test").arg("--workspace");
    with_database(&mut command)?;
    command.args(&extra);
    eprintln!("xtask test: running {command:?}");
    let status = command.status().context("running cargo test")?;
    Ok(exit_code(status))
}

/// `cargo xtask soak --soak-seconds N [--seed S]`: builds the release
/// `hephaestus` binary, then runs the fault-injection test's soak mode with
/// it (3 worker processes SIGKILLed and restarted for N seconds of load, a
/// PostgreSQL restart) against the database `cargo xtask test` would use.
pub fn soak(args: crate::args::Args) -> Result<ExitCode> {
    let Soak { seconds, seed } = Soak::parse(args)?;
    let mut build = cargo();
    build.args(["build", "--release", "-p", "hephaestus-cli"]);
    eprintln!("xtask soak: running {build:?}");
    let compiled = build.status().context("building the release binary")?;
    if !compiled.success() {
        return Ok(exit_code(compiled));
    }
    let binary = crate::repo_root()
        .join("target")
        .join("release")
        .join("hephaestus");
    let mut command = cargo();
    command
        .args([
            "test",
            "-p",
            "hephaestus-tests",
            "--test",
            "chaos",
            "--",
            "--nocapture",
        ])
        .env("HEPHAESTUS_SOAK_SECONDS", seconds.to_string())
        .env("HEPHAESTUS_BIN", &binary);
    if let Some(seed) = seed {
        command.env("HEPHAESTUS_FAULTS_SEED", seed);
    }
    with_database(&mut command)?;
    eprintln!("xtask soak: running {command:?}");
    let status = command.status().context("running the soak")?;
    Ok(exit_code(status))
}

/// The options of `cargo xtask soak`.
#[derive(Debug, PartialEq, Eq)]
struct Soak {
    seconds: u64,
    seed: Option<String>,
}

impl Soak {
    fn parse(mut args: crate::args::Args) -> Result<Self> {
        let seconds = args
            .value("--soak-seconds")?
            .context("--soak-seconds N is required")?;
        let seconds: u64 = seconds
            .parse()
            .ok()
            .filter(|&s| s > 0)
            .with_context(|| format!("--soak-seconds: {seconds:?} is not a positive number"))?;
        let seed = args.value("--seed")?;
        args.finish()?;
        Ok(Self { seconds, seed })
    }
}

fn cargo() -> Command {
    let mut command = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.current_dir(crate::repo_root());
    command
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    status
        .code()
        .and_then(|code| u8::try_from(code).ok())
        .map_or(ExitCode::FAILURE, ExitCode::from)
}

/// Points `command` (a `cargo test`) at the database the tests use.
fn with_database(command: &mut Command) -> Result<()> {
    match choose_database()? {
        Database::Url(Some(url)) => {
            command.env("DATABASE_URL", url);
        }
        Database::Url(None) => {}
        Database::Docker => {
            command
                .args(["--features", "hephaestus-tests/testcontainers"])
                .env_remove("DATABASE_URL");
        }
    }
    Ok(())
}

fn choose_database() -> Result<Database> {
    if env::var_os("DATABASE_URL").is_some_and(|url| !url.is_empty()) {
        eprintln!("xtask test: using DATABASE_URL from the environment");
        return Ok(Database::Url(None));
    }
    if let Some(user) = local_postgres()? {
        ensure_test_database(&user)?;
        let url = local_url(&user);
        eprintln!(
            "xtask test: using local PostgreSQL at {HOST}:{PORT} as user {user}, database {TEST_DATABASE}"
        );
        return Ok(Database::Url(Some(url)));
    }
    if succeeds(Command::new("docker").arg("info")) {
        eprintln!(
            "xtask test: no local PostgreSQL; Docker is running, the tests will start a PostgreSQL container (feature hephaestus-tests/testcontainers)"
        );
        return Ok(Database::Docker);
    }
    bail!(
        "no PostgreSQL found for the tests. Do one of:\n\
         \x20 - set DATABASE_URL=postgres://USER:PASSWORD@HOST:PORT/DATABASE\n\
         \x20 - install PostgreSQL so that it listens on {HOST}:{PORT} and accepts user postgres or your user \
         (Debian/Ubuntu: `sudo apt-get install -y postgresql`; see .ci/run)\n\
         \x20 - install and start Docker (the tests then start a PostgreSQL container themselves)"
    )
}

/// The first user that can log in to the local server, starting the server if it is
/// installed but down. `None` when there is no usable local server.
fn local_postgres() -> Result<Option<String>> {
    if !succeeds(Command::new("psql").arg("--version")) {
        eprintln!("xtask test: psql not found, skipping the local PostgreSQL");
        return Ok(None);
    }
    let users = candidate_users();
    if let Some(user) = users.iter().find(|u| can_connect(u)) {
        return Ok(Some(user.clone()));
    }
    if server_is_up() {
        bail!(
            "PostgreSQL at {HOST}:{PORT} is up but rejects users {}; set DATABASE_URL (or PGPASSWORD) to credentials that work",
            users.join(" and ")
        );
    }
    let Some(version) = installed_cluster_version() else {
        return Ok(None);
    };
    eprintln!("xtask test: PostgreSQL {version} is installed but down; starting it");
    let started = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "start"])
        .stdin(Stdio::null())
        .status()
        .context("running pg_ctlcluster")?;
    if !started.success() {
        bail!(
            "`pg_ctlcluster --skip-systemctl-redirect {version} main start` failed; start PostgreSQL yourself or set DATABASE_URL"
        );
    }
    Ok(users.into_iter().find(|u| can_connect(u)))
}

fn candidate_users() -> Vec<String> {
    let mut users = vec!["postgres".to_owned()];
    for var in ["USER", "LOGNAME"] {
        if let Ok(user) = env::var(var)
            && !user.is_empty()
            && !users.contains(&user)
        {
            users.push(user);
        }
    }
    users
}

fn psql(user: &str, sql: &str) -> Command {
    let mut command = Command::new("psql");
    command
        .args(["-h", HOST, "-p", PORT, "-U", user, "-d", "postgres"])
        .args([
            "-w",
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .stdin(Stdio::null());
    command
}

fn can_connect(user: &str) -> bool {
    succeeds(&mut psql(user, "select 1"))
}

fn server_is_up() -> bool {
    succeeds(Command::new("pg_isready").args(["-h", HOST, "-p", PORT]))
}

/// The newest version under /etc/postgresql, if PostgreSQL (Debian packaging) is installed.
fn installed_cluster_version() -> Option<String> {
    if !succeeds(Command::new("pg_ctlcluster").arg("--help")) {
        return None;
    }
    let mut versions: Vec<(u32, String)> = fs::read_dir("/etc/postgresql")
        .ok()?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let major = name.split('.').next()?.parse().ok()?;
            Some((major, name))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, name)| name)
}

fn ensure_test_database(user: &str) -> Result<()> {
    let output = psql(
        user,
        &format!("select 1 from pg_database where datname = '{TEST_DATABASE}'"),
    )
    .stderr(Stdio::inherit())
    .output()
    .context("running psql")?;
    if !output.status.success() {
        bail!("could not list the databases of the local PostgreSQL as user {user}");
    }
    if String::from_utf8_lossy(&output.stdout).trim() == "1" {
        return Ok(());
    }
    eprintln!("xtask test: creating database {TEST_DATABASE}");
    let created = psql(user, &format!("create database {TEST_DATABASE}"))
        .status()
        .context("running psql")?;
    if !created.success() {
        bail!("could not create database {TEST_DATABASE} as user {user}");
    }
    Ok(())
}

fn local_url(user: &str) -> String {
    let password = env::var("PGPASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .map(|p| format!(":{}", percent_encode(&p)))
        .unwrap_or_default();
    format!(
        "postgres://{}{password}@{HOST}:{PORT}/{TEST_DATABASE}",
        percent_encode(user)
    )
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Runs `command` quietly and tells whether it exited with success (false when it could
/// not be started at all).
fn succeeds(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::Soak;
    use crate::args::Args;

    fn parse(args: &[&str]) -> anyhow::Result<Soak> {
        Soak::parse(Args::new(args.iter().map(|a| (*a).to_owned()).collect()))
    }

    #[test]
    fn soak_takes_positive_seconds_and_an_optional_seed() {
        assert_eq!(
            parse(&["--soak-seconds", "600"]).unwrap(),
            Soak {
                seconds: 600,
                seed: None
            }
        );
        assert_eq!(
            parse(&["--seed=42", "--soak-seconds=5"]).unwrap(),
            Soak {
                seconds: 5,
                seed: Some("42".to_owned())
            }
        );
        for bad in [
            &[][..],
            &["--soak-seconds", "0"][..],
            &["--soak-seconds", "abc"][..],
            &["--soak-seconds", "5", "--verbose"][..],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
