//! The `sqlite` schema component: the DDL of the three tables of a SQLite
//! database, rendered by `hephaestus-migrations-gen` in its SQLite dialect
//! (`cargo xtask gen-migration` writes it into `migrations/sqlite/`).
//!
//! The tables mirror PostgreSQL's (crates `hephaestus-storage-pg` and
//! `hephaestus-queue-pg`), with SQLite's types:
//!
//! - ids (UUIDs) are lower-case hyphenated text, so they sort like the
//!   UUIDs (v7 ids: by creation time) and read well in the `sqlite3` shell;
//! - times are integers: microseconds since the Unix epoch (UTC), the
//!   precision PostgreSQL keeps; every one is bound from the backend's clock,
//!   never SQLite's own;
//! - JSON documents are text; tags are a JSON array;
//! - `strict` tables, so a value of the wrong type is refused, not converted.
//!
//! | index | query |
//! | --- | --- |
//! | `hephaestus_instances_active_claim_uidx` | uniqueness of a business id among ACTIVE instances (partial unique index) |
//! | `hephaestus_instances_business_id_idx` | an instance by business id, newest first |
//! | `hephaestus_instances_workflow_idx` | by workflow (and version) |
//! | `hephaestus_instances_active_status_idx` | active instances (reconciler, operators) |
//! | `hephaestus_step_results_activation_uidx` | idempotent record per (instance, step, activation, kind); a refused row gives up its slot |
//! | `hephaestus_step_results_pending_idx` | the single writer's inbox: unprocessed rows by `seq` |
//! | `hephaestus_step_results_processed_at_idx` | pruning processed rows |
//! | `hephaestus_jobs_fetch_idx` | the claim: waiting jobs of a queue by priority, due time, id |
//! | `hephaestus_jobs_unique_idx` | unique jobs: one job per key among the states the key is unique in |
//! | `hephaestus_jobs_rescue_idx` | executing jobs by heartbeat (rescue) |
//! | `hephaestus_jobs_prune_idx` | finished jobs by end time (pruning) |
//! | `hephaestus_jobs_group_idx` | the unfinished jobs of a group (an instance's jobs, cancelled together) |

use hephaestus_migrations_gen::{Component, Dialect, Down, SchemaVersion};

/// The component name recorded in `hephaestus_schema_versions`.
pub const COMPONENT: &str = "sqlite";

