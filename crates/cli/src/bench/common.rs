//! What both benchmarks share: connections, the server's counters read
//! around a timed phase, ratios and percentiles.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hephaestus_migrations_gen::SchemaPrefix;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// A benchmark's own schema: `--schema` or a fresh random name, migrated,
/// checked to hold nothing yet, and dropped by [`BenchSchema::finish`]
/// unless kept.
#[derive(Debug)]
pub struct BenchSchema {
    pub options: PgConnectOptions,
    pub prefix: SchemaPrefix,
    keep: bool,
}

/// What a benchmark needs in its schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Components {
    /// The job queue only.
    Queue,
    /// Storage and queue (workflows).
    StorageAndQueue,
}

impl BenchSchema {
    pub async fn open(
        database_url: &str,
        schema: Option<&str>,
        components: Components,
        keep: bool,
    ) -> Result<Self> {
        let name = schema.map_or_else(
            || {
                let suffix = uuid::Uuid::new_v4().simple().to_string();
                format!("hephaestus_bench_{}", &suffix[..12])
            },
            ToOwned::to_owned,
        );
        let prefix = SchemaPrefix::new(&name).context("--schema")?;
        let options = PgConnectOptions::from_str(database_url)
            .context("--database-url is not a PostgreSQL URL")?;
        let admin = pool(&options, 2).await?;
        if components == Components::StorageAndQueue {
            hephaestus_storage_pg::migrate(&admin, &prefix)
                .await
                .context("migrating the benchmark schema (storage)")?;
        }
        hephaestus_queue_pg::migrate(&admin, &prefix)
            .await
            .context("migrating the benchmark schema (queue)")?;
        let (table, existing) = match components {
            Components::Queue => (
                "hephaestus_jobs",
                hephaestus_queue_pg::PgQueue::new(admin.clone(), prefix.clone())
                    .census()
                    .await?
                    .jobs,
            ),
            Components::StorageAndQueue => (
                "hephaestus_instances",
                hephaestus_storage_pg::PgStore::new(admin.clone(), prefix.clone())
                    .census()
                    .await?
                    .instances,
            ),
        };
        admin.close().await;
        if existing > 0 {
            bail!(
                "schema {} already holds {existing} rows in {table}; use a fresh --schema",
                prefix.as_str()
            );
        }
        Ok(Self {
            options,
            prefix,
            keep,
        })
    }

    /// Drops the schema unless kept.
    pub async fn finish(self) -> Result<()> {
        if self.keep {
            return Ok(());
        }
        let admin = pool(&self.options, 1).await?;
        hephaestus_queue_pg::drop_schema(&admin, &self.prefix)
            .await
            .context("dropping the benchmark schema")?;
        admin.close().await;
        Ok(())
    }
}

pub async fn pool(options: &PgConnectOptions, max: u32) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max)
        // No `select 1` round trip each time a connection is taken from the
        // pool: a broken connection fails its statement instead, and the
        // runner retries the job.
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(hephaestus_runner::postgres::tuned(options.clone()))
        .await
        .context("connecting to PostgreSQL")
}

/// The database's committed transactions, read on a fresh connection once
/// the benchmark's other connections are closed: a backend flushes its
/// statistics when it exits, shortly after its connection closes.
/// Also reads the WAL position and the checkpoint count: a checkpoint
/// during the drain makes every page's next change write a full-page image,
/// which explains much of the run-to-run spread.
pub async fn server_counters(options: &PgConnectOptions) -> Result<ServerCounters> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reader = pool(options, 1).await?;
    let counters = hephaestus_queue_pg::server_counters(&reader).await?;
    reader.close().await;
    Ok(counters)
}

/// Server-wide counters read before and after the drain.
pub use hephaestus_queue_pg::ServerCounters;

pub fn ratio(n: usize, d: f64) -> f64 {
    let n = u32::try_from(n).map_or(f64::from(u32::MAX), f64::from);
    if d > 0.0 { n / d } else { 0.0 }
}

pub fn ratio_i64(n: i64, d: usize) -> f64 {
    let n = i32::try_from(n).map_or(f64::from(i32::MAX), f64::from);
    let d = u32::try_from(d).map_or(f64::from(u32::MAX), f64::from);
    if d > 0.0 { n / d } else { 0.0 }
}

