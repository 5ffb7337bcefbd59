//! `hephaestus instances list`: instances newest first, filtered in SQL
//! (storage-pg's typed [`InstanceQuery`]), one page at a time. The cursor of
//! the next page is the id of the page's last instance (`--after ID`):
//! keyset paging, stable while instances are added.

use anyhow::{Context as _, Result, anyhow};
use chrono::{DateTime, Utc};
use clap::Args;
use hephaestus_engine_core::business_id::BusinessId;
use hephaestus_engine_core::ids::WorkflowId;
use hephaestus_engine_core::{Instance, InstanceStatus};
use hephaestus_storage_pg::{Cursor, InstanceQuery, TimeRange};
use serde_json::{Value, json};
use uuid::Uuid;

use super::time;
use crate::database::{Database, DatabaseArgs, Needs};

/// `instances list` options.
#[derive(Debug, Args)]
pub struct ListCommand {
    #[command(flatten)]
    db: DatabaseArgs,
    /// Only instances of this workflow (its id, e.g. `orders::Checkout`).
    #[arg(long, value_parser = parse_workflow)]
    workflow: Option<WorkflowId>,
    /// Only instances in these statuses (repeat the flag or separate with
    /// commas): pending, running, waiting, completed, failed, cancelled.
    #[arg(long, value_delimiter = ',', value_parser = parse_status)]
    status: Vec<InstanceStatus>,
    /// Only instances with this business id (`key::value`).
    #[arg(long, value_parser = parse_business_id)]
    business_id: Option<BusinessId>,
    /// Only instances created at or after this time (RFC 3339, e.g.
    /// 2026-01-31T09:00:00Z).
    #[arg(long, value_parser = parse_time)]
    since: Option<DateTime<Utc>>,
    /// Only instances created before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    until: Option<DateTime<Utc>>,
    /// At most this many instances (1 to 10000).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
    /// Continue after this cursor: the `next` id printed by the previous
    /// page.
    #[arg(long, value_parser = parse_cursor)]
    after: Option<Uuid>,
    /// Print JSON: `{"instances": [...], "next": ID or null}`.
    #[arg(long)]
    json: bool,
}

fn parse_workflow(s: &str) -> Result<WorkflowId, String> {
    WorkflowId::new(s).map_err(|e| e.to_string())
}

fn parse_status(s: &str) -> Result<InstanceStatus, String> {
    s.trim().parse::<InstanceStatus>().map_err(|e| {
        let names: Vec<&str> = InstanceStatus::ALL.iter().map(|s| s.as_str()).collect();
        format!("{e}; one of {}", names.join(", "))
    })
}

fn parse_business_id(s: &str) -> Result<BusinessId, String> {
    BusinessId::parse(s).map_err(|e| format!("{e} (a business id is key::value)"))
}

/// An RFC 3339 time.
pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e}; expected RFC 3339, e.g. 2026-01-31T09:00:00Z"))
}

fn parse_cursor(s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s).map_err(|e| {
        format!("{e}; a cursor is the instance id printed as `next` by the previous page")
    })
}

/// The one-line view of an instance (text row and JSON object).
pub(crate) fn summary(instance: &Instance) -> Value {
    json!({
        "id": instance.id,
        "business_id": instance.business_id.as_str(),
        "workflow": instance.workflow_id.as_str(),
        "version": instance.workflow_version,
        "status": instance.status.as_str(),
        "created_at": time(instance.created_at),
        "updated_at": time(instance.updated_at),
        "failed_step": instance.failure.as_ref().and_then(|f| f.step.as_ref()).map(ToString::to_string),
    })
}

