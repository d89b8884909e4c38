//! Pinning a process by PID and start time, and reading its `/proc` files.
//!
//! A PID alone does not name a process for long: once it exits, the kernel may hand the same
//! number to a new one. The start time (field 22 of `/proc/<pid>/stat`, in clock ticks since
//! boot) never changes for a process and differs for any later process with the same PID, so the
//! pair does name one process. `/proc/<pid>/stat` is world-readable, so pinning works for any
//! process the agent can see.
//!
//! A Workload API caller is pinned from its connection ([`ProcessPin::pin_peer`]):
//! - where the kernel has SO_PEERPIDFD (Linux 6.5+), through a pidfd of the process that called
//!   `connect()`: the start time is read, then the pidfd is asked whether that process is still
//!   alive. If it is, the PID still names it, so what was read is its own: even a caller that
//!   exited before the accept, its PID already reused, cannot lend that PID's start time.
//! - else from the PID alone, read twice around the checks, as before pidfds.
//!
//! Either way the pin keeps the uid and gid the kernel recorded at `connect()` (SO_PEERCRED), and
//! every [`ProcessPin::check`] confirms the process still runs with them, as SPIRE's peertracker
//! does: a PID reused by another user's process, or a caller that ran a setuid program after it
//! connected (the program's `/proc/<pid>/exe` would lend its `unix:path`), is refused.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt};

use super::AttestError;

/// Where procfs is mounted on a normal system.
pub const DEFAULT_PROC_ROOT: &str = "/proc";

/// Field number of the start time in `/proc/<pid>/stat` (1-based, as in proc(5)).
const START_TIME_FIELD: usize = 22;
/// Field number of the first field after the parenthesised command name (the state).
const STATE_FIELD: usize = 3;

/// How a [`ProcessPin`] was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinMethod {
    /// Through a pidfd of the connecting process (SO_PEERPIDFD): exactly the process that
    /// called `connect()`.
    Pidfd,
    /// From the PID alone (kernels without SO_PEERPIDFD, or a PID an operator gave).
    Pid,
}

/// A process pinned by pid + its start time (field 22 of `/proc/<pid>/stat`, clock ticks since
/// boot), and for a Workload API caller the credentials it connected with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPin {
    /// The process ID, in the agent's PID namespace.
    pub pid: i32,
    /// When the process started, in clock ticks since boot: tells it apart from a later process
    /// that is given the same PID.
    pub start_time: u64,
    /// The effective (uid, gid) the kernel recorded when the process connected (SO_PEERCRED);
    /// [`check`](Self::check) refuses the process once it runs with others. `None` for a pin
    /// taken from a PID alone.
    pub creds: Option<(u32, u32)>,
    /// How the pin was taken.
    pub method: PinMethod,
    proc_root: PathBuf,
}

impl ProcessPin {
    /// Pins process `pid` as it is now, reading `/proc`.
    pub fn pin(pid: i32) -> Result<Self, AttestError> {
        Self::pin_in(Path::new(DEFAULT_PROC_ROOT), pid)
    }

    /// Pins process `pid` reading procfs at `proc_root` (tests use a fake tree).
    pub fn pin_in(proc_root: &Path, pid: i32) -> Result<Self, AttestError> {
        let stat = Stat::read(proc_root, pid)?;
        if stat.is_dead() {
            return Err(AttestError::Gone { pid });
        }
        Ok(Self {
            pid,
            start_time: stat.start_time,
            creds: None,
            method: PinMethod::Pid,
            proc_root: proc_root.to_path_buf(),
        })
    }

    /// Pins the process at the other end of the Unix socket `sock`, which the kernel reported
    /// (SO_PEERCRED) as `pid` with effective ids `uid` and `gid`: through its pidfd where the
    /// kernel has SO_PEERPIDFD, else from the PID. Err(Gone) if that process has exited, its
    /// PID reused or not; Err(CredentialsChanged) if the process found there runs as another
    /// user or group.
    pub fn pin_peer(sock: &impl AsFd, pid: i32, uid: u32, gid: u32) -> Result<Self, AttestError> {
        if pid <= 0 {
            return Err(AttestError::Gone { pid });
        }
        let pidfd = peer_pidfd(sock, pid)?;
        Self::pin_connected(Path::new(DEFAULT_PROC_ROOT), pidfd, pid, (uid, gid))
    }

