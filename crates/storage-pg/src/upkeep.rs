//! Table upkeep on demand: planner statistics and vacuum of the storage
//! tables, as autovacuum would do them later. For benchmarks and operators
//! after a burst of writes; the runner never calls them.

use hephaestus_engine_core::ports::PortError;

use crate::error::port_error;
use crate::store::PgStore;

/// The tables this crate owns, by their unqualified names.
const TABLES: [&str; 2] = ["hephaestus_instances", "hephaestus_step_results"];

impl PgStore {
    /// Refreshes the planner's statistics of the instances and step results
    /// tables (`analyze`), so that plans made from now on fit their size.
    pub async fn analyze(&self) -> Result<(), PortError> {
        for table in TABLES {
            let sql = format!("analyze {}.{table}", self.prefix().quoted());
            sqlx::raw_sql(&sql)
                .execute(self.pool())
                .await
                .map_err(port_error)?;
        }
        Ok(())
    }

    /// Vacuums the instances and step results tables and refreshes their
    /// statistics (`vacuum analyze`): dead rows and index entries left by a
    /// burst are cleaned up. Not inside a transaction (PostgreSQL refuses).
    pub async fn vacuum_analyze(&self) -> Result<(), PortError> {
        for table in TABLES {
            let sql = format!("vacuum analyze {}.{table}", self.prefix().quoted());
            sqlx::raw_sql(&sql)
                .execute(self.pool())
                .await
                .map_err(port_error)?;
        }
        Ok(())
    }
}
