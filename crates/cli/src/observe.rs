//! What a worker process shows its operators: logs (`--log-format pretty |
//! json`, filtered by `RUST_LOG`), Prometheus metrics with health checks on
//! one listener (`--metrics-addr`: `/metrics`, `/healthz`, `/readyz`), and,
//! with the `otel` feature, OpenTelemetry traces exported over OTLP as the
//! standard `OTEL_*` variables say.
//!
//! The listener speaks just enough HTTP/1.1 for a scraper and a probe: one
//! `GET` per connection, answered and closed. It needs no HTTP framework for
//! three read-only routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use hephaestus_migrations_gen::SchemaPrefix;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines on stderr, with the fields of the spans they
    /// happened in (instance id, step).
    #[default]
    Pretty,
    /// One JSON object per line on stderr: the event's fields, its span
    /// and the spans it is nested in.
    Json,
}

/// The worker's observability options, parsed from its command line (clap
/// builds them: options may be added without breaking you).
#[derive(Debug, Clone, Args)]
#[non_exhaustive]
pub struct ObserveArgs {
    /// Serve Prometheus metrics at `/metrics`, and `/healthz` and `/readyz`,
    /// on this address (for example 127.0.0.1:9464; port 0 picks a free one).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Log format on stderr; `RUST_LOG` filters (default `warn,hephaestus_queue=info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
    /// How often the leader refreshes the queue-depth gauge
    /// (`hephaestus_queue_jobs` by queue and state), in ms.
    #[arg(long, default_value_t = 15_000)]
    pub depth_ms: u64,
}

/// Keeps the log subscriber's exporters alive; flushes traces when dropped.
#[derive(Debug)]
pub struct TelemetryGuard {
    #[cfg(feature = "otel")]
    traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.traces.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("hephaestus: flushing traces failed: {e}");
        }
    }
}

/// The `RUST_LOG` filter, `info` when unset.
fn env_filter() -> Result<EnvFilter> {
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => {
            EnvFilter::try_new(&spec).with_context(|| format!("invalid RUST_LOG {spec:?}"))
        }
        _ => Ok(EnvFilter::new(crate::logging::DEFAULT_FILTER)),
    }
}

/// Installs the process's log subscriber (and, with `otel`, the trace
/// exporter) and returns what keeps it running. Fails when `RUST_LOG` is
/// not a valid filter or a subscriber is already installed.
pub fn init_logs(format: LogFormat) -> Result<TelemetryGuard> {
    use std::io::IsTerminal as _;
    use tracing_subscriber::Layer as _;
    // Colours only for a person at a terminal, not in a log file.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match format {
        LogFormat::Pretty => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    }
    .with_filter(env_filter()?);
    let registry = tracing_subscriber::registry().with(logs);
    #[cfg(feature = "otel")]
    {
        let traces = otel::provider()?;
        match &traces {
            Some(provider) => registry.with(otel::layer(provider)).try_init(),
            None => registry.try_init(),
        }
        .context("installing the log subscriber")?;
        Ok(TelemetryGuard { traces })
    }
    #[cfg(not(feature = "otel"))]
    {
        registry
            .try_init()
            .context("installing the log subscriber")?;
        Ok(TelemetryGuard {})
    }
}

/// Installs only the trace exporter (with `otel`, when the `OTEL_*`
/// variables ask for it): for `bench`, whose output is its report.
pub fn init_traces() -> Result<TelemetryGuard> {
    #[cfg(feature = "otel")]
    {
        let traces = otel::provider()?;
        if let Some(provider) = &traces {
            tracing_subscriber::registry()
                .with(otel::layer(provider))
                .try_init()
                .context("installing the trace subscriber")?;
        }
        Ok(TelemetryGuard { traces })
    }
    #[cfg(not(feature = "otel"))]
    Ok(TelemetryGuard {})
}

#[cfg(feature = "otel")]
mod otel {
    //! The OTLP trace pipeline, configured by the standard variables:
    //! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off;
    //! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
    //! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`,
    //! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` and
    //! `OTEL_TRACES_SAMPLER` are read by the SDK and the exporter (OTLP over
    //! HTTP with protobuf, `http://localhost:4318` by default).

    use anyhow::{Context as _, Result, bail};
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{LevelFilter, Targets};

