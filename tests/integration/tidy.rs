//! Architecture rules checked on the dependency graph.
//!
//! `hephaestus-engine-core` is the pure engine: it must not depend (normally, directly or
//! transitively, with default features) on a database driver or an async runtime, so that
//! a user can embed it anywhere and the backends stay swappable.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;

use crate::support::repo_root;

const ENGINE_CORE: &str = "hephaestus-engine-core";

/// Forbidden crate names. A trailing `*` also matches `<name>-...` and `<name>_...`.
const FORBIDDEN: &[(&str, &str)] = &[
    ("sqlx*", "a database toolkit"),
    ("diesel*", "a database ORM"),
    ("sea-orm*", "a database ORM"),
    ("sea-query*", "a SQL query builder for database access"),
    ("postgres*", "a PostgreSQL driver"),
    ("pq-sys", "a PostgreSQL driver"),
    ("mysql*", "a MySQL driver"),
    ("rusqlite", "a SQLite driver"),
    ("libsqlite3-sys", "a SQLite driver"),
    ("mongodb", "a MongoDB driver"),
    ("redis*", "a Redis client"),
    ("bb8*", "a database connection pool"),
    ("deadpool*", "a database connection pool"),
    ("r2d2*", "a database connection pool"),
    ("tokio*", "an async runtime (tokio-postgres included)"),
    ("async-std", "an async runtime"),
    ("async-global-executor", "an async runtime"),
    ("async-executor", "an async runtime"),
    ("async-io", "an async runtime reactor"),
    ("smol", "an async runtime"),
    ("glommio", "an async runtime"),
    ("actix-rt", "an async runtime"),
    ("mio", "an I/O event loop used by async runtimes"),
];

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(base) => {
            name == base
                || name
                    .strip_prefix(base)
                    .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('_'))
        }
        None => name == pattern,
    }
}

/// Why `name` is forbidden in engine-core's normal dependencies, if it is.
fn forbidden_reason(name: &str) -> Option<&'static str> {
    FORBIDDEN
        .iter()
        .find(|(pattern, _)| matches(pattern, name))
        .map(|(_, reason)| *reason)
}

/// The forbidden crates in `cargo tree --prefix none -f "{p}"` output (one package per
/// line, `name vX.Y.Z [(source)] [(*)]`), by name.
fn violations(tree: &str) -> BTreeMap<String, &'static str> {
    tree.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| forbidden_reason(name).map(|reason| (name.to_owned(), reason)))
        .collect()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.current_dir(repo_root());
    command
}

#[test]
fn engine_core_has_no_database_or_async_runtime_dependency() {
    let output = cargo()
        .args(["tree", "-p", ENGINE_CORE, "-e", "normal", "--target", "all"])
        .args(["--prefix", "none", "-f", "{p}"])
        .output()
        .expect("run cargo tree");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "cargo tree failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with(&format!("{ENGINE_CORE} ")),
        "unexpected cargo tree output (the check would pass vacuously):\n{stdout}"
    );

    let found = violations(&stdout);
    if found.is_empty() {
        return;
    }
    let mut message = format!(
        "{ENGINE_CORE} must stay pure (no database crate, no async runtime), but it depends on:\n"
    );
    for (name, reason) in &found {
        let path = cargo()
            .args([
                "tree",
                "-p",
                ENGINE_CORE,
                "-e",
                "normal",
                "--target",
                "all",
                "-i",
                name,
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        // Writing to a String cannot fail.
        let _ = write!(
            message,
            "\n- {name}: forbidden because it is {reason}. Dependency path (cargo tree -i {name}):\n{path}"
        );
    }
    message.push_str(
        "\nMove the I/O into a backend crate (storage-pg, queue-pg, runner) or make it a dev-dependency.",
    );
    panic!("{message}");
}

#[test]
fn tidy_check_detects_forbidden_crates() {
    let tree = "\
hephaestus-engine-core v0.1.0 (/repo/crates/engine-core)
serde v1.0.200
tokio v1.40.0
tokio-macros v2.4.0 (proc-macro)
sqlx-core v0.8.2
postgres-types v0.2.7
mio v1.0.2
smol v2.0.2
serde v1.0.200 (*)
";
    let found = violations(tree);
    let names: Vec<&str> = found.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "mio",
            "postgres-types",
            "smol",
            "sqlx-core",
            "tokio",
            "tokio-macros"
        ]
    );
    assert_eq!(found["tokio"], "an async runtime (tokio-postgres included)");
    assert_eq!(found["sqlx-core"], "a database toolkit");
}

#[test]
fn tidy_check_accepts_pure_crates_with_similar_names() {
    let tree = "\
hephaestus-engine-core v0.1.0 (/repo/crates/engine-core)
serde v1.0.200
async-trait v0.1.83 (proc-macro)
smol_str v0.3.2
tokenizers v0.20.0
mioco v0.1.0
sqlparser v0.51.0
uuid v1.11.0
";
    assert!(violations(tree).is_empty(), "{:?}", violations(tree));
}
