//! Workload attestation: which selectors describe the process at the other end of a Workload
//! API connection.
//!
//! The flow, and why:
//!
//! 1. **Pin at accept.** The socket's peer credentials (SO_PEERCRED) give the uid, gid and PID of
//!    the process that connected. A PID is only a number the kernel recycles: if that process
//!    exits, a new, unrelated process may get the same PID, and everything read about "the PID"
//!    would describe the newcomer. So the caller pins the process right away with
//!    [`ProcessPin::pin_peer`]: PID plus start time (which a later process with that PID cannot
//!    share), read through the connection's pidfd where the kernel offers one (the process that
//!    connected, even if its PID changed hands before the accept), and the uid/gid it connected
//!    with.
//! 2. **Read.** [`WorkloadAttestor::attest`] reads `/proc/<pid>/{status,cgroup,exe}` and hashes
//!    the executable. uid and gid come from the peer credentials, captured by the kernel at
//!    `connect()`, not from `/proc`, which could already be another process's.
//!
//!    Hashing is the one slow step (a large binary takes seconds in a debug build), and only
//!    entries with a `unix:sha256` selector need it. The agent's cache keeps a flag saying
//!    whether any cached entry has one ([`WorkloadAttestor::with_exe_hash_flag`]); while none
//!    does, [`WorkloadAttestor::attest_async`] leaves `unix:sha256` out and says so
//!    ([`Attestation::exe_hash_skipped`]), and a stream whose caller was attested that way is
//!    attested again when such an entry arrives. Hashes are cached per file version (device,
//!    inode, size, mtime, ctime), so each binary is read once. `explain` always hashes.
//! 3. **Re-check.** Those reads are only trusted if the same process is still there afterwards:
//!    `attest` ends with [`ProcessPin::check`], and the caller checks again before every answer
//!    and every stream message, so nothing read about a PID that changed hands (or a process
//!    that has since taken another uid or gid) is ever used.
//!
//! Selectors (SPIRE's conventions):
//! - `unix:uid`, `unix:gid`, `unix:user`, `unix:group`, `unix:supplementary_gid`,
//!   `unix:supplementary_group`, `unix:path`, `unix:sha256` (the `unix` helpers);
//! - `systemd:id`, `k8s:pod-uid`, `k8s:container-id`, `docker:id`, `container:id` from the
//!   cgroup path ([`cgroup`]);
//! - with the `k8s` attestor on ([`WorkloadAttestor::with_kubelet`]), for a process in a pod's
//!   container: `k8s:ns`, `k8s:sa`, `k8s:pod-name`, `k8s:pod-label`, `k8s:container-name`,
//!   `k8s:container-image`, ... from the kubelet's pod list ([`k8s`]), added by
//!   [`WorkloadAttestor::attest_async`] after the /proc reads and followed by one more pin check
//!   (not for a cgroup in a user-delegated subtree: [`k8s::under_user_delegation`]).
//!
//! Anything the agent is not allowed to see (another user's executable when not root) is left
//! out rather than failing: fewer selectors can only match fewer entries.

pub mod cgroup;
pub mod k8s;
pub mod process;
mod unix;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use process::ProcessPin;
use sigil::selector::SelectorSet;

/// What the attestor found about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// The process, as pinned.
    pub pid: i32,
    /// Its selectors.
    pub selectors: SelectorSet,
    /// Its cgroup lies in a subtree a user may name at will (`user.slice`, `user@<uid>.service`):
    /// pod and container names there are not to be taken to the kubelet.
    pub user_delegated_cgroup: bool,
    /// `unix:sha256` was left out because no entry needed it (attest again to get it).
    pub exe_hash_skipped: bool,
}

/// Whether an attestation hashes the executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExeHash {
    /// Only while some cached entry has a `unix:sha256` selector (the exe-hash flag is set).
    IfWanted,
    /// Always (`explain`, which shows every selector).
    Always,
}

/// How [`WorkloadAttestor::attest_with`] treats the executable's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HashStep {
    /// Leave `unix:sha256` out.
    Skip,
    /// Use the cached hash; `Ok(None)` from the attestation when it is not cached.
    CachedOnly,
    /// Hash the file if its hash is not cached.
    Compute,
}