    /// [`pin_peer`](Self::pin_peer) once the pidfd (if any) is known; `proc_root` is procfs
    /// (tests use a fake tree).
    fn pin_connected(
        proc_root: &Path,
        pidfd: Option<OwnedFd>,
        pid: i32,
        creds: (u32, u32),
    ) -> Result<Self, AttestError> {
        let mut pin = Self::pin_in(proc_root, pid)?;
        pin.creds = Some(creds);
        match pidfd {
            Some(fd) => {
                check_creds(proc_root, pid, creds)?;
                // Still alive after the reads: the PID named the connecting process throughout,
                // so the start time and the ids read are its own.
                if exited(&fd) {
                    return Err(AttestError::Gone { pid });
                }
                pin.method = PinMethod::Pidfd;
            }
            // The ids, then the start time again: both read from the process first pinned.
            None => pin.check()?,
        }
        Ok(pin)
    }

    /// Ok if `/proc/<pid>` still exists with the same start time (and, for a pin taken from a
    /// connection, the same effective uid and gid as at `connect()`); Err otherwise: Gone, or
    /// CredentialsChanged.
    ///
    /// A zombie counts as gone: it has exited, only its exit status is left.
    pub fn check(&self) -> Result<(), AttestError> {
        // The ids first, the start time last: a start time still the same afterwards shows the
        // ids were read from the pinned process.
        if let Some(creds) = self.creds {
            check_creds(&self.proc_root, self.pid, creds)?;
        }
        let stat = Stat::read(&self.proc_root, self.pid)?;
        if stat.start_time != self.start_time || stat.is_dead() {
            return Err(AttestError::Gone { pid: self.pid });
        }
        Ok(())
    }
}

/// The pidfd of the process at the other end of `sock` (SO_PEERPIDFD), or `None` where the
/// kernel (before 6.5) or a sandbox does not offer one. Err(Gone) if that process is gone.
fn peer_pidfd(sock: &impl AsFd, pid: i32) -> Result<Option<OwnedFd>, AttestError> {
    match getsockopt(sock, sockopt::PeerPidfd) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ESRCH) => Err(AttestError::Gone { pid }),
        Err(Errno::ENOPROTOOPT) => Ok(None),
        Err(e) => {
            tracing::debug!(error = %e, pid, "SO_PEERPIDFD unavailable; pinning the caller by PID");
            Ok(None)
        }
    }
}

/// True once the process behind `pidfd` has exited (a pidfd polls readable then), or if poll
/// cannot tell.
fn exited(pidfd: &OwnedFd) -> bool {
    loop {
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

/// Ok if process `pid` runs with the effective (uid, gid) `creds`; Err(CredentialsChanged) if
/// it runs with others (Gone if it has exited).
///
/// The owner of `/proc/<pid>` is the process's effective uid and gid, as SPIRE compares; one
/// stat, so checked first. A non-dumpable process (one that changed credentials, e.g. dropped
/// privileges, or set PR_SET_DUMPABLE 0) shows root as owner instead, so a mismatch is confirmed
/// from the `Uid:`/`Gid:` lines of its status before it is refused.
pub(crate) fn check_creds(
    proc_root: &Path,
    pid: i32,
    creds: (u32, u32),
) -> Result<(), AttestError> {
    if pid <= 0 {
        return Err(AttestError::Gone { pid });
    }
    let meta = std::fs::metadata(proc_root.join(pid.to_string()))
        .map_err(|e| proc_error(pid, "directory", e))?;
    if (meta.uid(), meta.gid()) == creds {
        return Ok(());
    }
    let now = effective_ids_in(proc_root, pid)?;
    if now == creds {
        return Ok(());
    }
    Err(AttestError::CredentialsChanged {
        pid,
        uid: now.0,
        gid: now.1,
        peer_uid: creds.0,
        peer_gid: creds.1,
    })
}

/// The effective uid and gid of `pid` from `<proc_root>/<pid>/status` (what SO_PEERCRED
/// reports for a process that connects now).
pub fn effective_ids_in(proc_root: &Path, pid: i32) -> Result<(u32, u32), AttestError> {
    let status = read_proc_file(proc_root, pid, "status")?;
    parse_effective_ids(&status).ok_or_else(|| AttestError::Proc {
        pid,
        what: "status",
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            "no Uid:/Gid: lines in /proc/<pid>/status",
        ),
    })
}

/// The effective ids on the `Uid:` and `Gid:` lines of a status file.
fn parse_effective_ids(status: &[u8]) -> Option<(u32, u32)> {
    // Lossy: the Name: line holds the command name, which may be any bytes.
    let text = String::from_utf8_lossy(status);
    let field = |name: &str| -> Option<u32> {
        let line = text.lines().find_map(|l| l.strip_prefix(name))?;
        // "Uid:\treal\teffective\tsaved\tfs": the effective id is the second number.
        line.split_ascii_whitespace().nth(1)?.parse().ok()
    };
    Some((field("Uid:")?, field("Gid:")?))
}

/// The fields of `/proc/<pid>/stat` the attestor needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// Process state: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub(crate) state: char,
    /// Field 22: start time in clock ticks since boot.
    pub(crate) start_time: u64,
}

