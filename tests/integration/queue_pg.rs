//! queue-pg against PostgreSQL (being built).
