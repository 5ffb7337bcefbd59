//! Architecture rules checked on the dependency graph and the sources.
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

/// Words engine-core's non-test code must not contain: it reads no clock and
/// starts no thread or task (time and randomness are arguments).
const IMPURE: &[(&str, &str)] = &[
    ("Utc::now", "reads the wall clock"),
    ("Local::now", "reads the wall clock"),
    ("SystemTime::now", "reads the wall clock"),
    ("Instant::now", "reads the monotonic clock"),
    ("thread::spawn", "starts a thread"),
    ("thread::sleep", "blocks on time"),
    ("tokio::", "uses an async runtime"),
    ("spawn_blocking", "starts a task"),
];

/// The code of a source file that is not test code: comments dropped, and
/// everything from its `#[cfg(test)]` module on.
fn non_test_code(source: &str) -> String {
    source
        .lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

fn impurities(file: &str, source: &str) -> Vec<String> {
    let code = non_test_code(source);
    IMPURE
        .iter()
        .filter(|(word, _)| code.contains(word))
        .map(|(word, why)| format!("{file}: `{word}` {why}"))
        .collect()
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn engine_core_reads_no_clock_and_starts_no_thread_or_task() {
    let src = repo_root().join("crates/engine-core/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 10, "engine-core's sources were not found");
    let mut found = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // Test-only modules (declared under `#[cfg(test)]`).
        if matches!(name, "tests.rs" | "proptests.rs" | "test_support.rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).expect("read a source file");
        let shown = relative(&path);
        // `clock.rs` holds `SystemClock`, the one sanctioned wall-clock
        // read: the crates above call it; the engine takes time as an
        // argument. It may read the wall clock once and do nothing else.
        let found_here = impurities(&shown, &source);
        if name == "clock.rs" {
            assert_eq!(
                non_test_code(&source).matches("Utc::now").count(),
                1,
                "{shown} reads the wall clock in exactly one place"
            );
            found.extend(
                found_here
                    .into_iter()
                    .filter(|v| !v.ends_with("`Utc::now` reads the wall clock")),
            );
            continue;
        }
        found.extend(found_here);
    }
    assert!(
        found.is_empty(),
        "engine-core must stay pure (time and randomness are arguments):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_purity_check_sees_code_and_skips_comments_and_tests() {
    let source = "\
fn now() -> DateTime<Utc> { Utc::now() }
// Instant::now in a comment is fine
#[cfg(test)]
mod tests { fn t() { std::thread::spawn(|| ()); } }
";
    assert_eq!(
        impurities("f.rs", source),
        vec!["f.rs: `Utc::now` reads the wall clock".to_owned()]
    );
}

/// Each workspace crate's layer: a crate may depend (normally) only on
/// crates of lower layers, so dependencies point one way.
const LAYERS: &[(&str, u8)] = &[
    ("hephaestus-engine-core", 0),
    ("hephaestus-migrations-gen", 0),
    ("hephaestus-pg-pooling", 0),
    ("hephaestus-memory", 1),
    ("hephaestus-storage-pg", 1),
    ("hephaestus-queue-pg", 1),
    ("hephaestus-sqlite", 1),
    ("hephaestus-runner", 2),
    ("hephaestus-failure-handler", 3),
    ("hephaestus-conformance", 3),
    ("hephaestus-dashboard", 4),
    ("order-flow", 4),
    ("hephaestus-cli", 5),
    ("xtask", 6),
    ("hephaestus-tests", 6),
];

fn layer(name: &str) -> Option<u8> {
    LAYERS.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
}

/// The violations among `(crate, its normal workspace dependencies)`.
fn upward_edges(crates: &[(String, Vec<String>)]) -> Vec<String> {
    let mut found = Vec::new();
    for (name, deps) in crates {
        let Some(own) = layer(name) else {
            found.push(format!("{name} has no layer: add it to LAYERS in tidy.rs"));
            continue;
        };
        for dep in deps {
            match layer(dep) {
                Some(theirs) if theirs < own => {}
                Some(theirs) => found.push(format!(
                    "{name} (layer {own}) depends on {dep} (layer {theirs}): dependencies must point down"
                )),
                None => found.push(format!("{dep} has no layer: add it to LAYERS in tidy.rs")),
            }
        }
    }
    found
}

#[test]
fn workspace_dependencies_point_down_the_layers() {
    let output = cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let members: Vec<String> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| p["name"].as_str().map(ToOwned::to_owned))
        .collect();
    let crates: Vec<(String, Vec<String>)> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                // Normal dependencies (dev and build ones have a kind).
                .filter(|d| d["kind"].is_null())
                .filter_map(|d| d["name"].as_str())
                .filter(|d| members.iter().any(|m| m == d))
                .map(ToOwned::to_owned)
                .collect();
            (p["name"].as_str().unwrap_or_default().to_owned(), deps)
        })
        .collect();
    assert!(crates.len() >= 10, "the workspace was not read: {crates:?}");
    let found = upward_edges(&crates);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_layer_check_finds_an_upward_edge() {
    let crates = vec![
        (
            "hephaestus-engine-core".to_owned(),
            vec!["hephaestus-runner".to_owned()],
        ),
        (
            "hephaestus-runner".to_owned(),
            vec!["hephaestus-memory".to_owned()],
        ),
    ];
    assert_eq!(
        upward_edges(&crates),
        vec![
            "hephaestus-engine-core (layer 0) depends on hephaestus-runner (layer 2): dependencies must point down"
                .to_owned()
        ]
    );
}

/// The modules of one crate's `src` each non-test source refers to through
/// `crate::<module>` (in `use` lines and in paths), by module name.
fn module_references(src: &std::path::Path) -> BTreeMap<String, Vec<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: Vec<String> = files
        .iter()
        .filter_map(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .map(ToOwned::to_owned)
        })
        .collect();
    let mut graph = BTreeMap::new();
    for path in &files {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let code = non_test_code(&std::fs::read_to_string(path).expect("read a source file"));
        graph.insert(name.clone(), references_in(&code, &name, &modules));
    }
    graph
}