impl Stat {
    /// Reads and parses `<proc_root>/<pid>/stat`.
    fn read(proc_root: &Path, pid: i32) -> Result<Self, AttestError> {
        let bytes = read_proc_file(proc_root, pid, "stat")?;
        Self::parse(&bytes, pid).ok_or_else(|| AttestError::Proc {
            pid,
            what: "stat",
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "not a /proc/<pid>/stat line for pid {pid}: {:?}",
                    String::from_utf8_lossy(&bytes)
                ),
            ),
        })
    }

    /// Parses the text of `/proc/<pid>/stat`; None if it is not one for `pid`.
    ///
    /// The command name (field 2) is in parentheses and may itself contain spaces, parentheses
    /// and any other bytes, so the fields after it start at the LAST `)`.
    pub(crate) fn parse(bytes: &[u8], pid: i32) -> Option<Self> {
        let close = bytes.iter().rposition(|&b| b == b')')?;
        let (head, tail) = bytes.split_at(close);
        // The head is "<pid> (<comm>": checking the pid catches a file from the wrong process.
        let open = head.iter().position(|&b| b == b'(')?;
        let head_pid = std::str::from_utf8(head.get(..open)?).ok()?.trim_end();
        if head_pid.parse::<i32>().ok()? != pid {
            return None;
        }
        // After the ')' everything is ASCII numbers and a state letter.
        let tail = std::str::from_utf8(tail.get(1..)?).ok()?;
        let mut fields = tail.split_ascii_whitespace();
        let state = fields.next()?;
        let mut state_chars = state.chars();
        let state_char = state_chars.next()?;
        if state_chars.next().is_some() {
            return None;
        }
        let start_time = fields
            .nth(START_TIME_FIELD - STATE_FIELD - 1)?
            .parse::<u64>()
            .ok()?;
        Some(Self {
            state: state_char,
            start_time,
        })
    }

    /// True for a zombie (`Z`) or a dead (`X`/`x`) process: it has exited.
    fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// `<proc_root>/<pid>/<name>`.
pub(crate) fn proc_path(proc_root: &Path, pid: i32, name: &str) -> PathBuf {
    proc_root.join(pid.to_string()).join(name)
}

/// Reads `<proc_root>/<pid>/<what>` whole.
///
/// Bytes, not a String: the command name in `stat` and `status` may be any bytes.
pub(crate) fn read_proc_file(
    proc_root: &Path,
    pid: i32,
    what: &'static str,
) -> Result<Vec<u8>, AttestError> {
    // No process has a PID <= 0; SO_PEERCRED reports 0 for a peer in a PID namespace the agent
    // cannot see, and that process cannot be looked at either.
    if pid <= 0 {
        return Err(AttestError::Gone { pid });
    }
    let mut file = std::fs::File::open(proc_path(proc_root, pid, what))
        .map_err(|e| proc_error(pid, what, e))?;
    read_whole(&mut file).map_err(|e| proc_error(pid, what, e))
}

