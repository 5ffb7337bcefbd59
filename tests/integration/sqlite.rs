//! hephaestus-sqlite: the engine-core conformance suites and the runner's
//! batched-operations suite on a SQLite file (no PostgreSQL needed), then
//! what the suites cannot see: bad input, processes, migrations.

mod bad_input;
mod cli;
mod conformance;
mod crash;
mod processes;
mod schema;
mod workers;
