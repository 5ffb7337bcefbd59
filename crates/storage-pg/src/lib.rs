//! PostgreSQL storage for Hephaestus (being built: issue "storage-pg").