/// The modules of `modules` that `code` (module `own`) names as
/// `crate::<module>`, each once.
fn references_in(code: &str, own: &str, modules: &[String]) -> Vec<String> {
    let mut found: Vec<String> = code
        .split("crate::")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| m != own && modules.contains(m))
        .collect();
    found.sort();
    found.dedup();
    found
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_runners_modules_import_each_other_one_way() {
    let graph = module_references(&repo_root().join("crates/runner/src"));
    assert!(graph.len() > 15, "the runner's modules were not found");
    assert_eq!(
        find_cycle(&graph),
        None,
        "imports among crates/runner's modules must flow one way"
    );
    // The handle and the seam sit at the bottom: no component is below
    // them, and the public facade is imported by nothing but the
    // per-workflow handle.
    for low in ["handle", "backend", "outcome", "batcher", "round"] {
        for (module, uses) in &graph {
            assert!(
                !(graph[low].contains(module) && uses.contains(&low.to_owned())),
                "{low} and {module} import each other"
            );
        }
    }
    let facade_users: Vec<&String> = graph
        .iter()
        .filter(|(_, uses)| uses.iter().any(|u| u == "runtime"))
        .map(|(m, _)| m)
        .collect();
    assert_eq!(
        facade_users,
        vec!["facade"],
        "only the facade builds on `runtime`"
    );
}

#[test]
fn the_cycle_check_finds_a_cycle_and_reads_paths() {
    let modules: Vec<String> = ["a", "b", "c"].map(ToOwned::to_owned).to_vec();
    assert_eq!(
        references_in(
            "use crate::b::X; fn f() { crate::c::g(); crate::a::h() }",
            "a",
            &modules
        ),
        vec!["b".to_owned(), "c".to_owned()]
    );
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), vec!["b".to_owned()]);
    graph.insert("b".to_owned(), vec!["c".to_owned()]);
    graph.insert("c".to_owned(), vec![]);
    assert_eq!(find_cycle(&graph), None);
    graph.insert("c".to_owned(), vec!["a".to_owned()]);
    assert_eq!(
        find_cycle(&graph),
        Some(["a", "b", "c", "a"].map(ToOwned::to_owned).to_vec())
    );
}

