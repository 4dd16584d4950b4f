//! meridian-chaos as a library: the proxy mesh, fault schedules, workload and scorecard,
//! shared with the end-to-end tests.

pub mod archive;
pub mod check;
pub mod cluster;
pub mod idle_bench;
pub mod mesh;
pub mod netns;
pub mod pg_cluster;
pub mod ports;
pub mod proxy;
pub mod runner;
pub mod schedule;
pub mod scorecard;
pub mod seeded;
pub mod wait;
pub mod workload;