impl ListCommand {
    pub async fn run(self) -> Result<()> {
        if let (Some(since), Some(until)) = (self.since, self.until)
            && since >= until
        {
            anyhow::bail!(
                "--since {} is not before --until {}",
                time(since),
                time(until)
            );
        }
        let (instances, undecodable, next) =
            if hephaestus_sqlite::SqliteOptions::is_sqlite_url(&self.db.database_url) {
                self.page_sqlite().await?
            } else {
                self.page_postgres().await?
            };
        for (id, error) in &undecodable {
            eprintln!(
                "hephaestus: warning: instance {id} cannot be decoded and is not listed: {error} (`hephaestus instances show {id}` shows what can be read; `hephaestus instances cancel {id}` cancels it)"
            );
        }
        if self.json {
            let instances: Vec<Value> = instances.iter().map(summary).collect();
            let undecodable: Vec<Value> = undecodable
                .iter()
                .map(|(id, error)| json!({"id": id, "error": error}))
                .collect();
            println!(
                "{}",
                json!({"instances": instances, "undecodable": undecodable, "next": next})
            );
            return Ok(());
        }
        if instances.is_empty() {
            println!("no instances match");
            return Ok(());
        }
        print!("{}", table(&instances));
        match next {
            Some(next) => println!("{} shown; next page: --after {next}", instances.len()),
            None => println!("{} shown; no more", instances.len()),
        }
        Ok(())
    }
}

/// One page: the instances, the rows that cannot be decoded (id, error),
/// and the cursor of the next page.
type Listed = (Vec<Instance>, Vec<(String, String)>, Option<Uuid>);

impl ListCommand {
    async fn page_postgres(&self) -> Result<Listed> {
        let db = Database::open(&self.db, Needs::Both).await?;
        let store = db.store();
        let after = match self.after {
            None => None,
            Some(id) => {
                // Read without decoding: a cursor may be an instance whose
                // state cannot be decoded.
                store
                        .get_raw_using(store.pool(), id, 0)
                        .await
                        .context("reading the cursor's instance")?
                        .ok_or_else(|| {
                            anyhow!(
                                "--after {id}: no such instance in schema {} (a cursor is the instance id printed as `next` by the previous page)",
                                db.schema()
                            )
                        })?;
                Some(Cursor::after_id(id))
            }
        };
        // The optional filters are set as given (`None`: not filtered).
        let mut query = InstanceQuery::default()
            .with_statuses(self.status.iter().copied())
            .with_inserted(TimeRange {
                from: self.since,
                until: self.until,
            })
            .with_limit(self.limit);
        query.business_id.clone_from(&self.business_id);
        query.workflow_id.clone_from(&self.workflow);
        query.after = after;
        let page = store.query(&query).await.context("listing instances")?;
        let next = page.next.as_ref().map(Cursor::id);
        let undecodable = page
            .undecodable
            .into_iter()
            .map(|bad| (bad.id.to_string(), bad.error))
            .collect();
        Ok((page.instances, undecodable, next))
    }

    /// A page of a SQLite file (one row more than asked tells whether a
    /// next page exists).
    async fn page_sqlite(&self) -> Result<Listed> {
        let backend = crate::database::open_sqlite(&self.db.database_url).await?;
        // The optional filters are set as given (`None`: not filtered).
        let mut filter = hephaestus_engine_core::ports::InstanceFilter::default()
            .with_statuses(self.status.iter().copied())
            .with_limit(self.limit.saturating_add(1));
        filter.business_id.clone_from(&self.business_id);
        filter.workflow_id.clone_from(&self.workflow);
        filter.before_id = self.after;
        let (mut instances, undecodable) = backend
            .instances(&filter, self.since, self.until)
            .await
            .context("listing instances")?;
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        let next = if instances.len() > limit {
            instances.truncate(limit);
            instances.last().map(|i| i.id)
        } else {
            None
        };
        backend.close().await;
        Ok((instances, undecodable, next))
    }
}

/// The text table: id, status, workflow and version, business id, created.
fn table(instances: &[Instance]) -> String {
    use std::fmt::Write as _;

    let rows: Vec<[String; 5]> = instances
        .iter()
        .map(|i| {
            [
                i.id.to_string(),
                i.status.to_string(),
                format!("{} v{}", i.workflow_id, i.workflow_version),
                i.business_id.to_string(),
                time(i.created_at),
            ]
        })
        .collect();
    let header = ["ID", "STATUS", "WORKFLOW", "BUSINESS ID", "CREATED"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ");
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header);
    for row in &rows {
        out.push_str(&line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
    }
    out
}