/// Functions of the runner's non-test code longer than `limit` lines, as
/// `file:line name (n lines)`; a function may be longer when the line
/// before it says why, in a comment starting `// Long:`.
fn long_functions(file: &str, source: &str, limit: usize) -> Vec<String> {
    let code: Vec<&str> = source
        .lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .collect();
    let mut found = Vec::new();
    for (at, line) in code.iter().enumerate() {
        let trimmed = line.trim_start();
        let signature = [
            "fn ",
            "pub fn ",
            "pub(crate) fn ",
            "async fn ",
            "pub async fn ",
            "pub(crate) async fn ",
        ]
        .iter()
        .find_map(|prefix| trimmed.strip_prefix(prefix));
        let Some(rest) = signature else { continue };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut opened, mut end) = (0_i64, false, None);
        for (offset, body_line) in code[at..].iter().enumerate() {
            if !opened && body_line.trim_end().ends_with(';') {
                break; // a declaration without a body
            }
            for c in body_line.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth == 0 {
                end = Some(offset + 1);
                break;
            }
        }
        let excused = at > 0 && code[at - 1].trim_start().starts_with("// Long:");
        if let Some(lines) = end
            && lines > limit
            && !excused
        {
            found.push(format!("{file}:{} {name} ({lines} lines)", at + 1));
        }
    }
    found
}

#[test]
fn no_runner_function_is_over_80_lines_without_a_reason() {
    let src = repo_root().join("crates/runner/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for path in files {
        if path.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).expect("read a source file");
        let shown = relative(&path);
        found.extend(long_functions(&shown, &source, 80));
    }
    assert!(
        found.is_empty(),
        "split these, or say why above them:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_length_check_counts_bodies_and_honours_a_reason() {
    let body = "    x();\n".repeat(3);
    let source = format!(
        "fn short() {{\n{body}}}\n\n// Long: one table.\nfn excused() {{\n{body}{body}}}\nfn long() {{\n{body}{body}}}\nfn declared();\n"
    );
    assert_eq!(
        long_functions("f.rs", &source, 5),
        vec!["f.rs:16 long (8 lines)".to_owned()]
    );
}

/// Where a PostgreSQL-tier test pauses without saying why: a line calling
/// `sleep`/`sleep_until` that the comment right above it does not explain
/// with `// not a wait: ...`. Tests wait for what they name
/// (`support::wait`), never for time to pass; the few pauses that are no
/// wait (user code at work, the pace of a fault schedule, a retry) say so
/// where they are.
fn unexplained_pauses(file: &str, source: &str) -> Vec<String> {
    // Whether the comment block just above the current line gives a reason.
    let mut explained = false;
    let mut found = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            explained |= trimmed.starts_with("// not a wait:");
            continue;
        }
        let code = line.split("//").next().unwrap_or_default();
        if (code.contains("sleep(") || code.contains("sleep_until(")) && !explained {
            found.push(format!("{file}:{}: {}", n + 1, line.trim()));
        }
        explained = false;
    }
    found
}

