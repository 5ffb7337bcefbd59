//! Where the `hephaestus` binary's logs go: a `tracing` subscriber writing
//! to stderr, filtered like `RUST_LOG` (`info`, `hephaestus_queue=debug`,
//! `warn,sqlx=error`, ...). Without it every `tracing` event of the queue,
//! the runner and the reconciler (failed claims, rescues, failed passes)
//! would be thrown away.
//!
//! [`init`] takes [`LogOptions`] so that output formats and exporters can be
//! added as options without touching the commands.

use tracing_subscriber::EnvFilter;

/// The environment variable holding the filter directives.
pub const FILTER_ENV: &str = "RUST_LOG";

/// The directives used when [`FILTER_ENV`] is unset or empty: warnings and
/// errors of everything, plus the notable events of the queue and the
/// worker (leadership changes, start and stop).
pub const DEFAULT_FILTER: &str = "warn,hephaestus_queue=info";

/// How to log: [`LogOptions::default`] or [`LogOptions::from_env`], then
/// the `with_*` methods (new options may be added without breaking you).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct LogOptions {
    /// Filter directives in `RUST_LOG` syntax; `None`: [`FILTER_ENV`], else
    /// [`DEFAULT_FILTER`].
    pub filter: Option<String>,
}

impl LogOptions {
    /// The options from the environment (`RUST_LOG`).
    pub fn from_env() -> Self {
        Self {
            filter: std::env::var(FILTER_ENV)
                .ok()
                .filter(|f| !f.trim().is_empty()),
        }
    }

    /// Sets the filter directives, in `RUST_LOG` syntax (see [`LogOptions::filter`]).
    #[must_use]
    pub fn with_filter(mut self, directives: impl Into<String>) -> Self {
        self.filter = Some(directives.into());
        self
    }

    /// The filter these options describe. Invalid directives are an error
    /// naming them, not silently ignored.
    pub fn env_filter(&self) -> Result<EnvFilter, String> {
        let directives = self.filter.as_deref().unwrap_or(DEFAULT_FILTER);
        EnvFilter::builder()
            .parse(directives)
            .map_err(|e| format!("invalid {FILTER_ENV} filter {directives:?}: {e}"))
    }
}

/// Installs the process-wide subscriber: events at the filter's levels,
/// one line each, on stderr (stdout stays for the commands' output).
/// Returns an error when the filter is invalid or a subscriber is already
/// installed.
pub fn init(options: &LogOptions) -> Result<(), String> {
    let filter = options.env_filter()?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init()
        .map_err(|e| format!("cannot install the log subscriber: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A filter's directives, in any order.
    fn directives(filter: &EnvFilter) -> Vec<String> {
        let mut d: Vec<String> = filter.to_string().split(',').map(str::to_owned).collect();
        d.sort();
        d
    }

    #[test]
    fn the_default_filter_keeps_warnings_and_queue_notices() {
        let filter = LogOptions::default().env_filter().unwrap();
        assert_eq!(directives(&filter), ["hephaestus_queue=info", "warn"]);
    }

    #[test]
    fn a_given_filter_is_used_and_a_bad_one_is_refused() {
        let options = LogOptions::default().with_filter("debug,sqlx=error");
        assert_eq!(
            directives(&options.env_filter().unwrap()),
            ["debug", "sqlx=error"]
        );
        let bad = LogOptions::default().with_filter("hephaestus_queue=loud");
        let error = bad.env_filter().unwrap_err();
        assert!(error.contains("invalid RUST_LOG filter"), "{error}");
    }
}
