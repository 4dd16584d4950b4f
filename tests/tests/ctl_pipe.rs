//! `meridianctl list --watch 1 | head -1`: the reader goes away after one line; the
//! ctl's next write meets a closed pipe, and it must end quietly with exit 0 (it used to
//! panic, exit 101). No cluster is needed: against an endpoint nobody listens on, every
//! refresh still prints its header line to stdout (the error goes to stderr).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meridian_tests::ctl::ctl_binary;

#[test]
fn a_closed_stdout_ends_a_watch_quietly_with_exit_0() {
    let free = meridian_tests::free_ports(1).unwrap()[0];
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(ctl_binary().unwrap())
        .args([
            "--endpoint",
            &format!("127.0.0.1:{free}"),
            "--timeout-ms",
            "200",
            "list",
            "--watch",
            "0.2",
            "--count",
            "50",
        ])
        .env_clear()
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meridianctl");
    let mut first = String::new();
    {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut first).expect("read the first line");
        // Dropping the reader closes the pipe, as `head -1` does.
    }
    assert!(first.contains("every 0.2 s"), "{first:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("meridianctl went on writing into a closed pipe for 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