#[test]
fn tests_wait_for_what_they_name() {
    let mut files = Vec::new();
    for dir in ["tests/integration", "tests/chaos"] {
        rust_files(&repo_root().join(dir), &mut files);
    }
    assert!(files.len() > 20, "the test sources were not found");
    let mut found = Vec::new();
    for path in files {
        // This file names the words it looks for.
        if path.ends_with("integration/tidy.rs") {
            continue;
        }
        let source = std::fs::read_to_string(&path).expect("read a source file");
        let shown = relative(&path);
        found.extend(unexplained_pauses(&shown, &source));
    }
    assert!(
        found.is_empty(),
        "wait for an event, a signal or a condition (tests/integration/support/wait.rs), \
         or say on the line before why a pause is no wait (`// not a wait: ...`):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_pause_check_wants_a_reason_right_above() {
    let source = "\
tokio::time::sleep(Duration::from_millis(300)).await;
// not a wait: the step's work, which
// takes this long
tokio::time::sleep(self.work).await;
// not a wait: explains the next line only
let x = 1;
std::thread::sleep(pause);
// the sleep_ms of a script, and sleep( in a comment, are fine
let script = Script { sleep_ms: 20 };
";
    assert_eq!(
        unexplained_pauses("f.rs", source),
        vec![
            "f.rs:1: tokio::time::sleep(Duration::from_millis(300)).await;".to_owned(),
            "f.rs:7: std::thread::sleep(pause);".to_owned(),
        ]
    );
}

/// The crates that own SQL: the two PostgreSQL crates (storage and queue),
/// the renderer of their migrations, and the SQLite backend. Everything
/// else reaches a database through their APIs.
const SQL_CRATES: &[&str] = &["storage-pg", "queue-pg", "migrations-gen", "sqlite"];

/// Files outside those crates that may hold SQL, and why.
const SQL_EXEMPT: &[(&str, &str)] = &[
    (
        "crates/cli/src/fixtures.rs",
        "the demo's own application table (`fixture_executions`), written by its steps as a \
         user's step writes its own tables; not Hephaestus's schema, so no crate of ours owns it",
    ),
    (
        "xtask/src/run_tests.rs",
        "provisions the local server and the test database with psql before any crate can connect",
    ),
];

/// Calls that build or run a statement with sqlx.
const SQL_CALLS: &[&str] = &[
    "sqlx::query",
    "query_as(",
    "query_scalar(",
    "raw_sql(",
    "QueryBuilder",
];

/// The objects a `create`, `drop` or `alter` statement acts on.
const SQL_OBJECTS: &[&str] = &[
    "table ",
    "schema ",
    "index ",
    "unique index ",
    "database ",
    "function ",
    "or replace ",
    "extension ",
    "view ",
    "type ",
];
/// The string literals of `code` (plain, raw and byte strings), in order;
/// comments and character literals are skipped.
fn string_literals(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '/' if chars.get(i + 1) == Some(&'/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                    i += 1;
                }
                i += 2;
            }
            // A character literal ('"', '\'', '\n'); a lifetime has no closing quote.
            '\'' if chars.get(i + 1) == Some(&'\\') => {
                i += 3;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            }
            '\'' if chars.get(i + 2) == Some(&'\'') => i += 3,
            'r' if (chars.get(i + 1) == Some(&'"') || chars.get(i + 1) == Some(&'#'))
                && !(i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')) =>
            {
                let mut j = i + 1;
                while chars.get(j) == Some(&'#') {
                    j += 1;
                }
                if chars.get(j) != Some(&'"') {
                    i += 1;
                    continue;
                }
                let hashes = j - i - 1;
                let start = j + 1;
                let mut end = start;
                while end < chars.len()
                    && !(chars[end] == '"'
                        && (1..=hashes).all(|k| chars.get(end + k) == Some(&'#')))
                {
                    end += 1;
                }
                found.push(chars[start..end.min(chars.len())].iter().collect());
                i = end + 1 + hashes;
            }
            '"' => {
                let mut text = String::new();
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    if let Some(c) = chars.get(i) {
                        text.push(*c);
                    }
                    i += 1;
                }
                found.push(text);
                i += 1;
            }
            _ => i += 1,
        }
    }
    found
}

/// Whether a string literal's text is a SQL statement: it begins (case and
/// white space aside) with a statement keyword and, where the word alone is
/// common in prose, its partner: `select .. from`, `insert into`,
/// `update .. set`, `delete from`, `with .. as (`, `create`/`drop`/`alter`
/// followed by an object kind (`table`, `schema`, ...), `truncate`,
/// `vacuum`/`analyze` of one table, `show` of one setting (`server_version`).
fn is_sql(literal: &str) -> bool {
    let text = literal
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        + " ";
    let after = |opening: &str| text.strip_prefix(opening);
    let pair = |opening: &str, partner: &str| after(opening).is_some_and(|r| r.contains(partner));
    let object = |opening: &str| {
        after(opening).is_some_and(|r| SQL_OBJECTS.iter().any(|o| r.starts_with(o)))
    };
    let one_word = |rest: &str| rest.trim().split(' ').count() == 1;
    pair("select ", " from ")
        || pair("update ", " set ")
        || pair("with ", " as (")
        || after("insert into ").is_some()
        || after("delete from ").is_some()
        || after("truncate ").is_some()
        || object("create ")
        || object("drop ")
        || object("alter ")
        || after("vacuum analyze ")
            .or_else(|| after("vacuum "))
            .or_else(|| after("analyze "))
            .is_some_and(one_word)
        || after("show ").is_some_and(|r| one_word(r) && r.contains('_'))
}

