//! Shared fixtures for Meridian's end-to-end tests: real Postgres clusters (and later
//! real agents) on 127.0.0.1, cleaned up by PID even when a test panics.
