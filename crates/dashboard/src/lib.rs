//! # hephaestus-dashboard
//!
//! A web dashboard for Hephaestus: see, search and fix workflow instances in
//! a browser. It is an axum [`Router`] you mount in your own server (or run
//! with `hephaestus dashboard`), over a [`Runtime`] with your workflows
//! registered: every read goes through storage-pg's and queue-pg's typed
//! query APIs, and every action through the runner (`Runtime::resume`,
//! `cancel`, `retry`, `start`), so the rules hold as in your application and
//! its typed errors are shown as they are.
//!
//! Pages are rendered on the server (maud); a small script and a style sheet
//! of our own are compiled into the binary and served under `assets/`:
//! nothing is fetched from elsewhere. Views: the overview (instances by
//! status and workflow, queue depth, the oldest waiting job, jobs finished
//! per minute over the last hour, recent failures), instances (filters in
//! the URL, keyset paging, search by id or business id), an instance (its
//! DAG as SVG coloured by step state, each step's details on click, the
//! context as collapsible JSON, the failure, its jobs, the history; it
//! refreshes itself while active), workflows (each version's DAG and
//! counts, start form) and jobs (by queue and state, recent errors, one
//! job's args, meta and attempts).
//!
//! Invariants:
//! - a read-only dashboard ([`DashboardConfig::read_only`]) serves no action;
//!   otherwise a token is required ([`Error::ActionsNeedToken`]), and with a
//!   token every page needs it (bearer header or signed session cookie);
//! - every POST carries a CSRF token bound to a cookie nonce;
//! - every parameter is checked by the dashboard: a bad one is a 400 page
//!   naming it, never a 500; no SQL text is built from request values;
//! - a database that cannot be reached is a 503 page; the pool reconnects by
//!   itself, so the next request after the database is back succeeds.
//!
//! ```no_run
//! # async fn example(runtime: hephaestus_runner::Runtime<hephaestus_runner::postgres::PgBackend>) -> Result<(), Box<dyn std::error::Error>> {
//! use hephaestus_dashboard::{Dashboard, DashboardConfig};
//!
//! let dashboard = Dashboard::new(
//!     runtime,
//!     DashboardConfig::default()
//!         .with_mount_path("/ops/workflows")
//!         .with_token(std::fs::read_to_string("/run/secrets/dashboard-token")?.trim()),
//! )?;
//! // Your own routes, with the dashboard under /ops/workflows.
//! let app = axum::Router::new().merge(dashboard.router());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```

mod actions;
mod auth;
mod error;
mod json;
mod page;
mod params;
mod svg;
mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use hephaestus_runner::Runtime;
use hephaestus_runner::postgres::PgBackend;

pub use error::Error;

/// How a dashboard is served. Start from [`DashboardConfig::default`] and
/// change what you need with the `with_*` methods (new settings may be
/// added without breaking you).
#[derive(Clone)]
#[non_exhaustive]
pub struct DashboardConfig {
    /// Where the router's pages live: `""` for the root, or `/a/b` (no
    /// trailing slash). Links and cookies use it.
    pub mount_path: String,
    /// Serve no action (resume, cancel, retry, start, bulk): views only.
    pub read_only: bool,
    /// The token that signs operators in (bearer header or `/login`). Needed
    /// unless `read_only`; with it, every page needs it.
    pub token: Option<String>,
    /// How often an active instance's page refreshes itself.
    pub refresh: Duration,
}

impl std::fmt::Debug for DashboardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DashboardConfig")
            .field("mount_path", &self.mount_path)
            .field("read_only", &self.read_only)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .field("refresh", &self.refresh)
            .finish()
    }
}

impl Default for DashboardConfig {
    /// At the root, with actions (so a token must be set), refreshing every
    /// two seconds.
    fn default() -> Self {
        Self {
            mount_path: String::new(),
            read_only: false,
            token: None,
            refresh: Duration::from_secs(2),
        }
    }
}

impl DashboardConfig {
    /// Sets where the router's pages live (see [`DashboardConfig::mount_path`]).
    #[must_use]
    pub fn with_mount_path(mut self, value: impl Into<String>) -> Self {
        self.mount_path = value.into();
        self
    }

    /// Sets whether the dashboard serves views only (see [`DashboardConfig::read_only`]).
    #[must_use]
    pub fn with_read_only(mut self, value: bool) -> Self {
        self.read_only = value;
        self
    }

    /// Sets the token that signs operators in (see [`DashboardConfig::token`]).
    #[must_use]
    pub fn with_token(mut self, value: impl Into<String>) -> Self {
        self.token = Some(value.into());
        self
    }

