//! Observability end to end: one OpenTelemetry trace per instance across
//! worker runtimes, restarts and retries (in-memory span exporter), and the
//! worker's `/metrics`, `/healthz` and `/readyz`.

mod logs;
mod metrics;
mod traces;