/// Reads a procfs file whole, in one `read` when it fits in a page.
///
/// procfs reports size 0, so `fs::read` would start tiny and grow through many reads. These
/// files (`stat`, `status`, `cgroup`) are generated whole on the first read and handed out as
/// far as the buffer reaches, so a read that leaves room in the buffer has returned the rest of
/// the file: the extra `read` that would only see end-of-file is skipped.
///
/// The page is read on the stack and only the bytes read are copied to the heap: these reads
/// happen on every Workload API call and stream message, and a page-sized heap buffer for each
/// (mostly empty: `stat` is ~300 bytes) leaves the allocator holes that the long-lived state of
/// open connections then fills around.
fn read_whole(file: &mut impl io::Read) -> io::Result<Vec<u8>> {
    let mut page = [0u8; PAGE];
    let n = read_once(file, &mut page)?;
    if n < PAGE {
        return Ok(page[..n].to_vec());
    }
    // More than a page (a deep cgroup file): on the heap, doubling until a read leaves room.
    let mut buf = page.to_vec();
    loop {
        let at = buf.len();
        buf.resize(at * 2, 0);
        let n = read_once(file, &mut buf[at..])?;
        if n < at {
            buf.truncate(at + n);
            return Ok(buf);
        }
    }
}

/// One `read`, repeated only when interrupted.
fn read_once(file: &mut impl io::Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// How much of a procfs file is read on the stack.
const PAGE: usize = 4096;

/// Maps an error reading `/proc/<pid>/<what>`: the process having exited shows as ENOENT (its
/// directory is gone) or ESRCH (it exited while the file was open), anything else is a real error.
pub(crate) fn proc_error(pid: i32, what: &'static str, e: io::Error) -> AttestError {
    if is_gone(&e) {
        AttestError::Gone { pid }
    } else {
        AttestError::Proc {
            pid,
            what,
            source: e,
        }
    }
}

/// True if the error means the process no longer exists.
pub(crate) fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::errno::Errno::ESRCH as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat line with every field up to 22 and a few after, as the kernel writes it.
    fn stat_line(pid: i32, comm: &str, state: char, start: u64) -> String {
        format!(
            "{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 4194560 1234 0 0 0 5 3 0 0 20 0 1 0 \
             {start} 12345678 456 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n"
        )
    }

    /// A reader that hands out at most `chunk` bytes per read, like a file larger than a page.
    struct Chunked<'a> {
        data: &'a [u8],
        chunk: usize,
        reads: usize,
    }

    impl io::Read for Chunked<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            let n = self.data.len().min(out.len()).min(self.chunk);
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn read_whole_takes_one_read_for_a_small_file_and_all_of_a_big_one() {
        let small = vec![b's'; 1500];
        let mut r = Chunked {
            data: &small,
            chunk: usize::MAX,
            reads: 0,
        };
        assert_eq!(read_whole(&mut r).unwrap(), small);
        assert_eq!(r.reads, 1, "a short read is the whole file");

        // Exactly a page, then more than a page (a deep cgroup file): read until EOF.
        for size in [4096, 10_000] {
            let big: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut r = Chunked {
                data: &big,
                chunk: 4096,
                reads: 0,
            };
            assert_eq!(read_whole(&mut r).unwrap(), big, "size {size}");
        }
    }

    #[test]
    fn reads_real_proc_files_whole() {
        let me = std::process::id() as i32;
        let root = Path::new(DEFAULT_PROC_ROOT);
        let status = read_proc_file(root, me, "status").unwrap();
        let text = String::from_utf8_lossy(&status);
        assert!(text.starts_with("Name:"), "{text}");
        assert!(text.contains("\nGroups:"), "{text}");
        assert!(text.ends_with('\n'), "ends with its last line: {text}");
    }

    #[test]
    fn parses_start_time_and_state() {
        let s = Stat::parse(stat_line(42, "sshd", 'S', 987654).as_bytes(), 42).unwrap();
        assert_eq!(
            s,
            Stat {
                state: 'S',
                start_time: 987654
            }
        );
    }

    #[test]
    fn comm_with_spaces_and_parentheses_splits_at_last_paren() {
        for comm in [
            ") (",
            "a) (b c",
            "x)",
            "(",
            "  ",
            "evil) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 99",
        ] {
            let line = stat_line(7, comm, 'R', 31337);
            let s = Stat::parse(line.as_bytes(), 7).unwrap_or_else(|| panic!("{line:?}"));
            assert_eq!(s.start_time, 31337, "{comm:?}");
            assert_eq!(s.state, 'R', "{comm:?}");
        }
    }

    #[test]
    fn comm_may_be_any_bytes() {
        let mut line = b"7 (\xff\xfe bad utf8) ".to_vec();
        line.extend_from_slice(
            stat_line(7, "x", 'S', 5)
                .split_once(") ")
                .unwrap()
                .1
                .as_bytes(),
        );
        assert_eq!(Stat::parse(&line, 7).unwrap().start_time, 5);
    }

    #[test]
    fn rejects_malformed_stat() {
        for bad in [
            "",
            "7",
            "7 (x",
            "7 (x) S 1 2 3",
            "7 (x) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 notanumber",
            "7 (x) SS 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5",
            "(x) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5",
            "x7 (x) S 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5",
        ] {
            assert_eq!(Stat::parse(bad.as_bytes(), 7), None, "{bad:?}");
        }
        // A stat of another pid is refused.
        assert_eq!(Stat::parse(stat_line(8, "x", 'S', 5).as_bytes(), 7), None);
    }

    #[test]
    fn parses_real_proc_self_stat() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let bytes = std::fs::read(format!("/proc/{pid}/stat")).unwrap();
        let s = Stat::parse(&bytes, pid).unwrap();
        assert!(s.start_time > 0);
        assert!(!s.is_dead());
    }

    fn fake_proc(pid: i32, stat: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("stat"), stat).unwrap();
        dir
    }

    #[test]
    fn pin_and_check() {
        let dir = fake_proc(100, &stat_line(100, "app", 'S', 500));
        let pin = ProcessPin::pin_in(dir.path(), 100).unwrap();
        assert_eq!((pin.pid, pin.start_time), (100, 500));
        pin.check().unwrap();

        // Same PID, another process (a later start time): gone.
        std::fs::write(dir.path().join("100/stat"), stat_line(100, "app", 'S', 501)).unwrap();
        assert!(matches!(pin.check(), Err(AttestError::Gone { pid: 100 })));

        // Exited and not yet reaped: gone.
        std::fs::write(dir.path().join("100/stat"), stat_line(100, "app", 'Z', 500)).unwrap();
        assert!(matches!(pin.check(), Err(AttestError::Gone { pid: 100 })));
        assert!(matches!(
            ProcessPin::pin_in(dir.path(), 100),
            Err(AttestError::Gone { pid: 100 })
        ));

        // Exited and reaped: gone.
        std::fs::remove_dir_all(dir.path().join("100")).unwrap();
        assert!(matches!(pin.check(), Err(AttestError::Gone { pid: 100 })));
    }

    #[test]
    fn pin_missing_or_impossible_pid_is_gone() {
        let dir = fake_proc(100, &stat_line(100, "app", 'S', 500));
        for pid in [101, 0, -1, i32::MIN] {
            let got = ProcessPin::pin_in(dir.path(), pid);
            assert!(
                matches!(got, Err(AttestError::Gone { pid: p }) if p == pid),
                "{pid}: {got:?}"
            );
        }
    }

    #[test]
    fn malformed_or_unreadable_stat_is_a_proc_error() {
        let stat_error = |proc_dir: &Path| {
            let e = ProcessPin::pin_in(proc_dir, 100).unwrap_err();
            assert!(
                matches!(
                    e,
                    AttestError::Proc {
                        pid: 100,
                        what: "stat",
                        ..
                    }
                ),
                "{e:?}"
            );
            e
        };
        let dir = fake_proc(100, "garbage");
        let e = stat_error(dir.path());
        assert!(e.to_string().contains("stat"), "{e}");

        // A directory where the file should be: EISDIR, not "gone".
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("100/stat")).unwrap();
        stat_error(dir.path());
    }

    #[test]
    fn pins_this_process_in_real_proc() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let pin = ProcessPin::pin(pid).unwrap();
        assert_eq!(pin.pid, pid);
        pin.check().unwrap();
        // A pin with a wrong start time is another process.
        let other = ProcessPin {
            start_time: pin.start_time + 1,
            ..pin.clone()
        };
        assert!(matches!(other.check(), Err(AttestError::Gone { .. })));
    }

    /// A child process, killed and reaped on drop.
    struct Child(std::process::Child);

    impl Child {
        fn pid(&self) -> i32 {
            i32::try_from(self.0.id()).unwrap()
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    const NOBODY: u32 = 65534;

    /// `python3 -c <code> <args>` as uid/gid 65534 (when `nobody`), stdout piped; returns once it
    /// printed its first line.
    fn python(code: &str, args: &[&str], nobody: bool) -> Child {
        use std::io::BufRead as _;
        use std::os::unix::process::CommandExt as _;
        let mut cmd = std::process::Command::new("python3");
        cmd.arg("-c").arg(code).args(args);
        cmd.stdin(std::process::Stdio::piped());
        cmd.stdout(std::process::Stdio::piped());
        if nobody {
            cmd.uid(NOBODY).gid(NOBODY);
        }
        let mut child = Child(cmd.spawn().expect("python3 is needed for this test"));
        let out = child.0.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        child
    }

    /// Prints "ready", then lives until its stdin closes (or a minute passes).
    const WAIT_PY: &str =
        "import sys, select\nprint('ready', flush=True)\nselect.select([sys.stdin], [], [], 60)\n";

    #[test]
    fn creds_are_compared_with_the_real_process() {
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let other = python(WAIT_PY, &[], true);
        let root = Path::new(DEFAULT_PROC_ROOT);
        check_creds(root, other.pid(), (NOBODY, NOBODY)).unwrap();
        for wrong in [me, (NOBODY, me.1), (me.0, NOBODY)] {
            if wrong == (NOBODY, NOBODY) {
                continue;
            }
            let e = check_creds(root, other.pid(), wrong).unwrap_err();
            assert!(
                matches!(
                    e,
                    AttestError::CredentialsChanged {
                        uid: NOBODY,
                        gid: NOBODY,
                        ..
                    }
                ),
                "{wrong:?}: {e:?}"
            );
            assert!(e.to_string().contains("runs as uid 65534"), "{e}");
        }

        // A PID that names a process of another user by the time it is pinned (as when the
        // caller exited and its PID was reused): refused on the PID path too.
        let e = ProcessPin::pin_connected(root, None, other.pid(), me).unwrap_err();
        assert!(matches!(e, AttestError::CredentialsChanged { .. }), "{e:?}");
        let pin = ProcessPin::pin_connected(root, None, other.pid(), (NOBODY, NOBODY)).unwrap();
        assert_eq!(pin.method, PinMethod::Pid);
        pin.check().unwrap();
        // A pin with other credentials (the process ran a setuid program since it connected).
        let changed = ProcessPin {
            creds: Some(me),
            ..pin.clone()
        };
        assert!(matches!(
            changed.check(),
            Err(AttestError::CredentialsChanged { .. })
        ));

        // Gone once it exits.
        drop(other);
        assert!(matches!(pin.check(), Err(AttestError::Gone { .. })));
    }

    #[test]
    fn a_non_dumpable_process_keeps_its_identity() {
        // PR_SET_DUMPABLE 0 (as after dropping privileges): some kernels then show
        // /proc/<pid> as root's, its status still says who it runs as.
        let code =
            format!("import ctypes\nassert ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) == 0\n{WAIT_PY}");
        let other = python(&code, &[], true);
        let root = Path::new(DEFAULT_PROC_ROOT);
        check_creds(root, other.pid(), (NOBODY, NOBODY)).unwrap();
        assert_eq!(
            effective_ids_in(root, other.pid()).unwrap(),
            (NOBODY, NOBODY)
        );

        // A /proc/<pid> owned by root while the status says 65534: the status decides.
        let dir = fake_proc(100, &stat_line(100, "app", 'S', 500));
        let me = std::fs::metadata(dir.path().join("100")).unwrap();
        std::fs::write(
            dir.path().join("100/status"),
            "Name:\tapp\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n",
        )
        .unwrap();
        check_creds(dir.path(), 100, (me.uid(), me.gid())).unwrap();
        check_creds(dir.path(), 100, (NOBODY, NOBODY)).unwrap();
        let e = check_creds(dir.path(), 100, (NOBODY, me.gid().wrapping_add(1))).unwrap_err();
        assert!(
            matches!(e, AttestError::CredentialsChanged { gid: NOBODY, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn a_caller_that_ran_a_setuid_program_is_refused() {
        use std::os::unix::process::CommandExt as _;
        // A setuid-root program started by uid 65534 (waiting for a password on its stdin):
        // its executable would lend its `unix:path`, but it no longer runs as the caller did.
        let Some(prog) = ["/usr/bin/passwd", "/bin/passwd"]
            .into_iter()
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.mode() & 0o4000 != 0 && m.uid() == 0))
        else {
            println!("no setuid-root passwd on this machine; nothing to test");
            return;
        };
        let child = Child(
            std::process::Command::new(prog)
                .uid(NOBODY)
                .gid(NOBODY)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let root = Path::new(DEFAULT_PROC_ROOT);
        // A real process on the real clock: wait for it to run as root.
        #[allow(clippy::disallowed_types)]
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while effective_ids_in(root, child.pid()).ok().map(|(u, _)| u) != Some(0) {
            #[allow(clippy::disallowed_types)]
            let now = std::time::Instant::now();
            assert!(now < deadline, "{prog} never ran as root");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let e = check_creds(root, child.pid(), (NOBODY, NOBODY)).unwrap_err();
        assert!(
            matches!(
                e,
                AttestError::CredentialsChanged {
                    uid: 0,
                    peer_uid: NOBODY,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    /// Both ends of a Unix socket connected by a python child (alive until dropped).
    fn connected_by_child() -> (std::os::unix::net::UnixStream, Child, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let code = format!("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n{WAIT_PY}");
        let child = python(&code, &[path.to_str().unwrap()], false);
        let (conn, _) = listener.accept().unwrap();
        (conn, child, dir)
    }

    #[test]
    fn the_pidfd_is_used_where_the_kernel_has_one() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let cred = nix::sys::socket::getsockopt(&a, sockopt::PeerCredentials).unwrap();
        let pidfd_available = getsockopt(&a, sockopt::PeerPidfd).is_ok();
        let pin = ProcessPin::pin_peer(&a, cred.pid(), cred.uid(), cred.gid()).unwrap();
        assert_eq!(pin.pid, std::process::id() as i32);
        assert_eq!(pin.creds, Some((cred.uid(), cred.gid())));
        let want = if pidfd_available {
            PinMethod::Pidfd
        } else {
            println!("SO_PEERPIDFD is not available on this kernel: the PID path is used");
            PinMethod::Pid
        };
        assert_eq!(pin.method, want);
        pin.check().unwrap();
    }

    #[test]
    fn the_pidfd_tells_when_the_connecting_process_is_gone() {
        let (conn, child, _dir) = connected_by_child();
        let pid = child.pid();
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let Some(pidfd) = peer_pidfd(&conn, pid).unwrap() else {
            println!("SO_PEERPIDFD is not available on this kernel; nothing to test");
            return;
        };
        // A procfs that still shows the process alive (as it would if its PID were reused by a
        // process with the same start time): the PID path believes it, the pidfd does not.
        let fake = fake_proc(pid, &stat_line(pid, "app", 'S', 500));
        ProcessPin::pin_connected(fake.path(), None, pid, me).unwrap();
        drop(child);
        let got = ProcessPin::pin_connected(fake.path(), Some(pidfd), pid, me);
        assert!(
            matches!(got, Err(AttestError::Gone { pid: p }) if p == pid),
            "{got:?}"
        );
        // Asked after the process was reaped, the kernel gives no pidfd or one of an exited
        // process: gone either way.
        let got = ProcessPin::pin_peer(&conn, pid, me.0, me.1);
        assert!(matches!(got, Err(AttestError::Gone { .. })), "{got:?}");
    }

    #[test]
    fn parses_effective_ids() {
        let status =
            b"Name:\t\xff odd\nUid:\t1000\t1001\t1002\t1003\nGid:\t2000\t2001\t2002\t2003\n";
        assert_eq!(parse_effective_ids(status), Some((1001, 2001)));
        assert_eq!(parse_effective_ids(b"Uid:\t1\t2\t3\t4\n"), None);
        assert_eq!(parse_effective_ids(b"Uid:\t1\nGid:\t1\n"), None);
    }

    #[test]
    fn esrch_and_enoent_mean_gone() {
        assert!(is_gone(&io::Error::from(io::ErrorKind::NotFound)));
        assert!(is_gone(&io::Error::from_raw_os_error(
            nix::errno::Errno::ESRCH as i32
        )));
        assert!(!is_gone(&io::Error::from_raw_os_error(
            nix::errno::Errno::EACCES as i32
        )));
    }
}
