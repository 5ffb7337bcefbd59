//! `hephaestus worker --metrics-addr`: `/metrics` scraped during and after a
//! run, `/healthz`, and `/readyz` following the database (the worker reaches
//! PostgreSQL through a proxy the test cuts and restores).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_queue_pg::PgQueue;
use hephaestus_runner::postgres::PgBackend;
use hephaestus_runner::{Runtime, StartOptions};
use hephaestus_storage_pg::PgStore;
use tokio::net::TcpListener;

use crate::faults::{fixtures, hephaestus_bin};
use crate::support::db::{TestSchema, database_url};
use crate::support::wait;

/// A TCP proxy to PostgreSQL that can be cut (open connections dropped, new
/// ones refused) and restored.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Bumped on every cut: the forwarding tasks open then stop.
    cuts: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let cuts = tokio::sync::watch::Sender::new(0);
        let task = tokio::spawn({
            let (up, cuts) = (Arc::clone(&up), cuts.clone());
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if !up.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    // Sees the cuts from now on only.
                    let mut cut = cuts.subscribe();
                    let target = target.clone();
                    tokio::spawn(async move {
                        let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        let (mut client, mut server) = (client, server);
                        let pump = tokio::io::copy_bidirectional(&mut client, &mut server);
                        tokio::select! {
                            _ = pump => {}
                            // A cut, or the proxy dropped.
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        Self {
            addr,
            up,
            cuts,
            task,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `database_url()` with its host and port replaced by `addr`; and the
/// original host:port.
fn through(addr: SocketAddr) -> (String, String) {
    let url = database_url();
    let at = url
        .rfind('@')
        .map_or_else(|| url.find("//").unwrap() + 2, |i| i + 1);
    let end = url[at..].find('/').map_or(url.len(), |i| at + i);
    let target = url[at..end].to_owned();
    let target = if target.contains(':') {
        target
    } else {
        format!("{target}:5432")
    };
    (format!("{}{addr}{}", &url[..at], &url[end..]), target)
}

/// One GET; the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("the metrics listener accepts");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// One GET off the async threads.
async fn scrape(addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || get(addr, &path))
        .await
        .unwrap()
}

/// Asks `path` again until it answers `status` (the worker is another
/// process: its endpoints are all it tells); returns that body.
async fn until_status(addr: SocketAddr, path: &str, status: u16) -> String {
    wait::until_some(format!("{path} to answer {status}"), || async move {
        let (got, body) = scrape(addr, path).await;
        (got == status).then_some(body)
    })
    .await
}

/// The series of `metric` (its lines, without comments).
fn series<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .collect()
}

fn value(line: &str) -> f64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A runtime with the fixture workflows that starts instances and runs
/// none (the API side of an application).
pub(super) async fn api_runtime(schema: &TestSchema) -> Runtime<PgBackend> {
    let recorder = fixtures::Recorder::new(schema.pool.clone(), &schema.prefix)
        .await
        .unwrap();
    let backend = PgBackend::new(
        PgStore::new(schema.pool.clone(), schema.prefix.clone()),
        PgQueue::new(schema.pool.clone(), schema.prefix.clone()),
    );
    let mut builder = Runtime::builder(backend)
        .discard_handler(hephaestus_failure_handler::FailureHandler::new());
    for workflow in fixtures::workflows(&recorder).unwrap() {
        builder = builder.workflow(workflow);
    }
    builder.build().unwrap()
}

/// A `hephaestus worker` process.
pub(super) struct Worker {
    child: Child,
    pub(super) addr: SocketAddr,
    /// Its stderr (logs), shown when it fails.
    log: std::path::PathBuf,
    /// Its stdout, read to the end when it stops.
    stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Worker {
    /// Starts `hephaestus worker` with a metrics listener, `extra` options
    /// and `RUST_LOG=rust_log`; returns once it is ready.
    pub(super) fn spawn(url: &str, schema: &str, extra: &[&str], rust_log: &str) -> Self {
        let log = std::env::temp_dir().join(format!("hephaestus-metrics-{schema}.log"));
        let stderr = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(hephaestus_bin())
            .args([
                "worker",
                "--schema",
                schema,
                "--database-url",
                url,
                "--metrics-addr",
                "127.0.0.1:0",
                "--depth-ms",
                "100",
                "--poll-ms",
                "50",
                "--exit-on-stdin-close",
            ])
            .args(extra)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("the worker starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("a metrics line").unwrap();
        let addr = first
            .strip_prefix("hephaestus worker metrics: http://")
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("the metrics line: {first}"))
            .parse()
            .unwrap();
        let ready = lines.next().expect("a ready line").unwrap();
        assert!(ready.starts_with("hephaestus worker ready"), "{ready}");
        Self {
            child,
            addr,
            log,
            stdout: lines,
        }
    }

    /// Stops it gracefully (stdin closed) and returns its logs.
    pub(super) fn stop(mut self) -> String {
        drop(self.child.stdin.take());
        let rest: Vec<String> = self.stdout.by_ref().map_while(Result::ok).collect();
        assert!(
            rest.iter()
                .any(|l| l.starts_with("hephaestus worker stopped")),
            "{rest:?}"
        );
        let status = self.child.wait().unwrap();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(status.success(), "{status:?}: {log}");
        let _ = std::fs::remove_file(&self.log);
        log
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_during_and_after_a_run_and_readyz_follows_the_database() {
    let schema = TestSchema::new().await;
    let unused: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let proxy = Proxy::start(through(unused).1).await;
    let (url, _) = through(proxy.addr);
    let worker = Worker::spawn(&url, schema.prefix.as_str(), &[], "warn");
    let addr = worker.addr;
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".to_owned()));
    until_status(addr, "/readyz", 200).await;
    assert_eq!(get(addr, "/nope").0, 404);

    // Instances started here (the API side); the worker runs them.
    let api = api_runtime(&schema).await;
    let slow = fixtures::Script {
        sleep_ms: 20,
        ..fixtures::Script::default()
    };
    let mut ids = Vec::new();
    for i in 0..20 {
        let started = api
            .start(
                fixtures::DIAMOND,
                &format!("m{i}"),
                slow.to_input(),
                StartOptions::default(),
            )
            .await
            .unwrap();
        ids.push(started.id);
    }
    // During the run: steps have finished, instances have not all ended.
    let during = wait::until_some("a scrape showing a finished step", || async move {
        let (status, text) = scrape(addr, "/metrics").await;
        assert_eq!(status, 200);
        (!series(&text, "hephaestus_step_stop_duration_count").is_empty()).then_some(text)
    })
    .await;
    let done_during = series(&during, "hephaestus_workflow_stop_count")
        .iter()
        .map(|l| value(l))
        .sum::<f64>();
    assert!(
        done_during < 20.0,
        "scraped during the run: {done_during} done"
    );
    // The worker process completes them; only the database tells.
    for &id in &ids {
        let api = &api;
        wait::until(format!("instance {id} to complete"), || async move {
            api.get(id).await.unwrap().unwrap().status == InstanceStatus::Completed
        })
        .await;
    }

    // After the run: every worker-side metric, with bounded labels.
    let text = until_status(addr, "/metrics", 200).await;
    let stops = series(&text, "hephaestus_workflow_stop_count");
    assert_eq!(stops.len(), 1, "{text}");
    assert!(
        stops[0].contains("workflow=\"fixture_diamond\""),
        "{}",
        stops[0]
    );
    assert!(
        (value(stops[0]) - 20.0).abs() < f64::EPSILON,
        "{}",
        stops[0]
    );
    let ends = series(&text, "hephaestus_workflow_end_count");
    assert!(
        ends.iter().any(|l| l.contains("status=\"completed\"")
            && l.contains("workflow=\"fixture_diamond\"")
            && (value(l) - 20.0).abs() < f64::EPSILON),
        "{ends:?}"
    );
    // Histograms with buckets that filled.
    for histogram in [
        "hephaestus_workflow_stop_duration",
        "hephaestus_step_stop_duration",
        "hephaestus_engine_advance_duration",
        "hephaestus_queue_job_run_seconds",
        "hephaestus_queue_job_wait_seconds",
        "hephaestus_runner_batch_size",
    ] {
        let buckets = series(&text, &format!("{histogram}_bucket"));
        assert!(!buckets.is_empty(), "{histogram} has buckets: {text}");
        assert!(
            buckets
                .iter()
                .any(|l| !l.contains("le=\"+Inf\"") && value(l) > 0.0),
            "{histogram}'s finite buckets filled: {buckets:?}"
        );
        assert!(!series(&text, &format!("{histogram}_count")).is_empty());
        assert!(!series(&text, &format!("{histogram}_sum")).is_empty());
    }
    let step_series = series(&text, "hephaestus_step_stop_duration_count");
    for step in ["Split", "Merge"] {
        assert!(
            step_series
                .iter()
                .any(|l| l.contains(&format!("step=\"{step}\""))
                    && l.contains("workflow=\"fixture_diamond\"")),
            "step {step}: {step_series:?}"
        );
    }
    let finished = series(&text, "hephaestus_queue_jobs_finished_total");
    assert!(
        finished
            .iter()
            .any(|l| l.contains("outcome=\"") && l.contains("queue=\"") && l.contains("kind=\"")),
        "{finished:?}"
    );
    let depth_text = wait::until_some("a scrape showing the queue depth", || async move {
        let text = until_status(addr, "/metrics", 200).await;
        (!series(&text, "hephaestus_queue_jobs").is_empty()).then_some(text)
    })
    .await;
    let depth = series(&depth_text, "hephaestus_queue_jobs");
    assert!(
        depth
            .iter()
            .all(|l| l.contains("queue=\"") && l.contains("state=\"")),
        "{depth:?}"
    );
    // Never an instance-level label.
    for label in ["instance_id=", "business_id=", "job_id="] {
        assert!(!text.contains(label), "{label} in {text}");
    }

    // /readyz follows the database.
    proxy.cut();
    let why = until_status(addr, "/readyz", 503).await;
    assert!(why.contains("database unreachable"), "{why}");
    assert_eq!(get(addr, "/healthz").0, 200, "the process is still up");
    proxy.restore();
    until_status(addr, "/readyz", 200).await;

    worker.stop();
    schema.teardown().await;
}

/// Every metric the Grafana dashboard queries is one docs/operations.md
/// documents (a histogram by its `_bucket`, `_sum` or `_count` series), and
/// the dashboard is valid JSON with a query per panel.
#[test]
fn the_dashboard_queries_only_documented_metrics() {
    let root = crate::support::repo_root();
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("docs/grafana-dashboard.json")).expect("valid JSON");
    let docs = read("docs/operations.md");
    let mut names = std::collections::BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{}", panels.len());
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{panel}");
        for target in targets {
            let expr = target["expr"].as_str().expect("a query");
            let mut rest = expr;
            while let Some(at) = rest.find("hephaestus_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    assert!(names.len() >= 15, "{names:?}");
    for name in names {
        let documented = |n: &str| docs.contains(&format!("`{n}`"));
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| !documented(&name) && documented(base));
        assert!(
            documented(&name) || base.is_some(),
            "{name} is queried by the dashboard but not documented in docs/operations.md"
        );
    }
}