    /// The tracer provider, or `None` when the variables turn traces off.
    pub(super) fn provider() -> Result<Option<SdkTracerProvider>> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_ascii_lowercase())
        };
        if var("OTEL_SDK_DISABLED").as_deref() == Some("true") {
            return Ok(None);
        }
        match var("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("" | "otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => bail!("OTEL_TRACES_EXPORTER={other} is not supported (otlp or none)"),
        }
        match var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
            None | Some("" | "http/protobuf") => {}
            Some(other) => {
                bail!("OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported (http/protobuf)")
            }
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .context("building the OTLP span exporter")?;
        let provider = SdkTracerProvider::builder()
            .with_id_generator(hephaestus_runner::observe::otel::InstanceIdGenerator::default())
            .with_batch_exporter(exporter)
            .build();
        // The runner exports each instance's root span through the global
        // provider.
        opentelemetry::global::set_tracer_provider(provider.clone());
        Ok(Some(provider))
    }

    /// The layer that turns `tracing` spans (at `INFO` and above) into
    /// OpenTelemetry spans of `provider`.
    pub(super) fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        // queue-pg's `hephaestus.job` span knows no instance: exported, it
        // would be a trace of its own per job. The runner's spans inside it
        // cover the job in the instance's trace.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("hephaestus"))
            .with_filter(
                Targets::new()
                    .with_default(LevelFilter::INFO)
                    .with_target("hephaestus_queue", LevelFilter::OFF),
            )
    }
}

/// Upper bounds of the duration histograms, in milliseconds (the runner's
/// `*.duration` metrics) and in seconds (the queue's `*_seconds`).
const MS_BUCKETS: [f64; 14] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0,
    60_000.0,
];
const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Installs the Prometheus recorder as the process's metrics recorder, every
/// histogram with buckets (so quantiles can be computed at query time).
pub fn install_recorder() -> Result<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration".to_owned()), &MS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("seconds".to_owned()), &SECONDS_BUCKETS)
        })
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("size".to_owned()), &BATCH_BUCKETS))
        .context("configuring histogram buckets")?
        .install_recorder()
        .context("installing the Prometheus recorder")
}

/// What `/readyz` checks: the database answers, the schema is migrated to
/// this build's versions, the worker runs.
#[derive(Debug, Clone)]
pub struct Readiness {
    pool: PgPool,
    prefix: SchemaPrefix,
    running: Arc<AtomicBool>,
}

impl Readiness {
    /// Readiness over `pool` and `prefix`; not running until
    /// [`Readiness::set_running`].
    pub fn new(pool: PgPool, prefix: SchemaPrefix) -> Self {
        Self {
            pool,
            prefix,
            running: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Marks the worker running (or stopping).
    pub fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::SeqCst);
    }

    /// `Ok` when ready, else why not.
    async fn check(&self) -> Result<(), String> {
        if !self.running.load(Ordering::SeqCst) {
            return Err("the worker is not running".to_owned());
        }
        let check = async {
            let mut tx = self
                .pool
                .begin()
                .await
                .map_err(|e| format!("database unreachable: {e}"))?;
            let registry = crate::migrate::registry().map_err(|e| e.to_string())?;
            for component in registry.components() {
                let at = crate::migrate::current(&mut tx, &self.prefix, component)
                    .await
                    .map_err(|e| format!("database unreachable: {e:#}"))?;
                if at != component.latest() {
                    return Err(format!(
                        "schema {} has {} at version {at}, this build needs {}",
                        self.prefix.as_str(),
                        component.name(),
                        component.latest()
                    ));
                }
            }
            let _ = tx.rollback().await;
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(2), check)
            .await
            .unwrap_or_else(|_| Err("database unreachable: no answer within 2 s".to_owned()))
    }
}

/// The running metrics listener.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The address it listens on (the port picked when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts serving `/metrics` (from `handle`), `/healthz` and `/readyz` on
/// `addr`.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    readiness: Readiness,
) -> Result<MetricsServer> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on --metrics-addr {addr}"))?;
    let addr = listener.local_addr().context("the metrics address")?;
    let task = tokio::spawn(async move {
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let handle = handle.clone();
                        let readiness = readiness.clone();
                        tokio::spawn(async move {
                            if let Err(e) = answer(stream, &handle, &readiness).await {
                                tracing::debug!(error = %e, "a metrics request failed");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a metrics connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = upkeep.tick() => handle.run_upkeep(),
            }
        }
    });
    Ok(MetricsServer { addr, task })
}

/// Reads one request head and answers it.
async fn answer(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    readiness: &Readiness,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0_u8; 512];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "slow request"))??;
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_owned()),
        ("GET", "/readyz") => match readiness.check().await {
            Ok(()) => ("200 OK", "text/plain; charset=utf-8", "ready\n".to_owned()),
            Err(why) => (
                "503 Service Unavailable",
                "text/plain; charset=utf-8",
                format!("not ready: {why}\n"),
            ),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