    /// Sets how often an active instance's page refreshes itself (see [`DashboardConfig::refresh`]).
    #[must_use]
    pub fn with_refresh(mut self, value: Duration) -> Self {
        self.refresh = value;
        self
    }
}

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) runtime: Runtime<PgBackend>,
    pub(crate) base: String,
    pub(crate) read_only: bool,
    pub(crate) keys: auth::Keys,
    pub(crate) refresh: Duration,
}

/// A dashboard over a runtime: build it once, then serve [`Dashboard::router`].
#[derive(Debug, Clone)]
pub struct Dashboard {
    shared: Arc<Shared>,
}

fn valid_mount_path(path: &str) -> bool {
    path.is_empty()
        || (path.starts_with('/')
            && !path.ends_with('/')
            && !path.contains("//")
            && path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
}

impl Dashboard {
    /// A dashboard over `runtime` (its backend's store and queue are read;
    /// its registered workflows are drawn, started and steered).
    pub fn new(runtime: Runtime<PgBackend>, config: DashboardConfig) -> Result<Self, Error> {
        if !valid_mount_path(&config.mount_path) {
            return Err(Error::BadMountPath(config.mount_path));
        }
        if let Some(token) = &config.token
            && (!(16..=512).contains(&token.len()) || !token.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(Error::BadToken);
        }
        if !config.read_only && config.token.is_none() {
            return Err(Error::ActionsNeedToken);
        }
        Ok(Self {
            shared: Arc::new(Shared {
                runtime,
                base: config.mount_path,
                read_only: config.read_only,
                keys: auth::Keys::new(config.token.as_deref()),
                refresh: config.refresh,
            }),
        })
    }

    /// The router: every page under the configured mount path. Merge it into
    /// your application's router, or serve it alone.
    pub fn router(&self) -> Router {
        let shared = Arc::clone(&self.shared);
        let mut routes = Router::new()
            .route("/", get(views::overview::page))
            .route("/instances", get(views::instances::page))
            .route("/instances/bulk", get(views::bulk::confirm))
            .route("/instances/{id}", get(views::instance::page))
            .route("/workflows", get(views::workflows::list))
            .route("/workflows/{id}", get(views::workflows::page))
            .route("/jobs", get(views::jobs::list))
            .route("/jobs/{id}", get(views::jobs::page))
            .route("/login", get(page::login_page).post(page::login))
            .route("/logout", post(page::logout))
            .route("/assets/app.js", get(page::script))
            .route("/assets/app.css", get(page::style));
        let actions: [(&str, axum::routing::MethodRouter<Arc<Shared>>); 5] = if shared.read_only {
            [
                ("/instances/bulk", post(actions::read_only)),
                ("/instances/{id}/resume", post(actions::read_only)),
                ("/instances/{id}/cancel", post(actions::read_only)),
                ("/instances/{id}/retry", post(actions::read_only)),
                ("/workflows/{id}/start", post(actions::read_only)),
            ]
        } else {
            [
                ("/instances/bulk", post(actions::bulk)),
                ("/instances/{id}/resume", post(actions::resume)),
                ("/instances/{id}/cancel", post(actions::cancel)),
                ("/instances/{id}/retry", post(actions::retry)),
                ("/workflows/{id}/start", post(actions::start)),
            ]
        };
        for (path, route) in actions {
            routes = routes.route(path, route);
        }
        let routes = routes
            .fallback(page::not_found)
            .method_not_allowed_fallback(page::method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&shared),
                page::guard,
            ))
            .with_state(Arc::clone(&shared));
        if shared.base.is_empty() {
            routes
        } else {
            Router::new().nest(&shared.base, routes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_default_is_the_documented_one() {
        let config = DashboardConfig::default();
        assert_eq!(config.mount_path, "");
        assert!(!config.read_only);
        assert_eq!(config.token, None);
        assert_eq!(config.refresh, Duration::from_secs(2));
    }

    #[test]
    fn config_setters_set_their_own_field() {
        let config = DashboardConfig::default()
            .with_mount_path("/ops")
            .with_read_only(true)
            .with_token("a-token-of-16-chars")
            .with_refresh(Duration::from_millis(750));
        assert_eq!(config.mount_path, "/ops");
        assert!(config.read_only);
        assert_eq!(config.token.as_deref(), Some("a-token-of-16-chars"));
        assert_eq!(config.refresh, Duration::from_millis(750));
    }
}