/// The quantile `per_mille`/1000 of sorted samples (nearest rank).
pub fn percentile(sorted: &[Duration], per_mille: usize) -> Option<Duration> {
    let rank = (sorted.len() * per_mille).div_ceil(1000).max(1);
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 500), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&samples, 990), Some(Duration::from_millis(99)));
        assert_eq!(
            percentile(&samples[..1], 990),
            Some(Duration::from_millis(1))
        );
        assert_eq!(percentile(&[], 500), None);
    }
}

/// CPU time read from `/proc` (Linux): this process's, and that of every
/// `postgres` process on this machine, by pid. Wall-clock throughput on a
/// shared machine moves with the neighbours' load; the CPU time a run
/// consumed per step moves much less, so the benchmarks report both.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    /// This process (user + system), in clock ticks.
    own: Option<u64>,
    /// `postgres` processes: pid -> ticks.
    postgres: std::collections::HashMap<u32, u64>,
}

/// `/proc` counts CPU time in `USER_HZ` ticks, 100 per second on Linux.
const TICKS_PER_SECOND: u64 = 100;

impl CpuSnapshot {
    /// Reads the counters now (empty where `/proc` is not readable).
    pub fn now() -> Self {
        let own = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| ticks_of(&stat).map(|(_, ticks)| ticks));
        let mut postgres = std::collections::HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                    continue;
                };
                if let Some((comm, ticks)) = ticks_of(&stat)
                    && comm == "postgres"
                {
                    postgres.insert(pid, ticks);
                }
            }
        }
        Self { own, postgres }
    }

    /// Microseconds of CPU per unit of work since `before`: this process's
    /// and the local PostgreSQL's (`None` when unreadable, or when no
    /// `postgres` process runs here: a remote server).
    pub fn per_unit_since(&self, before: &Self, units: usize) -> (Option<f64>, Option<f64>) {
        let per_unit = |ticks: u64| {
            let micros = ticks.saturating_mul(1_000_000 / TICKS_PER_SECOND);
            ratio_i64(i64::try_from(micros).unwrap_or(i64::MAX), units)
        };
        let own = self
            .own
            .zip(before.own)
            .map(|(after, before)| per_unit(after.saturating_sub(before)));
        let postgres = (!self.postgres.is_empty()).then(|| {
            // A process that started meanwhile counts from zero; one that
            // ended meanwhile (an autovacuum worker) is missing: a floor.
            per_unit(
                self.postgres
                    .iter()
                    .map(|(pid, after)| {
                        after.saturating_sub(*before.postgres.get(pid).unwrap_or(&0))
                    })
                    .sum(),
            )
        });
        (own, postgres)
    }
}

/// `(comm, utime + stime)` from a `/proc/<pid>/stat` line.
fn ticks_of(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    // After ") ": state is field 3; utime and stime are fields 14 and 15.
    let mut fields = stat.get(close + 2..)?.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((comm, utime + stime))
}

#[cfg(test)]
mod cpu_tests {
    use super::*;

    #[test]
    fn proc_stat_lines_give_the_command_and_its_ticks() {
        let line =
            "4242 (postgres) S 1 4242 4242 0 -1 4194560 900 0 0 0 37 12 0 0 20 0 1 0 100 0 0";
        assert_eq!(ticks_of(line), Some(("postgres", 49)));
        // A command name with spaces and parentheses.
        let odd = "7 (tokio (rt) w) R 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 0 0";
        assert_eq!(ticks_of(odd), Some(("tokio (rt) w", 11)));
        assert_eq!(ticks_of("garbage"), None);
    }

    #[test]
    fn cpu_per_unit_counts_new_processes_from_zero() {
        let before = CpuSnapshot {
            own: Some(100),
            postgres: [(1, 50)].into_iter().collect(),
        };
        let after = CpuSnapshot {
            own: Some(300),
            postgres: [(1, 150), (2, 100)].into_iter().collect(),
        };
        // 200 ticks = 2 s over 1,000 units: 2,000 us each; postgres 200 ticks too.
        assert_eq!(
            after.per_unit_since(&before, 1_000),
            (Some(2_000.0), Some(2_000.0))
        );
        assert_eq!(
            CpuSnapshot::default().per_unit_since(&CpuSnapshot::default(), 10),
            (None, None)
        );
    }
}