/// Why a process could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The process exited (or its PID now names another process) during attestation.
    #[error("process {pid} exited (or its PID now names another process) during attestation")]
    Gone {
        /// The PID that was pinned.
        pid: i32,
    },
    /// The process runs as another user or group than the kernel recorded when it connected.
    #[error("process {pid} runs as uid {uid} gid {gid} but connected as uid {peer_uid} gid {peer_gid}: its PID now names another process, or it changed credentials (ran a setuid program) since it connected; its identity is not issued")]
    CredentialsChanged {
        /// The PID that was pinned.
        pid: i32,
        /// Effective uid now.
        uid: u32,
        /// Effective gid now.
        gid: u32,
        /// uid at `connect()` (SO_PEERCRED).
        peer_uid: u32,
        /// gid at `connect()` (SO_PEERCRED).
        peer_gid: u32,
    },
    /// Reading /proc failed for another reason.
    #[error("cannot read {what} of process {pid} from /proc: {source}")]
    Proc {
        /// The process.
        pid: i32,
        /// Which file: `stat`, `status`, `cgroup`.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The blocking attestation task panicked or was cancelled.
    #[error("workload attestation task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The executable hash step did not run although it was asked for (a bug).
    #[error("workload attestation: the executable hash was not computed")]
    HashNotComputed,
}

/// Reads a pinned process's properties into selectors.
#[derive(Debug)]
pub struct WorkloadAttestor {
    proc_root: PathBuf,
    exe_hashes: unix::ExeHashCache,
    /// The `k8s` attestor: `None` (the default) never contacts a kubelet.
    kubelet: Option<k8s::KubeletClient>,
    /// True while some cached entry has a `unix:sha256` selector; `None`: always hash.
    exe_hash_flag: Option<Arc<AtomicBool>>,
    /// The cgroup hierarchies as the agent sees them, to check who owns a container's cgroups.
    cgroup_mounts: cgroup::CgroupMounts,
}

impl Default for WorkloadAttestor {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkloadAttestor {
    /// An attestor reading `/proc`.
    pub fn new() -> Self {
        Self::with_proc_root(PathBuf::from(process::DEFAULT_PROC_ROOT))
    }

    /// An attestor reading procfs at `root` (tests use a fake tree); pins passed to
    /// [`attest`](Self::attest) must come from the same root.
    /// The cgroup hierarchies are found in `<root>/self/mountinfo`.
    pub fn with_proc_root(root: PathBuf) -> Self {
        Self {
            cgroup_mounts: cgroup::CgroupMounts::read(&root),
            proc_root: root,
            exe_hashes: unix::ExeHashCache::default(),
            kubelet: None,
            exe_hash_flag: None,
        }
    }

    /// Hashes executables only while `flag` is true: the agent's cache sets it while some
    /// entry has a `unix:sha256` selector ([`crate::sync::cache::Cache::exe_hash_flag`]).
    pub fn with_exe_hash_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.exe_hash_flag = Some(flag);
        self
    }

    /// True when [`ExeHash::IfWanted`] attestations hash the executable.
    pub fn exe_hash_wanted(&self) -> bool {
        self.exe_hash_flag
            .as_ref()
            .is_none_or(|f| f.load(Ordering::SeqCst))
    }

    /// Turns on the `k8s` attestor: [`attest_async`](Self::attest_async) adds the kubelet's
    /// selectors for processes in a pod's container.
    pub fn with_kubelet(mut self, kubelet: k8s::KubeletClient) -> Self {
        self.kubelet = Some(kubelet);
        self
    }

    /// The `k8s` attestor's kubelet client, if on.
    pub fn kubelet(&self) -> Option<&k8s::KubeletClient> {
        self.kubelet.as_ref()
    }

    /// [`attest`](Self::attest) on the blocking pool, then, for a process whose cgroup names a
    /// pod and a container and with the `k8s` attestor on, the kubelet's selectors (none if the
    /// kubelet cannot say: see [`k8s`]). Like `attest`, ends by checking the pin.
    ///
    /// The executable is hashed only while an entry needs `unix:sha256` ([`ExeHash::IfWanted`]).
    pub async fn attest_async(
        self: &Arc<Self>,
        pin: Arc<ProcessPin>,
        uid: u32,
        gid: u32,
    ) -> Result<Attestation, AttestError> {
        self.attest_async_with(pin, uid, gid, ExeHash::IfWanted)
            .await
    }

