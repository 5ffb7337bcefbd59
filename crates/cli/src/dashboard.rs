//! `hephaestus dashboard --listen 127.0.0.1:8080 [--schema P] [--read-only]
//! [--token-file F]`: the web dashboard (`hephaestus-dashboard`) over this
//! binary's registered workflows, until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use hephaestus_dashboard::{Dashboard, DashboardConfig};
use hephaestus_runner::RunnerConfig;

use crate::App;
use crate::database::{Database, DatabaseArgs, Needs};

/// `dashboard` options.
#[derive(Debug, Args)]
pub struct DashboardCommand {
    #[command(flatten)]
    db: DatabaseArgs,
    /// The address to listen on (loopback by default: put a reverse proxy
    /// with TLS in front to reach it from elsewhere).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Serve the views only: no resume, cancel, retry, start or bulk action.
    #[arg(long)]
    read_only: bool,
    /// A file holding the token operators sign in with (bearer header or the
    /// sign-in page). Required unless --read-only; with it, every page needs
    /// the token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve under this path (e.g. /ops/hephaestus) instead of the root.
    #[arg(long, default_value = "")]
    mount_path: String,
}

impl DashboardCommand {
    pub async fn run(self, app: &App) -> Result<()> {
        let token = match &self.token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the token file {}", path.display()))?;
                let token = text.trim().to_owned();
                if token.is_empty() {
                    bail!("the token file {} is empty", path.display());
                }
                Some(token)
            }
        };
        if !self.read_only && token.is_none() {
            bail!(
                "the dashboard's actions need a token: give --token-file FILE (a file with a long random token, e.g. `openssl rand -hex 32 > FILE`), or serve the views only with --read-only"
            );
        }
        let db = Database::open(&self.db, Needs::Both).await?;
        let runtime = app.runtime(&db, RunnerConfig::default(), false).await?;
        let mut config = DashboardConfig::default()
            .with_mount_path(self.mount_path.clone())
            .with_read_only(self.read_only);
        if let Some(token) = token {
            config = config.with_token(token);
        }
        let dashboard = Dashboard::new(runtime, config)?;
        // Before the listener and the line that says it is up, so a
        // signal sent the moment it appears stops it gracefully.
        let signals = crate::worker::Signals::install();
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.listen))?;
        let bound = listener.local_addr().context("reading the bound address")?;
        if !bound.ip().is_loopback() {
            eprintln!(
                "hephaestus: warning: the dashboard listens on {bound}, not only on this machine: serve it behind TLS"
            );
        }
        println!(
            "dashboard on http://{bound}{}/ (schema {}, {})",
            self.mount_path,
            db.schema(),
            if self.read_only {
                "read-only"
            } else {
                "actions need the token"
            }
        );
        axum::serve(listener, dashboard.router())
            .with_graceful_shutdown(signals.received())
            .await
            .context("serving the dashboard")?;
        Ok(())
    }
}
