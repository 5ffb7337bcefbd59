//! A job queue on PostgreSQL (being built: issue "queue-pg").
