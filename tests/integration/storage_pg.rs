//! storage-pg against PostgreSQL (being built).
