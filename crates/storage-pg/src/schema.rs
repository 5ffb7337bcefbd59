//! The `storage` schema component: the DDL of the two tables this crate owns.
//!
//! `hephaestus_instances` holds one row per workflow instance. The id is a UUID v7 chosen
//! by the application; `business_id` is the caller's `key::value` (or
//! `key::value::<8 hex>` for uniqueness scope none) and is NOT unique: a finished
//! instance is history, and starting the same business id again creates a new row.
//! Uniqueness among ACTIVE instances is enforced atomically by the partial unique index
//! on `unique_claim`, a key the engine derives from the uniqueness scope (null for scope
//! none). `state` holds the context, step configs, runtime metadata, per-step state and
//! history as one JSON document; `revision` is bumped by the single writer.
//!
//! `hephaestus_step_results` is the inbox of the single writer: step workers, resumes,
//! timers, failures and cancels insert rows (idempotently per instance, step, activation
//! and kind) and never touch the instance row; the writer applies unprocessed rows in
//! `seq` (arrival) order and sets `processed_at`. `step_id` is `''` for instance-level
//! rows (cancel, instance failure).
//!
//! Index choices (every index costs on every write, so each one serves a named query):
//!
//! | index | query |
//! | --- | --- |
//! | `hephaestus_instances_active_claim_uidx` | uniqueness among active instances; the holder lookup after a conflict |
//! | `hephaestus_instances_business_id_idx` | an instance by business id, newest first (facade calls by business value) |
//! | `hephaestus_instances_workflow_idx` | by workflow (and version), and by workflow family prefix (`like 'p%'`, hence `text_pattern_ops`) |
//! | `hephaestus_instances_active_status_idx` | active instances by status and staleness (runner recovery, reconciler) |
//! | `hephaestus_instances_inserted_at_idx` / `_updated_at_idx` | operators' time ranges, with keyset pagination on `(time, id)` |
//! | `hephaestus_step_results_activation_uidx` | idempotent insert (a refused row gives up its slot: v2), `is_recorded`, the foreign key's cascade |
//! | `hephaestus_step_results_pending_idx` | the single writer's inbox: unprocessed rows of one instance by `seq` |
//! | `hephaestus_step_results_processed_at_idx` | pruning processed rows by age |
//!
//! There is deliberately no GIN index on `state`: the document is rewritten on every
//! advance, and a GIN index over it would make every write much more expensive.

use hephaestus_migrations_gen::{Component, Down, SchemaVersion};

const V1_UP: &[&str] = &[
    r"create table if not exists {prefix}.hephaestus_instances (
    id uuid primary key,
    business_id text not null,
    workflow_id text not null,
    workflow_version integer not null
        constraint hephaestus_instances_workflow_version_check check (workflow_version > 0),
    status text not null default 'pending'
        constraint hephaestus_instances_status_check
        check (status in ('pending', 'running', 'waiting', 'completed', 'failed', 'cancelled')),
    unique_claim text,
    state jsonb not null default '{}'::jsonb,
    failure jsonb,
    telemetry_metadata jsonb not null default '{}'::jsonb,
    revision bigint not null default 0
        constraint hephaestus_instances_revision_check check (revision >= 0),
    inserted_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
)",
    // At most one ACTIVE instance per uniqueness claim; finished instances do not count.
    r"create unique index if not exists hephaestus_instances_active_claim_uidx
    on {prefix}.hephaestus_instances (unique_claim)
    where unique_claim is not null and status in ('pending', 'running', 'waiting')",
    r"create index if not exists hephaestus_instances_business_id_idx
    on {prefix}.hephaestus_instances (business_id, id)",
    // `text_pattern_ops` serves equality and `like 'prefix%'` under any collation.
    r"create index if not exists hephaestus_instances_workflow_idx
    on {prefix}.hephaestus_instances (workflow_id text_pattern_ops, workflow_version, id)",
    r"create index if not exists hephaestus_instances_active_status_idx
    on {prefix}.hephaestus_instances (status, updated_at)
    where status in ('pending', 'running', 'waiting')",
    r"create index if not exists hephaestus_instances_inserted_at_idx
    on {prefix}.hephaestus_instances (inserted_at, id)",
    r"create index if not exists hephaestus_instances_updated_at_idx
    on {prefix}.hephaestus_instances (updated_at, id)",
    r"create table if not exists {prefix}.hephaestus_step_results (
    seq bigint generated always as identity primary key,
    instance_id uuid not null
        constraint hephaestus_step_results_instance_id_fkey
        references {prefix}.hephaestus_instances (id) on delete cascade,
    step_id text not null,
    activation integer not null
        constraint hephaestus_step_results_activation_check check (activation >= 0),
    kind text not null
        constraint hephaestus_step_results_kind_check
        check (kind in ('completed', 'async', 'resume', 'timer', 'failed', 'cancel')),
    event text,
    output jsonb,
    metadata jsonb,
    detail jsonb,
    inserted_at timestamptz not null default clock_timestamp(),
    processed_at timestamptz
)",
    // Idempotent insert: one row per (instance, step, activation, kind); `on conflict do
    // nothing` targets this index. It also serves the foreign key's cascade delete.
    r"create unique index if not exists hephaestus_step_results_activation_uidx
    on {prefix}.hephaestus_step_results (instance_id, step_id, activation, kind)",
    // The single writer's inbox: unprocessed rows of one instance in arrival order.
    r"create index if not exists hephaestus_step_results_pending_idx
    on {prefix}.hephaestus_step_results (instance_id, seq)
    where processed_at is null",
    // Pruning of processed rows by age.
    r"create index if not exists hephaestus_step_results_processed_at_idx
    on {prefix}.hephaestus_step_results (processed_at)
    where processed_at is not null",
];