/// What in `source` (a non-test source file shown as `file`) is SQL: sqlx
/// query calls, and string literals that begin a SQL statement.
fn sql_in(file: &str, source: &str) -> Vec<String> {
    let code = non_test_code(source);
    let mut found: Vec<String> = SQL_CALLS
        .iter()
        .filter(|call| code.contains(*call))
        .map(|call| format!("{file}: `{call}` runs SQL"))
        .collect();
    // Literals are read from the source itself: `non_test_code` cuts lines at
    // `//`, which also appears inside strings (URLs).
    let before_tests: Vec<&str> = source
        .lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .collect();
    for literal in string_literals(&before_tests.join("\n")) {
        if is_sql(&literal) {
            let first: String = literal.trim().chars().take(50).collect();
            found.push(format!("{file}: SQL in a string literal: {first:?}"));
        }
    }
    found
}

#[test]
fn sql_lives_only_in_the_database_crates() {
    let root = repo_root();
    let mut dirs = vec![root.join("xtask/src")];
    for entry in std::fs::read_dir(root.join("crates")).expect("read crates/") {
        let dir = entry.expect("a directory entry").path();
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if SQL_CRATES.contains(&name) {
            continue;
        }
        // Library and binary sources, and examples; a crate's `tests/` are tests.
        for sub in ["src", "examples"] {
            if dir.join(sub).is_dir() {
                dirs.push(dir.join(sub));
            }
        }
    }
    let mut files = Vec::new();
    for dir in &dirs {
        rust_files(dir, &mut files);
    }
    assert!(files.len() > 50, "the sources were not found: {dirs:?}");
    let mut found = Vec::new();
    for path in files {
        let shown = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // Test-only modules (declared under `#[cfg(test)]`).
        if matches!(name, "tests.rs" | "proptests.rs" | "test_support.rs")
            || SQL_EXEMPT.iter().any(|(file, _)| *file == shown)
        {
            continue;
        }
        let source = std::fs::read_to_string(&path).expect("read a source file");
        found.extend(sql_in(&shown, &source));
    }
    assert!(
        found.is_empty(),
        "SQL belongs in crates/storage-pg or crates/queue-pg (behind a documented function), \
         not here:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_sql_check_sees_queries_and_sql_literals_and_skips_prose_comments_and_tests() {
    let with_sql = r##"
fn counts(pool: &PgPool) {
    let n: i64 = sqlx::query_scalar("select count(*) from jobs").fetch_one(pool);
    let drop = format!(r#"drop schema if exists {} cascade"#, prefix);
    let url = "postgres://localhost/app"; let quote = '"';
    let update = "
        update {p}.jobs
        set state = 'available'";
    let version = query("SHOW server_version");
}
"##;
    assert_eq!(
        sql_in("f.rs", with_sql),
        vec![
            "f.rs: `sqlx::query` runs SQL".to_owned(),
            "f.rs: `query_scalar(` runs SQL".to_owned(),
            "f.rs: SQL in a string literal: \"select count(*) from jobs\"".to_owned(),
            "f.rs: SQL in a string literal: \"drop schema if exists {} cascade\"".to_owned(),
            "f.rs: SQL in a string literal: \"update {p}.jobs\\n        set state = 'available'\""
                .to_owned(),
            "f.rs: SQL in a string literal: \"SHOW server_version\"".to_owned(),
        ]
    );
    let without_sql = r#"
// select count(*) from jobs, in a comment
/// ```
/// sqlx::query("delete from jobs")
/// ```
fn messages(step: &str) {
    let a = "a rolled-back update must leave nothing";
    let b = format!("update of an instance {step}");
    let c = "select a workflow";
    let d = "create the test schema";
    let e = 'x';
    let f: &'static str = "drop the step";
    let g = "show details";
    let h = format!("{}.hephaestus_jobs", prefix.quoted());
}
#[cfg(test)]
mod tests { fn t() { sqlx::query("select 1"); } }
"#;
    assert_eq!(sql_in("g.rs", without_sql), Vec::<String>::new());
}

/// `path` as shown in a finding: relative to the workspace root.
fn relative(path: &std::path::Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}