const V1_UP: &[&str] = &[
    r"create table if not exists hephaestus_instances (
    id text primary key,
    business_id text not null,
    workflow_id text not null,
    workflow_version integer not null check (workflow_version > 0),
    status text not null
        check (status in ('pending', 'running', 'waiting', 'completed', 'failed', 'cancelled')),
    unique_claim text,
    state text not null,
    failure text,
    telemetry_metadata text not null default '{}',
    revision integer not null default 0 check (revision >= 0),
    lock_version integer not null default 0,
    inserted_at integer not null,
    updated_at integer not null
) strict",
    // At most one ACTIVE instance per uniqueness claim; finished instances do not count.
    r"create unique index if not exists hephaestus_instances_active_claim_uidx
    on hephaestus_instances (unique_claim)
    where unique_claim is not null and status in ('pending', 'running', 'waiting')",
    r"create index if not exists hephaestus_instances_business_id_idx
    on hephaestus_instances (business_id, id)",
    r"create index if not exists hephaestus_instances_workflow_idx
    on hephaestus_instances (workflow_id, workflow_version, id)",
    r"create index if not exists hephaestus_instances_active_status_idx
    on hephaestus_instances (status, id)
    where status in ('pending', 'running', 'waiting')",
    r"create index if not exists hephaestus_instances_finished_idx
    on hephaestus_instances (updated_at)
    where status in ('completed', 'failed', 'cancelled')",
    r"create table if not exists hephaestus_step_results (
    seq integer primary key autoincrement,
    instance_id text not null references hephaestus_instances (id) on delete cascade,
    step_id text not null,
    activation integer not null check (activation >= 0),
    kind text not null
        check (kind in ('completed', 'async', 'resume', 'timer', 'failed', 'cancel')),
    event text,
    output text,
    metadata text,
    detail text,
    inserted_at integer not null,
    processed_at integer,
    refusal text
) strict",
    // A refused row gives up its slot: it is keyed by its own seq.
    r"create unique index if not exists hephaestus_step_results_activation_uidx
    on hephaestus_step_results
    (instance_id, step_id, activation, kind, (case when refusal is null then 0 else seq end))",
    r"create index if not exists hephaestus_step_results_pending_idx
    on hephaestus_step_results (instance_id, seq)
    where processed_at is null",
    r"create index if not exists hephaestus_step_results_processed_at_idx
    on hephaestus_step_results (processed_at)
    where processed_at is not null",
    r"create table if not exists hephaestus_jobs (
    id integer primary key autoincrement,
    state text not null default 'available'
        check (state in ('available', 'scheduled', 'executing', 'retryable', 'completed', 'discarded', 'cancelled')),
    queue text not null check (length(queue) between 1 and 128),
    kind text not null check (length(kind) between 1 and 255),
    args text not null default '{}',
    meta text not null default '{}',
    tags text not null default '[]',
    priority integer not null default 0,
    attempt integer not null default 0 check (attempt >= 0),
    max_attempts integer not null default 20 check (max_attempts > 0),
    errors text not null default '[]',
    inserted_at integer not null,
    scheduled_at integer not null,
    attempted_at integer,
    attempted_by text,
    heartbeat_at integer,
    completed_at integer,
    discarded_at integer,
    cancelled_at integer,
    unique_key text,
    unique_states integer not null default 0,
    group_key text
) strict",
    r"create index if not exists hephaestus_jobs_fetch_idx
    on hephaestus_jobs (queue, priority, scheduled_at, id)
    where state in ('available', 'scheduled', 'retryable')",
    // The bit of each state in `unique_states`: available 1, scheduled 2,
    // executing 4, retryable 8, completed 16, discarded 32, cancelled 64.
    r"create unique index if not exists hephaestus_jobs_unique_idx
    on hephaestus_jobs (unique_key)
    where unique_key is not null and (unique_states & (case state
        when 'available' then 1
        when 'scheduled' then 2
        when 'executing' then 4
        when 'retryable' then 8
        when 'completed' then 16
        when 'discarded' then 32
        when 'cancelled' then 64
        else 0 end)) <> 0",
    r"create index if not exists hephaestus_jobs_rescue_idx
    on hephaestus_jobs (heartbeat_at)
    where heartbeat_at is not null",
    r"create index if not exists hephaestus_jobs_prune_idx
    on hephaestus_jobs ((coalesce(completed_at, discarded_at, cancelled_at)))
    where state in ('completed', 'discarded', 'cancelled')",
    r"create index if not exists hephaestus_jobs_group_idx
    on hephaestus_jobs (group_key)
    where group_key is not null and state in ('available', 'scheduled', 'executing', 'retryable')",
];

const V1_DOWN: &[&str] = &[
    "drop table if exists hephaestus_jobs",
    "drop table if exists hephaestus_step_results",
    "drop table if exists hephaestus_instances",
];

static VERSIONS: [SchemaVersion; 1] = [SchemaVersion {
    number: 1,
    sqlx_version: 20_261_205_200_001,
    description: "instances, step results and jobs in one SQLite file",
    up: V1_UP,
    down: Down::Statements(V1_DOWN),
}];

/// The `sqlite` component: every table of a SQLite database, in SQLite's
/// dialect.
pub fn schema() -> Component {
    // Cannot fail: the definition is static and checked by this crate's tests.
    Component::with_dialect(COMPONENT, Dialect::Sqlite, &VERSIONS)
        .expect("the sqlite component is well-formed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_component_is_well_formed() {
        let component = schema();
        assert_eq!(component.name(), COMPONENT);
        assert_eq!(component.dialect(), Dialect::Sqlite);
        assert_eq!(component.latest(), 1);
    }
}