const V1_DOWN: &[&str] = &[
    // Step results first: they reference instances.
    "drop table if exists {prefix}.hephaestus_step_results",
    "drop table if exists {prefix}.hephaestus_instances",
];

// Version 2: a result the single writer refuses keeps its row (with the
// reason) but gives up its slot, so a valid result for the same activation can
// still be recorded. The dedupe index gains a fifth expression that is 0 for
// every live row and the row's own `seq` for a refused one; it keeps the name
// and still leads with `instance_id` (the foreign key's cascade).
const V2_UP: &[&str] = &[
    "alter table {prefix}.hephaestus_step_results add column if not exists refusal text",
    "drop index if exists {prefix}.hephaestus_step_results_activation_uidx",
    r"create unique index if not exists hephaestus_step_results_activation_uidx
    on {prefix}.hephaestus_step_results
    (instance_id, step_id, activation, kind, (case when refusal is null then 0 else seq end))",
];

const V2_DOWN: &[&str] = &[
    // Refused rows would collide with the version 1 index: they go (they were
    // processed, and kept only for operators).
    "delete from {prefix}.hephaestus_step_results where refusal is not null",
    "drop index if exists {prefix}.hephaestus_step_results_activation_uidx",
    r"create unique index if not exists hephaestus_step_results_activation_uidx
    on {prefix}.hephaestus_step_results (instance_id, step_id, activation, kind)",
    "alter table {prefix}.hephaestus_step_results drop column if exists refusal",
];

static VERSIONS: [SchemaVersion; 2] = [
    SchemaVersion {
        number: 1,
        sqlx_version: 20_261_126_000_001,
        description: "workflow instances and step results",
        up: V1_UP,
        down: Down::Statements(V1_DOWN),
    },
    SchemaVersion {
        number: 2,
        sqlx_version: 20_261_205_000_001,
        description: "refused step results give up their slot",
        up: V2_UP,
        down: Down::Statements(V2_DOWN),
    },
];

/// The component's name, the key of its row in `hephaestus_schema_versions`.
pub const COMPONENT: &str = "storage";

/// The `storage` component (instances and step results), for the migrations registry
/// and for [`crate::migrate`].
pub fn schema() -> Component {
    // Cannot fail: the definition above is checked by the unit tests below.
    Component::new(COMPONENT, &VERSIONS).expect("the storage component is valid")
}

#[cfg(test)]
mod tests {
    use hephaestus_migrations_gen::{SchemaPrefix, render_down, render_up};

    use super::*;

    #[test]
    fn the_definition_is_valid() {
        let storage = schema();
        assert_eq!(storage.name(), "storage");
        assert_eq!(storage.latest(), 2);
    }

    #[test]
    fn instances_are_created_before_step_results_and_dropped_after() {
        let up = render_up(&schema(), &SchemaPrefix::default(), 0, 1)
            .unwrap()
            .to_sql();
        let instances = up
            .find("create table if not exists \"public\".hephaestus_instances")
            .unwrap();
        let results = up
            .find("create table if not exists \"public\".hephaestus_step_results")
            .unwrap();
        assert!(instances < results);
        let down = render_down(&schema(), &SchemaPrefix::default(), 1, 0)
            .unwrap()
            .to_sql();
        let results = down
            .find("drop table if exists \"public\".hephaestus_step_results")
            .unwrap();
        let instances = down
            .find("drop table if exists \"public\".hephaestus_instances")
            .unwrap();
        assert!(results < instances);
    }

    #[test]
    fn sql_is_lower_case_outside_comments() {
        for statement in V1_UP.iter().chain(V1_DOWN).chain(V2_UP).chain(V2_DOWN) {
            for line in statement.lines() {
                let code = line.split("--").next().unwrap_or_default();
                assert!(
                    !code.chars().any(|c| c.is_ascii_uppercase()),
                    "upper case in: {line}"
                );
            }
        }
    }

    #[test]
    fn every_table_reference_uses_the_prefix() {
        let sql = render_up(&schema(), &SchemaPrefix::new("tenant_a").unwrap(), 0, 1)
            .unwrap()
            .to_sql();
        for keyword in [" on ", " references ", " table if not exists "] {
            for (at, _) in sql.match_indices(keyword) {
                let rest = &sql[at + keyword.len()..];
                if rest.starts_with("conflict") || rest.starts_with("delete") {
                    continue;
                }
                assert!(rest.starts_with("\"tenant_a\"."), "{}", &rest[..40]);
            }
        }
    }
}
