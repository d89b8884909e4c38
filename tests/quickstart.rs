//! README's first command, `deploy/local/quickstart.sh`, end to end: server, agent, a registered
//! workload fetching its SVID through the Workload API. The binaries are the ones this test run
//! built (`SIGIL_BIN_DIR`), so CI does not compile the dependencies a second time with the
//! binaries' own feature set; the script's build line is checked on its own.

use std::path::PathBuf;
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/local/quickstart.sh")
}

#[test]
fn quickstart_once_fetches_an_svid() {
    let bin_dir = sigil_testkit::binary("sigil-server")
        .parent()
        .expect("binary directory")
        .to_path_buf();
    sigil_testkit::binary("sigil-agent");
    let tmp = sigil_testkit::tempdir();
    let out = Command::new("bash")
        .arg(script())
        .arg("--once")
        .env("SIGIL_BIN_DIR", &bin_dir)
        .env("TMPDIR", tmp.path())
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .expect("running deploy/local/quickstart.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quickstart failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("spiffe://example.org/quickstart"),
        "no SVID ID in the output:\n{stdout}"
    );
    // The files it says it wrote are there, the key private.
    let work = std::fs::read_dir(tmp.path())
        .expect("temp dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("sigil-quickstart-"))
        })
        .expect("the quickstart's work directory");
    for f in ["svid.pem", "svid.key", "bundle.pem"] {
        assert!(work.join("svid").join(f).is_file(), "{f} not written");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(work.join("svid/svid.key"))
        .expect("svid.key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "svid.key mode {mode:o}");
}

/// The root package is the shared library: `cargo build --bins` there builds no binary at all.
/// The script must name the packages that have them.
#[test]
fn quickstart_builds_the_binary_packages() {
    let text = std::fs::read_to_string(script()).expect("quickstart.sh");
    let build = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cargo build"))
        .expect("a cargo build line");
    assert!(
        build.contains("--workspace")
            || (build.contains("-p sigil-server") && build.contains("-p sigil-agent")),
        "quickstart's build line builds no binary: {build}"
    );
}
