//! meridian-chaos as a library: the proxy mesh, fault schedules, workload and scorecard,
//! shared with the end-to-end tests.
