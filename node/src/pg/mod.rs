//! Postgres control layer (being written).