    /// [`attest_async`](Self::attest_async), choosing whether the executable is hashed.
    pub async fn attest_async_with(
        self: &Arc<Self>,
        pin: Arc<ProcessPin>,
        uid: u32,
        gid: u32,
        hash: ExeHash,
    ) -> Result<Attestation, AttestError> {
        // /proc reads take microseconds: done inline when the executable's hash is cached (or
        // not wanted), which saves two thread hand-offs per call; hashing a new binary goes to
        // the blocking pool.
        let step = if hash == ExeHash::Always || self.exe_hash_wanted() {
            HashStep::CachedOnly
        } else {
            HashStep::Skip
        };
        let inline = self.attest_with(&pin, uid, gid, step)?;
        let mut attestation = match inline {
            Some(a) => a,
            None => {
                let me = Arc::clone(self);
                let p = Arc::clone(&pin);
                tokio::task::spawn_blocking(move || me.attest(&p, uid, gid))
                    .await
                    .map_err(AttestError::Task)??
            }
        };
        let Some(kubelet) = &self.kubelet else {
            return Ok(attestation);
        };
        let ids = |name: &str| {
            let prefix = format!("{name}:");
            attestation
                .selectors
                .iter()
                .filter(|s| s.kind() == "k8s")
                .find_map(|s| s.value().strip_prefix(&prefix).map(str::to_string))
        };
        if let (Some(pod), Some(container)) = (ids("pod-uid"), ids("container-id")) {
            if attestation.user_delegated_cgroup {
                kubelet.warn(format!(
                    "process {} claims container {container} of pod {pod}, but its cgroup is in a subtree delegated to a user (user.slice / user@<uid>.service), where cgroups can be named at will; k8s selectors from the kubelet withheld",
                    attestation.pid
                ));
                return Ok(attestation);
            }
            for s in kubelet.selectors(&pod, &container).await {
                attestation.selectors.insert(s);
            }
            // The kubelet step took time: the process must still be the one pinned.
            pin.check()?;
        }
        Ok(attestation)
    }

    /// Blocking (reads /proc, hashes the exe): callers run it in spawn_blocking.
    /// uid/gid come from the socket's peer credentials (SO_PEERCRED), not /proc.
    ///
    /// Ends by checking the pin: `Err(Gone)` if the process is no longer the one pinned, so the
    /// selectors returned were all read from it.
    pub fn attest(&self, pin: &ProcessPin, uid: u32, gid: u32) -> Result<Attestation, AttestError> {
        self.attest_with(pin, uid, gid, HashStep::Compute)?
            .ok_or(AttestError::HashNotComputed)
    }

