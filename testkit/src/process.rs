//! Processes, directories, ports and polling for tests that run real programs.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant, SystemTime};

/// The command that builds the workspace binaries the way the test run was built: with the
/// test (or bench) targets selected, cargo resolves the dev-dependencies' features too, so the
/// dependencies the test run compiled are reused rather than compiled a second time.
fn build_command(release: bool) -> &'static str {
    if release {
        "cargo build --release --workspace --bins --benches"
    } else {
        "cargo build --workspace --bins --tests"
    }
}

/// Path of a workspace binary (`sigil-server`, `sigil-agent`) of this build's profile.
///
/// The binaries belong to other packages than the tests, so cargo does not build them for a
/// `cargo test` (`CARGO_BIN_EXE_*` exists only within one package): they must be built first
/// (`.ci/run` does). Fails the test, naming the command, when the binary is missing or older
/// than one of its sources (cargo's dep-info file beside it lists them), so a test never runs a
/// stale binary.
pub fn binary(name: &str) -> PathBuf {
    // Tests and benches run from target/<profile>/deps/<executable>.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let path = dir.join(name);
    let build = build_command(dir.ends_with("release"));
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{} is missing ({e}): the end-to-end tests run the workspace binaries; build them \
                 first with `{build}` (.ci/run does)",
                path.display()
            )
        });
    if let Some(source) = newer_source(&path.with_extension("d"), built) {
        panic!(
            "{} is older than its source {}: rebuild it with `{build}` before running the tests",
            path.display(),
            source.display()
        );
    }
    path
}

/// The first source listed in the dep-info file `dep_info` (`target: source source ...`, spaces
/// in paths escaped) modified after `built`; sources that no longer exist are skipped.
fn newer_source(dep_info: &Path, built: SystemTime) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dep_info).ok()?;
    let (_, sources) = text.lines().next()?.split_once(": ")?;
    let escaped = sources.replace("\\ ", "\u{0}");
    escaped
        .split_whitespace()
        .map(|s| PathBuf::from(s.replace('\u{0}', " ")))
        .find(|p| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built)
        })
}

/// A temp dir for one test, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sigil-e2e-")
        .tempdir()
        .expect("creating temp dir")
}

/// `<root>/<name>`, created.
pub fn subdir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("creating dir");
    d
}

/// A free loopback TCP port (bound then released; fine for tests on one machine), chosen below
/// the kernel's ephemeral range: a server restarted on the same port would otherwise find it
/// taken by some test's outgoing connection, which the kernel may give any ephemeral port.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 10_000;
    if ephemeral_low > LOWEST + 1_000 {
        let span = u64::from(ephemeral_low - LOWEST);
        for attempt in 0..1_000u64 {
            // RandomState is seeded per instance: random enough to keep parallel tests apart.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(attempt);
            h.write_u32(std::process::id());
            let port = LOWEST + (h.finish() % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port")
}

/// Polls `f` every 100 ms until it returns `Some` (fails the test with `what` after `secs`).
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops a child for good (from a `Drop`): SIGTERM, up to `grace` to exit, then SIGKILL; reaped.
pub fn terminate(child: &mut Child, grace: Duration) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The whole HTTP/1.1 answer (status line, headers, body) to `GET path` on `address`
/// (`host:port`): enough for the health and metrics endpoints.
pub fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address)
        .unwrap_or_else(|e| panic!("connecting to {address}: {e}"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("writing the request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("reading the answer");
    out
}

/// A `/proc/<pid>/status` figure in KiB (`key` as in the file, e.g. `"VmRSS:"`); 0 if the
/// process or the line is gone.
pub fn proc_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Nearest-rank percentile `p` (0–100) of `v`, which must not be empty.
pub fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let idx = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[idx.saturating_sub(1).min(s.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_newer_than_the_binary_is_found_in_the_dep_info() {
        let dir = tempdir();
        let old = dir.path().join("old.rs");
        let spaced = dir.path().join("with space.rs");
        std::fs::write(&old, "").expect("old source");
        std::fs::write(&spaced, "").expect("spaced source");
        let dep_info = dir.path().join("bin.d");
        let escaped = spaced.display().to_string().replace(' ', "\\ ");
        std::fs::write(
            &dep_info,
            format!("/t/bin: {} {escaped} /gone.rs\n", old.display()),
        )
        .expect("dep-info");
        let now = SystemTime::now();
        let before = now - Duration::from_secs(3600);
        let after = now + Duration::from_secs(3600);
        assert_eq!(newer_source(&dep_info, after), None);
        assert_eq!(newer_source(&dep_info, before), Some(old));
        std::fs::File::options()
            .write(true)
            .open(&spaced)
            .and_then(|f| f.set_modified(after + Duration::from_secs(1)))
            .expect("touching");
        assert_eq!(newer_source(&dep_info, after), Some(spaced));
    }
}
