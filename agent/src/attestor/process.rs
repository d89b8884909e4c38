//! Pinning a process by PID and start time, and reading its `/proc` files.
//!
//! A PID alone does not name a process for long: once it exits, the kernel may hand the same
//! number to a new one. The start time (field 22 of `/proc/<pid>/stat`, in clock ticks since
//! boot) never changes for a process and differs for any later process with the same PID, so the
//! pair does name one process. `/proc/<pid>/stat` is world-readable, so pinning works for any
//! process the agent can see.

use std::io;
use std::path::{Path, PathBuf};

use super::AttestError;

/// Where procfs is mounted on a normal system.
pub const DEFAULT_PROC_ROOT: &str = "/proc";

/// Field number of the start time in `/proc/<pid>/stat` (1-based, as in proc(5)).
const START_TIME_FIELD: usize = 22;
/// Field number of the first field after the parenthesised command name (the state).
const STATE_FIELD: usize = 3;

/// A process pinned by pid + its start time (field 22 of `/proc/<pid>/stat`, clock ticks since
/// boot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessPin {
    /// The process ID, in the agent's PID namespace.
    pub pid: i32,
    /// When the process started, in clock ticks since boot: tells it apart from a later process
    /// that is given the same PID.
    pub start_time: u64,
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
            proc_root: proc_root.to_path_buf(),
        })
    }

    /// Ok if `/proc/<pid>` still exists with the same start time; Err(Gone) otherwise.
    ///
    /// A zombie counts as gone: it has exited, only its exit status is left.
    pub fn check(&self) -> Result<(), AttestError> {
        let stat = Stat::read(&self.proc_root, self.pid)?;
        if stat.start_time != self.start_time || stat.is_dead() {
            return Err(AttestError::Gone { pid: self.pid });
        }
        Ok(())
    }
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
fn read_whole(file: &mut impl io::Read) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        let n = match file.read(&mut buf[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        len += n;
        if n == 0 || len < buf.len() {
            buf.truncate(len);
            return Ok(buf);
        }
        buf.resize(buf.len() * 2, 0);
    }
}

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