    /// [`attest`](Self::attest) with the hash step chosen; with [`HashStep::CachedOnly`],
    /// `Ok(None)` when the executable's hash is not cached yet (the only step that can take
    /// long: the caller retries where blocking is fine).
    fn attest_with(
        &self,
        pin: &ProcessPin,
        uid: u32,
        gid: u32,
        step: HashStep,
    ) -> Result<Option<Attestation>, AttestError> {
        let pid = pin.pid;
        let mut selectors = SelectorSet::new();
        let mut add = |list: Vec<sigil::Selector>| {
            for s in list {
                selectors.insert(s);
            }
        };
        add(unix::identity_selectors(uid, gid));
        let status = process::read_proc_file(&self.proc_root, pid, "status")?;
        add(unix::supplementary_selectors(&status));
        let cgroups = process::read_proc_file(&self.proc_root, pid, "cgroup")?;
        // Lossy: a path that is not UTF-8 is no runtime's or systemd's, and matches nothing.
        let cgroups = String::from_utf8_lossy(&cgroups);
        let mut cgroup_info = cgroup::parse(&cgroups);
        if cgroup_info.container_id.is_some() || cgroup_info.pod_uid.is_some() {
            if let cgroup::Ownership::Delegated(dir) = self.cgroup_mounts.verify(&cgroups) {
                // Someone else than root could have created and named this cgroup.
                tracing::warn!(pid, cgroup = %dir.display(), container = cgroup_info.container_id.as_deref(), pod = cgroup_info.pod_uid.as_deref(), "a cgroup above the process's container is not root's (delegated to a user?); no container or pod selectors");
                cgroup_info = cgroup::CgroupInfo::default();
            }
        }
        add(cgroup_info.selectors());
        let user_delegated_cgroup = k8s::under_user_delegation(&cgroups);
        let Some(exe) = unix::exe_selectors(&self.proc_root, pid, &self.exe_hashes, step)? else {
            return Ok(None);
        };
        add(exe);
        pin.check()?;
        Ok(Some(Attestation {
            pid,
            selectors,
            user_delegated_cgroup,
            exe_hash_skipped: step == HashStep::Skip,
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use sigil::Selector;
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    pub(crate) const PID: i32 = 4242;
    const START: u64 = 1_234_567;
    const CID: &str = "f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830";
    const POD: &str = "dd1bf9d1-241d-47f5-8e25-12de83135812";
    pub(crate) const EXE_BYTES: &[u8] = b"\x7fELF pretend binary";

    fn stat_line(pid: i32, start: u64) -> String {
        // The command name has ") (", spaces and a trailing ')' to trip naive parsers.
        format!(
            "{pid} (my ) (app x)) S 1 {pid} {pid} 0 -1 4194560 1234 0 0 0 5 3 0 0 20 0 1 0 \
             {start} 12345678 456 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0\n"
        )
    }

    /// A fake procfs with one process, and its executable at `<tmp>/bin/app`.
    pub(crate) struct FakeProc {
        dir: tempfile::TempDir,
    }

    impl FakeProc {
        pub(crate) fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let fake = Self { dir };
            let p = fake.pid_dir();
            std::fs::create_dir_all(&p).unwrap();
            std::fs::create_dir_all(fake.dir.path().join("bin")).unwrap();
            std::fs::write(p.join("stat"), stat_line(PID, START)).unwrap();
            std::fs::write(
                p.join("status"),
                "Name:\tmy ) (app x)\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
                 Uid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n\
                 Groups:\t4000000001 4000000002 \nNStgid:\t4242\n",
            )
            .unwrap();
            std::fs::write(
                p.join("cgroup"),
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope\n",
                    POD.replace('-', "_")
                ),
            )
            .unwrap();
            std::fs::write(fake.exe(), EXE_BYTES).unwrap();
            std::os::unix::fs::symlink(fake.exe(), p.join("exe")).unwrap();
            fake
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn pid_dir(&self) -> PathBuf {
            self.dir.path().join(PID.to_string())
        }

        fn exe(&self) -> PathBuf {
            self.dir.path().join("bin").join("app")
        }

        pub(crate) fn attestor(&self) -> WorkloadAttestor {
            WorkloadAttestor::with_proc_root(self.root().to_path_buf())
        }

        pub(crate) fn pin(&self) -> ProcessPin {
            ProcessPin::pin_in(self.root(), PID).unwrap()
        }

        fn relink_exe(&self, target: &Path) {
            let link = self.pid_dir().join("exe");
            std::fs::remove_file(&link).unwrap();
            std::os::unix::fs::symlink(target, link).unwrap();
        }
    }

    pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap()
    }

    fn with_kind<'a>(a: &'a Attestation, value_prefix: &'a str) -> Vec<String> {
        a.selectors
            .iter()
            .filter(|s| s.kind() == "unix" && s.value().starts_with(value_prefix))
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn attests_a_fake_process() {
        let fake = FakeProc::new();
        let a = fake
            .attestor()
            .attest(&fake.pin(), 4_000_000_010, 4_000_000_020)
            .unwrap();
        assert_eq!(a.pid, PID);
        // uid/gid are the caller's (peer credentials), not the status file's 1000.
        let want: SelectorSet = [
            "unix:uid:4000000010".to_string(),
            "unix:gid:4000000020".to_string(),
            "unix:supplementary_gid:4000000001".to_string(),
            "unix:supplementary_gid:4000000002".to_string(),
            format!("unix:path:{}", fake.exe().display()),
            format!("unix:sha256:{}", sha256_hex(EXE_BYTES)),
            format!("k8s:pod-uid:{POD}"),
            format!("k8s:container-id:{CID}"),
        ]
        .iter()
        .map(|s| sel(s))
        .collect();
        assert_eq!(a.selectors, want);
    }

    #[test]
    fn hash_is_cached_by_file_version() {
        let fake = FakeProc::new();
        let attestor = fake.attestor();
        let pin = fake.pin();
        let hash = |a: &Attestation| with_kind(a, "sha256:");
        let first = attestor.attest(&pin, 0, 0).unwrap();
        assert_eq!(
            hash(&first),
            [format!("unix:sha256:{}", sha256_hex(EXE_BYTES))]
        );
        assert_eq!(attestor.exe_hashes.map.lock().unwrap().len(), 1);

        // Plant a different value under the same key: a cache hit returns it, proving the file
        // is not read again.
        let planted = "ab".repeat(32);
        for v in attestor.exe_hashes.map.lock().unwrap().values_mut() {
            v.clone_from(&planted);
        }
        let second = attestor.attest(&pin, 0, 0).unwrap();
        assert_eq!(hash(&second), [format!("unix:sha256:{planted}")]);

        // Touching mtime makes a new key: the file is hashed again.
        let file = std::fs::File::options()
            .write(true)
            .open(fake.exe())
            .unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(3600))
            .unwrap();
        let third = attestor.attest(&pin, 0, 0).unwrap();
        assert_eq!(
            hash(&third),
            [format!("unix:sha256:{}", sha256_hex(EXE_BYTES))]
        );

        // New content of the same size, with mtime set back: ctime still moved, so it is
        // rehashed (mtime alone could be forged by the file's owner).
        let meta = std::fs::metadata(fake.exe()).unwrap();
        let new_bytes = b"\x7fELF evil!!! binary";
        assert_eq!(new_bytes.len(), EXE_BYTES.len());
        std::fs::write(fake.exe(), new_bytes).unwrap();
        let file = std::fs::File::options()
            .write(true)
            .open(fake.exe())
            .unwrap();
        file.set_modified(meta.modified().unwrap()).unwrap();
        let fourth = attestor.attest(&pin, 0, 0).unwrap();
        assert_eq!(
            hash(&fourth),
            [format!("unix:sha256:{}", sha256_hex(new_bytes))]
        );
    }

    #[tokio::test]
    async fn executables_are_hashed_only_while_an_entry_needs_it() {
        let fake = FakeProc::new();
        let flag = Arc::new(AtomicBool::new(false));
        let attestor = Arc::new(fake.attestor().with_exe_hash_flag(flag.clone()));
        let pin = Arc::new(fake.pin());
        let hashed = || {
            attestor
                .exe_hashes
                .hashed
                .load(std::sync::atomic::Ordering::SeqCst)
        };
        let sha = format!("unix:sha256:{}", sha256_hex(EXE_BYTES));

        // No entry needs the hash: the file is never read, and the attestation says so.
        let a = attestor.attest_async(pin.clone(), 1, 1).await.unwrap();
        assert_eq!(hashed(), 0);
        assert!(with_kind(&a, "sha256:").is_empty(), "{a:?}");
        assert!(a.exe_hash_skipped);
        assert_eq!(
            with_kind(&a, "path:"),
            [format!("unix:path:{}", fake.exe().display())]
        );

        // An entry needs it: hashed once, then served from the cache.
        flag.store(true, Ordering::SeqCst);
        for _ in 0..2 {
            let a = attestor.attest_async(pin.clone(), 1, 1).await.unwrap();
            assert_eq!(with_kind(&a, "sha256:"), std::slice::from_ref(&sha));
            assert!(!a.exe_hash_skipped);
        }
        assert_eq!(hashed(), 1);

        // explain hashes whatever the flag says (a new attestor: nothing cached).
        flag.store(false, Ordering::SeqCst);
        let attestor = Arc::new(fake.attestor().with_exe_hash_flag(flag.clone()));
        let a = attestor
            .attest_async_with(pin.clone(), 1, 1, ExeHash::Always)
            .await
            .unwrap();
        assert_eq!(with_kind(&a, "sha256:"), [sha]);
        assert_eq!(
            attestor
                .exe_hashes
                .hashed
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
        // An attestor without a flag (tests, tools) always hashes.
        assert!(fake.attestor().exe_hash_wanted());
    }

    #[test]
    fn gone_before_or_during_attestation() {
        let fake = FakeProc::new();
        let attestor = fake.attestor();
        let pin = fake.pin();

        // Same PID, a different start time: another process now.
        std::fs::write(fake.pid_dir().join("stat"), stat_line(PID, START + 1)).unwrap();
        let e = attestor.attest(&pin, 0, 0).unwrap_err();
        assert!(matches!(e, AttestError::Gone { pid: PID }), "{e:?}");
        assert!(e.to_string().contains("4242"), "{e}");

        // The process directory is gone.
        std::fs::remove_dir_all(fake.pid_dir()).unwrap();
        let e = attestor.attest(&pin, 0, 0).unwrap_err();
        assert!(matches!(e, AttestError::Gone { pid: PID }), "{e:?}");
        assert!(matches!(
            ProcessPin::pin_in(fake.root(), PID),
            Err(AttestError::Gone { pid: PID })
        ));
    }

    #[test]
    fn each_missing_file_means_gone() {
        for file in ["status", "cgroup", "exe", "stat"] {
            let fake = FakeProc::new();
            let pin = fake.pin();
            std::fs::remove_file(fake.pid_dir().join(file)).unwrap();
            let e = fake.attestor().attest(&pin, 0, 0).unwrap_err();
            assert!(matches!(e, AttestError::Gone { pid: PID }), "{file}: {e:?}");
        }
    }

    #[test]
    fn unreadable_proc_file_is_a_proc_error() {
        let fake = FakeProc::new();
        let pin = fake.pin();
        std::fs::remove_file(fake.pid_dir().join("cgroup")).unwrap();
        std::fs::create_dir(fake.pid_dir().join("cgroup")).unwrap();
        let e = fake.attestor().attest(&pin, 0, 0).unwrap_err();
        assert!(
            matches!(
                e,
                AttestError::Proc {
                    pid: PID,
                    what: "cgroup",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("cgroup of process 4242"), "{e}");
    }

    #[test]
    fn deleted_or_unusable_exe_gives_no_path_or_hash() {
        let fake = FakeProc::new();
        // Deleted: readlink shows " (deleted)"; here the link dangles like the real one would.
        let deleted = fake.dir.path().join("bin").join("old (deleted)");
        let not_a_file = fake.dir.path().join("bin");
        let dangling = fake.dir.path().join("bin").join("nonexistent");
        for target in [&deleted, &not_a_file, &dangling] {
            fake.relink_exe(target);
            let a = fake.attestor().attest(&fake.pin(), 0, 0).unwrap();
            assert!(with_kind(&a, "path:").is_empty(), "{target:?}: {a:?}");
            assert!(with_kind(&a, "sha256:").is_empty(), "{target:?}: {a:?}");
            // The rest is still there.
            assert!(a.selectors.contains(&sel("unix:uid:0")));
            assert!(a
                .selectors
                .contains(&sel(&format!("k8s:container-id:{CID}"))));
        }

        // A file that exists but is named "... (deleted)": skipped too (the suffix can't be
        // told apart from the kernel's), which is the safe side.
        std::fs::write(&deleted, EXE_BYTES).unwrap();
        fake.relink_exe(&deleted);
        let a = fake.attestor().attest(&fake.pin(), 0, 0).unwrap();
        assert!(with_kind(&a, "path:").is_empty(), "{a:?}");
    }

    #[test]
    fn exe_not_a_link_is_skipped_not_fatal() {
        let fake = FakeProc::new();
        let link = fake.pid_dir().join("exe");
        std::fs::remove_file(&link).unwrap();
        std::fs::write(&link, EXE_BYTES).unwrap(); // readlink: EINVAL
        let a = fake.attestor().attest(&fake.pin(), 0, 0).unwrap();
        assert!(with_kind(&a, "path:").is_empty(), "{a:?}");
        assert!(with_kind(&a, "sha256:").is_empty(), "{a:?}");
    }

    #[test]
    fn relative_exe_path_gives_hash_but_no_path() {
        // The kernel always gives an absolute path; anything else is not trusted as a path.
        let fake = FakeProc::new();
        fake.relink_exe(Path::new("../bin/app"));
        let a = fake.attestor().attest(&fake.pin(), 0, 0).unwrap();
        assert!(with_kind(&a, "path:").is_empty(), "{a:?}");
        assert_eq!(
            with_kind(&a, "sha256:"),
            [format!("unix:sha256:{}", sha256_hex(EXE_BYTES))]
        );
    }

    #[test]
    fn cgroup_and_status_variants() {
        let fake = FakeProc::new();
        std::fs::write(
            fake.pid_dir().join("cgroup"),
            "0::/system.slice/nginx.service\n",
        )
        .unwrap();
        // No Groups: line at all (never the case in real /proc, but not fatal).
        std::fs::write(fake.pid_dir().join("status"), "Name:\tnginx\n").unwrap();
        let a = fake.attestor().attest(&fake.pin(), 0, 0).unwrap();
        assert!(a.selectors.contains(&sel("systemd:id:nginx.service")));
        assert!(with_kind(&a, "supplementary_gid:").is_empty());
        assert!(!a.selectors.iter().any(|s| s.kind() == "k8s"));
        // Non-UTF-8 bytes in the cgroup file do not break the rest.
        std::fs::write(
            fake.pid_dir().join("cgroup"),
            b"1:name=systemd:/\xff\n0::/system.slice/sshd.service\n",
        )
        .unwrap();
        let a = fake.attestor().attest(&fake.pin(), 0, 0).unwrap();
        assert!(a.selectors.contains(&sel("systemd:id:sshd.service")));
    }

    #[test]
    fn container_in_a_cgroup_handed_to_a_user_gets_no_container_selectors() {
        assert!(nix::unistd::geteuid().is_root(), "this test needs root");
        let fake = FakeProc::new();
        // A cgroup v2 hierarchy in a temp dir, as this fake procfs's mountinfo lists it.
        let hierarchy = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(hierarchy.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(fake.root().join("self")).unwrap();
        std::fs::write(
            fake.root().join("self/mountinfo"),
            format!(
                "30 23 0:26 / {} rw,nosuid - cgroup2 cgroup2 rw\n",
                hierarchy.path().display()
            ),
        )
        .unwrap();
        let path = format!("/ci/docker/{CID}");
        std::fs::create_dir_all(hierarchy.path().join(path.trim_start_matches('/'))).unwrap();
        std::fs::write(fake.pid_dir().join("cgroup"), format!("0::{path}\n")).unwrap();
        let docker_id = sel(&format!("docker:id:{CID}"));

        // Root's cgroups: the container is the container.
        let a = fake.attestor().attest(&fake.pin(), 0, 0).unwrap();
        assert!(a.selectors.contains(&docker_id), "{a:?}");

        // The same names in a directory given to uid 65534: no container selectors.
        nix::unistd::chown(
            &hierarchy.path().join("ci"),
            Some(nix::unistd::Uid::from_raw(65534)),
            None,
        )
        .unwrap();
        let a = fake.attestor().attest(&fake.pin(), 0, 0).unwrap();
        assert!(!a.selectors.contains(&docker_id), "{a:?}");
        assert!(!a
            .selectors
            .iter()
            .any(|s| s.kind() == "docker" || s.kind() == "k8s"));
        assert!(
            a.selectors.contains(&sel("unix:uid:0")),
            "the rest stays: {a:?}"
        );
    }

    /// Cgroup directories (top down) and a process in the last one, removed on drop so a
    /// failing test leaves nothing behind.
    struct TestCgroup {
        dirs: Vec<PathBuf>,
        child: std::process::Child,
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            for dir in self.dirs.iter().rev() {
                // An exited process may take a moment to leave its cgroup.
                for _ in 0..50 {
                    if std::fs::remove_dir(dir).is_ok() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    }

    /// A real cgroup, as a user with a delegated subtree (systemd `Delegate=yes`) can make one:
    /// a directory of the hierarchy chowned to `nobody`, and inside it cgroups named like a
    /// Docker container (cgroupfs layout, which the path rule alone lets through). A process
    /// moved there is not that container; the same names in root's cgroups are.
    #[test]
    fn real_cgroup_below_a_directory_delegated_to_a_user_is_no_container() {
        use std::os::unix::fs::PermissionsExt;
        let mounts = cgroup::CgroupMounts::read(Path::new(process::DEFAULT_PROC_ROOT));
        let (controllers, hierarchy) = ["pids", ""]
            .iter()
            .find_map(|c| mounts.mount_point(c).map(|p| (*c, p.to_path_buf())))
            .expect("a cgroup hierarchy is mounted (pids v1 or v2)");
        let writable = nix::unistd::geteuid().is_root()
            && nix::unistd::access(&hierarchy, nix::unistd::AccessFlags::W_OK).is_ok();
        assert!(
            writable,
            "this test needs root and a writable cgroup hierarchy at {} (to create cgroups)",
            hierarchy.display()
        );
        let id = "d".repeat(64);
        for delegated in [true, false] {
            let top = hierarchy.join(format!(
                "sigil-test-{}-{}",
                if delegated { "delegated" } else { "root" },
                std::process::id()
            ));
            let leaf = top.join("docker").join(&id);
            std::fs::create_dir_all(&leaf).unwrap();
            let child = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap();
            let cg = TestCgroup {
                dirs: vec![top.clone(), top.join("docker"), leaf.clone()],
                child,
            };
            if delegated {
                nix::unistd::chown(&top, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            }
            assert_eq!(
                std::fs::metadata(&top).unwrap().permissions().mode() & 0o022,
                0
            );
            std::fs::write(leaf.join("cgroup.procs"), cg.child.id().to_string()).unwrap();
            let pid = i32::try_from(cg.child.id()).unwrap();
            let seen = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            let relative = leaf.strip_prefix(&hierarchy).unwrap().display().to_string();
            assert!(
                seen.lines()
                    .any(|l| l.ends_with(&format!(":{controllers}:/{relative}"))),
                "moved into the cgroup: {seen}"
            );
            let a = WorkloadAttestor::new()
                .attest(&ProcessPin::pin(pid).unwrap(), 0, 0)
                .unwrap();
            drop(cg);
            let docker_id = sel(&format!("docker:id:{id}"));
            assert_eq!(
                a.selectors.contains(&docker_id),
                !delegated,
                "delegated: {delegated}; cgroup file:\n{seen}\nselectors: {a:?}"
            );
            assert!(!top.exists(), "{} removed", top.display());
        }
    }

    #[test]
    fn attests_this_process_via_real_proc() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let pin = ProcessPin::pin(pid).unwrap();
        let attestor = WorkloadAttestor::new();
        let a = attestor.attest(&pin, uid, gid).unwrap();
        assert_eq!(a.pid, pid);
        assert!(a.selectors.contains(&sel(&format!("unix:uid:{uid}"))));
        assert!(a.selectors.contains(&sel(&format!("unix:gid:{gid}"))));
        let exe = std::env::current_exe().unwrap();
        assert!(
            a.selectors
                .contains(&sel(&format!("unix:path:{}", exe.display()))),
            "{a:?}"
        );
        let hash = sha256_hex(&std::fs::read(&exe).unwrap());
        assert!(
            a.selectors.contains(&sel(&format!("unix:sha256:{hash}"))),
            "{a:?}"
        );
        // Our own supplementary groups, as the kernel lists them.
        for g in nix::unistd::getgroups().unwrap() {
            assert!(
                a.selectors
                    .contains(&sel(&format!("unix:supplementary_gid:{}", g.as_raw()))),
                "{g}: {a:?}"
            );
        }
        // A second attestation hits the cache and agrees.
        assert_eq!(attestor.attest(&pin, uid, gid).unwrap(), a);
    }

    #[test]
    fn error_messages_say_what_went_wrong() {
        let gone = AttestError::Gone { pid: 7 };
        assert_eq!(
            gone.to_string(),
            "process 7 exited (or its PID now names another process) during attestation"
        );
        let proc = AttestError::Proc {
            pid: 7,
            what: "status",
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32),
        };
        assert!(
            proc.to_string()
                .starts_with("cannot read status of process 7 from /proc: "),
            "{proc}"
        );
    }
}
