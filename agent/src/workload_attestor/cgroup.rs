//! Container, Kubernetes pod and systemd unit of a process, from `/proc/<pid>/cgroup`.
//!
//! Each line is `hierarchy-id:controllers:path`: many lines under cgroup v1 (one a hierarchy),
//! a single `0::/path` under v2. The path is what runtimes and systemd named the cgroup, so the
//! container ID, the pod UID and the unit are read off its components:
//!
//! | runtime / driver | path (last components) |
//! |---|---|
//! | docker, cgroupfs | `/docker/<id>` |
//! | docker, systemd | `/system.slice/docker-<id>.scope` |
//! | kubelet, cgroupfs | `/kubepods/burstable/pod<uid>/<id>` (`besteffort`; none if guaranteed) |
//! | kubelet, systemd | `kubepods-burstable-pod<uid with _>.slice/<runtime>-<id>.scope` |
//! | containerd, systemd, v1 | `kubepods-pod<uid with _>.slice:cri-containerd:<id>` (runc form) |
//! | CRI-O | `crio-<id>.scope` (`crio-conmon-<id>.scope` is its monitor, not a container) |
//!
//! Container IDs are 64 lowercase hex digits. Pod UIDs are UUIDs (static pods: 32 hex digits);
//! the systemd driver writes their dashes as `_`, turned back here. Anything unrecognised is
//! ignored: parsing never fails.
//!
//! These facts are only as trustworthy as the cgroup's name. Cgroups are created by root (the
//! runtimes, systemd), except in a delegated subtree: systemd hands a unit's cgroup to the
//! unit's user with `Delegate=yes` (the user manager `user@<uid>.service` always; any service or
//! scope that asks for it), and that user may then create and name cgroups below it as they
//! like: `…/system.slice/build.service/docker-<a victim's container id>.scope`,
//! `…/user@1000.service/x/kubepods/pod<a victim's uid>/<its container id>`. Two rules keep such
//! names from counting:
//!
//! 1. **Path (always).** Only services and scopes can be delegated (slices cannot), and the
//!    tree above them is root's. So a path is read from the root down to its first service or
//!    scope and no further: that unit is the process's unit (what the system manager reports
//!    for it, as SPIRE's systemd attestor sees it; `user@<uid>.service` for everything a user
//!    runs) and nothing below it names a container or a pod. The exceptions are the units that
//!    belong to the runtimes themselves: a container's own scope (`docker-<id>.scope`,
//!    `cri-containerd-<id>.scope`, …: kind's pods live inside a node container's scope) and
//!    `containerd.service` (containerd's v1 `slice:cri-containerd:<id>` cgroups); a unit found
//!    below a container is that container's business and leaves its identity as it was. Rootless
//!    containers (below `user@<uid>.service`) get no container or pod selectors.
//! 2. **Ownership (where the agent can look).** [`CgroupMounts::verify`] checks, in the
//!    agent's own view of the hierarchies (`/proc/self/mountinfo`), that every directory above
//!    the container's (or pod's) own cgroup belongs to root and is writable by nobody else: a
//!    directory systemd delegated (chowned) to a user, or one an administrator handed over by
//!    hand, fails it whatever its name, and the process keeps no container or pod selectors. A
//!    path the agent cannot see (another cgroup namespace's, `/../…`; one removed meanwhile)
//!    leaves rule 1 alone to decide.

use std::path::{Path, PathBuf};

use sigil::selector::Selector;

/// Length of a container ID (hex digits).
const CONTAINER_ID_LEN: usize = 64;
/// systemd's limit on a unit name.
const UNIT_NAME_MAX: usize = 255;
/// Units of container runtimes below which the runtime itself creates container cgroups
/// (containerd's cgroup v1 `kubepods-….slice:cri-containerd:<id>`): read through, unlike other
/// units, whose subtree may be delegated to their user.
const RUNTIME_UNITS: [&str; 1] = ["containerd.service"];

/// A container runtime named by a cgroup path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// Docker (`/docker/<id>`, `docker-<id>.scope`).
    Docker,
    /// containerd's CRI plugin (`cri-containerd-<id>.scope`, `:cri-containerd:<id>`).
    Containerd,
    /// CRI-O (`crio-<id>.scope`).
    CriO,
}

/// What a process's cgroups say about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupInfo {
    /// The systemd unit the process runs in (`nginx.service`, `session-3.scope`); never set for
    /// a process in a container or a pod.
    pub systemd_unit: Option<String>,
    /// The container's ID: 64 lowercase hex digits.
    pub container_id: Option<String>,
    /// The runtime, when the path names it (a bare ID under the cgroupfs driver does not).
    pub runtime: Option<Runtime>,
    /// The Kubernetes pod UID in its canonical form (dashes, not underscores).
    pub pod_uid: Option<String>,
}

impl CgroupInfo {
    /// The selectors these facts give: `systemd:id:<unit>`; in a pod `k8s:pod-uid:<uid>` and
    /// `k8s:container-id:<id>`; in a container outside Kubernetes `docker:id:<id>` (Docker) or
    /// `container:id:<id>` (any other runtime).
    pub fn selectors(&self) -> Vec<Selector> {
        let mut out = Vec::new();
        if let Some(unit) = &self.systemd_unit {
            push(&mut out, "systemd", format!("id:{unit}"));
        }
        match (&self.pod_uid, &self.container_id) {
            (Some(pod), container) => {
                push(&mut out, "k8s", format!("pod-uid:{pod}"));
                if let Some(id) = container {
                    push(&mut out, "k8s", format!("container-id:{id}"));
                }
            }
            (None, Some(id)) if self.runtime == Some(Runtime::Docker) => {
                push(&mut out, "docker", format!("id:{id}"));
            }
            (None, Some(id)) => push(&mut out, "container", format!("id:{id}")),
            (None, None) => {}
        }
        out
    }
}

/// Adds a selector; values are checked by the parser already, so a refusal is only logged.
fn push(out: &mut Vec<Selector>, kind: &str, value: String) {
    match Selector::new(kind, &value) {
        Ok(s) => out.push(s),
        Err(e) => tracing::debug!(%e, "cgroup selector skipped"),
    }
}

/// Parses the text of `/proc/<pid>/cgroup`.
///
/// The unit comes from the v2 line (`0::`), else the v1 `name=systemd` line: systemd keeps its
/// own tree there, other v1 hierarchies may group processes differently. Container and pod come
/// from any line; if lines disagree on them (a process moved in one hierarchy only), none is
/// reported rather than guessing.
pub fn parse(cgroup_file_text: &str) -> CgroupInfo {
    let lines: Vec<Line<'_>> = cgroup_file_text.lines().filter_map(Line::split).collect();
    let unit_line = lines
        .iter()
        .find(|l| l.is_v2())
        .or_else(|| lines.iter().find(|l| l.is_v1_systemd()));
    let systemd_unit = unit_line.and_then(|l| analyze(l.path).unit);

    let paths: Vec<PathInfo> = lines.iter().map(|l| analyze(l.path)).collect();
    let mut info = CgroupInfo {
        systemd_unit,
        ..CgroupInfo::default()
    };
    let in_container: Vec<&PathInfo> = paths.iter().filter(|p| p.container.is_some()).collect();
    if let Some(first) = in_container.first() {
        let agree = in_container
            .iter()
            .all(|p| container_id(p) == container_id(first) && p.pod_uid == first.pod_uid);
        if agree {
            info.container_id = container_id(first).map(str::to_string);
            info.runtime = in_container
                .iter()
                .find_map(|p| p.container.as_ref().and_then(|c| c.1));
            info.pod_uid.clone_from(&first.pod_uid);
        }
    } else {
        // In a pod's cgroup but no container's (e.g. CRI-O's conmon).
        let mut pods = paths.iter().filter_map(|p| p.pod_uid.as_deref());
        if let Some(pod) = pods.next() {
            if pods.all(|p| p == pod) {
                info.pod_uid = Some(pod.to_string());
            }
        }
    }
    info
}

/// The cgroups above the container (or pod) each line of a cgroup file names: for every line
/// whose path gives a container or a pod, its hierarchy (`controllers`: `""` for cgroup v2,
/// `cpu,cpuacct`, `name=systemd`) and the path of the parent of the component that named it.
pub fn identity_parents(cgroup_file_text: &str) -> Vec<(String, String)> {
    cgroup_file_text
        .lines()
        .filter_map(Line::split)
        .filter_map(|l| {
            let depth = analyze(l.path).identity_depth?;
            let parent: Vec<&str> = l.path.split('/').take(depth).collect();
            Some((l.controllers.to_string(), parent.join("/")))
        })
        .collect()
}

/// Where the agent sees each cgroup hierarchy mounted, from `/proc/self/mountinfo`: the
/// hierarchies' roots, to check who owns the directories a cgroup path names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    /// The cgroup v2 (unified) hierarchy.
    v2: Option<PathBuf>,
    /// cgroup v1 hierarchies: their controllers (and `name=…`) and mount point.
    v1: Vec<(Vec<String>, PathBuf)>,
}

/// What [`CgroupMounts::verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// Every directory checked belongs to root and only root may write it.
    Root,
    /// This directory belongs to someone else, or others may write it.
    Delegated(PathBuf),
    /// Could not be checked (hierarchy not mounted here, path in another cgroup namespace or
    /// gone): the path rule alone decides.
    Unknown,
}

impl CgroupMounts {
    /// The mounts listed in a `mountinfo` text: `cgroup` and `cgroup2` file systems whose root
    /// is the hierarchy's root (a bind mount of a sub-cgroup would give wrong paths).
    pub fn from_mountinfo(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            // id parent major:minor root mount-point options [optional...] - fstype source super
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let fields: Vec<&str> = left.split(' ').collect();
            let mut rest = right.split(' ');
            let (Some(fstype), Some(_source), Some(super_opts)) =
                (rest.next(), rest.next(), rest.next())
            else {
                continue;
            };
            let (Some(&root), Some(&mount_point)) = (fields.get(3), fields.get(4)) else {
                continue;
            };
            if root != "/" {
                continue;
            }
            let mount_point = PathBuf::from(unescape_mountinfo(mount_point));
            match fstype {
                "cgroup2" if out.v2.is_none() => out.v2 = Some(mount_point),
                "cgroup" => {
                    let controllers = super_opts
                        .split(',')
                        .filter(|o| !matches!(*o, "rw" | "ro") && !o.starts_with("release_agent"))
                        .map(str::to_string)
                        .collect();
                    out.v1.push((controllers, mount_point));
                }
                _ => {}
            }
        }
        out
    }

    /// Reads `<proc_root>/self/mountinfo`; no mounts if it cannot be read.
    pub fn read(proc_root: &Path) -> Self {
        match std::fs::read_to_string(proc_root.join("self").join("mountinfo")) {
            Ok(text) => Self::from_mountinfo(&text),
            Err(e) => {
                tracing::debug!(error = %e, "no mountinfo: cgroup ownership is not checked");
                Self::default()
            }
        }
    }

    /// The mount point of a hierarchy as `/proc/<pid>/cgroup` names it (`""`: cgroup v2,
    /// `pids`, `cpu,cpuacct`, `name=systemd`), if mounted.
    pub fn mount_point(&self, controllers: &str) -> Option<&Path> {
        if controllers.is_empty() {
            return self.v2.as_deref();
        }
        let wanted: Vec<&str> = controllers.split(',').collect();
        self.v1
            .iter()
            .find(|(have, _)| wanted.iter().all(|w| have.iter().any(|h| h == w)))
            .map(|(_, p)| p.as_path())
    }

    /// Checks who owns the cgroups above a process's container or pod (see the module doc):
    /// `Delegated` if any directory above it, in any hierarchy that names it, belongs to
    /// another user than root or may be written by others.
    pub fn verify(&self, cgroup_file_text: &str) -> Ownership {
        let mut result = Ownership::Unknown;
        for (controllers, parent) in identity_parents(cgroup_file_text) {
            let Some(mount) = self.mount_point(&controllers) else {
                continue;
            };
            match check_dirs(mount, &parent) {
                Ownership::Delegated(dir) => return Ownership::Delegated(dir),
                Ownership::Root => result = Ownership::Root,
                Ownership::Unknown => {}
            }
        }
        result
    }
}

/// Checks `mount` and each directory of `path` below it, from the top down.
fn check_dirs(mount: &Path, path: &str) -> Ownership {
    use std::os::unix::fs::MetadataExt;
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    // `..`: the path climbs out of the agent's cgroup namespace, which it cannot see.
    if comps.iter().any(|c| *c == ".." || *c == ".") {
        return Ownership::Unknown;
    }
    let mut dir = mount.to_path_buf();
    for next in std::iter::once(None).chain(comps.into_iter().map(Some)) {
        if let Some(c) = next {
            dir.push(c);
        }
        let meta = match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => m,
            // Gone (the process moved or exited) or not visible here.
            _ => return Ownership::Unknown,
        };
        if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            return Ownership::Delegated(dir);
        }
    }
    Ownership::Root
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                let v = u32::from(d[0] - b'0') * 64
                    + u32::from(d[1] - b'0') * 8
                    + u32::from(d[2] - b'0');
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn container_id(p: &PathInfo) -> Option<&str> {
    p.container.as_ref().map(|c| c.0.as_str())
}

/// One `hierarchy-id:controllers:path` line.
struct Line<'a> {
    hierarchy: &'a str,
    controllers: &'a str,
    path: &'a str,
}

impl<'a> Line<'a> {
    /// Splits at the first two colons only: the path may contain colons.
    fn split(line: &'a str) -> Option<Self> {
        let mut parts = line.splitn(3, ':');
        let hierarchy = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        let numeric = !hierarchy.is_empty() && hierarchy.bytes().all(|b| b.is_ascii_digit());
        (numeric && path.starts_with('/')).then_some(Self {
            hierarchy,
            controllers,
            path,
        })
    }

    fn is_v2(&self) -> bool {
        self.hierarchy == "0" && self.controllers.is_empty()
    }

    fn is_v1_systemd(&self) -> bool {
        self.controllers.split(',').any(|c| c == "name=systemd")
    }
}

/// What one cgroup path says.
#[derive(Debug, Default)]
struct PathInfo {
    unit: Option<String>,
    pod_uid: Option<String>,
    container: Option<(String, Option<Runtime>)>,
    /// Index (among the path's `/`-separated components) of the component that named the
    /// container, or the pod when there is no container.
    identity_depth: Option<usize>,
}

/// Walks the path's components from the root; the deepest match wins (a container nested in
/// another, e.g. kind's pods inside a node container, is the inner one). A service or scope
/// other than a runtime's ends the walk: below it, names are whoever the unit was delegated
/// to's choice (see the module doc).
fn analyze(path: &str) -> PathInfo {
    let mut info = PathInfo::default();
    let mut unit = None;
    let mut parent = "";
    for (depth, comp) in path.split('/').enumerate() {
        if let Some((slice, prefix, id)) = split_runc_systemd(comp) {
            if let Some(uid) = pod_uid_of_slice(slice) {
                info.pod_uid = Some(uid);
            }
            info.container = Some((id.to_string(), runtime_of_prefix(prefix)));
            info.identity_depth = Some(depth);
        } else if let Some(uid) = pod_uid_of(comp) {
            info.pod_uid = Some(uid);
            // A container above the pod (kind's node) is not this process's container.
            info.container = None;
            info.identity_depth = Some(depth);
        } else if let Some(c) = container_of(comp, parent) {
            info.container = Some(c);
            info.identity_depth = Some(depth);
        } else if is_unit_name(comp) {
            if !RUNTIME_UNITS.contains(&comp) {
                // Possibly delegated: nothing below it is read. In a container or pod already,
                // it is that container's own unit and the identity stays as found.
                if info.pod_uid.is_none() && info.container.is_none() {
                    info.unit = Some(comp.to_string());
                }
                return info;
            }
            unit = Some(comp);
        }
        parent = comp;
    }
    // Units above a pod or container are the runtime's (containerd.service), not the process's.
    if info.pod_uid.is_none() && info.container.is_none() {
        info.unit = unit.map(str::to_string);
    }
    info
}

/// runc's systemd cgroup path `slice:prefix:id`, when written literally as one component
/// (containerd with the systemd driver on cgroup v1).
fn split_runc_systemd(comp: &str) -> Option<(&str, &str, &str)> {
    let mut parts = comp.splitn(3, ':');
    let slice = parts.next()?;
    let prefix = parts.next()?;
    let id = parts.next()?;
    (slice.ends_with(".slice") && !prefix.is_empty() && is_container_id(id))
        .then_some((slice, prefix, id))
}

fn runtime_of_prefix(prefix: &str) -> Option<Runtime> {
    match prefix {
        "docker" => Some(Runtime::Docker),
        "cri-containerd" => Some(Runtime::Containerd),
        "crio" => Some(Runtime::CriO),
        _ => None,
    }
}

/// A container component: a bare ID (the cgroupfs driver; Docker if under `docker/`) or
/// `<runtime>-<id>[.scope]` for a known runtime prefix.
fn container_of(comp: &str, parent: &str) -> Option<(String, Option<Runtime>)> {
    if is_container_id(comp) {
        let runtime = (parent == "docker").then_some(Runtime::Docker);
        return Some((comp.to_string(), runtime));
    }
    let base = comp.strip_suffix(".scope").unwrap_or(comp);
    let (head, tail) = base.split_at_checked(base.len().checked_sub(CONTAINER_ID_LEN + 1)?)?;
    let id = tail.strip_prefix('-')?;
    if !is_container_id(id) {
        return None;
    }
    // An exact prefix: `crio-conmon-<id>` (CRI-O's monitor) is deliberately not a container.
    let runtime = match head {
        "docker" => Some(Runtime::Docker),
        "cri-containerd" => Some(Runtime::Containerd),
        "crio" => Some(Runtime::CriO),
        "libpod" => None, // podman
        _ => return None,
    };
    Some((id.to_string(), runtime))
}

fn is_container_id(s: &str) -> bool {
    s.len() == CONTAINER_ID_LEN && s.bytes().all(is_lower_hex)
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// A pod component: `pod<uid>` (cgroupfs driver) or `<parent>-pod<uid>.slice` (systemd driver).
fn pod_uid_of(comp: &str) -> Option<String> {
    if let Some(uid) = comp.strip_prefix("pod").and_then(canonical_pod_uid) {
        return Some(uid);
    }
    pod_uid_of_slice(comp)
}

fn pod_uid_of_slice(comp: &str) -> Option<String> {
    let (parent, uid) = comp.strip_suffix(".slice")?.rsplit_once("-pod")?;
    if parent.is_empty() {
        return None;
    }
    canonical_pod_uid(uid)
}

/// A pod UID with `_` turned back into `-`: a dashed UUID, or 32 hex digits (a static pod's UID
/// is a hash of its manifest). None for anything else.
fn canonical_pod_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-");
    let b = uid.as_bytes();
    let valid = match b.len() {
        32 => b.iter().all(|&c| is_lower_hex(c)),
        36 => b.iter().enumerate().all(|(i, &c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == b'-'
            } else {
                is_lower_hex(c)
            }
        }),
        _ => false,
    };
    valid.then_some(uid)
}

/// A systemd service or scope name, in the characters systemd allows in unit names.
fn is_unit_name(comp: &str) -> bool {
    let stem = comp
        .strip_suffix(".service")
        .or_else(|| comp.strip_suffix(".scope"));
    stem.is_some_and(|s| !s.is_empty())
        && comp.len() <= UNIT_NAME_MAX
        && comp
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":_.\\@-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER_ID: &str = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d";
    const CID: &str = "f45298cd514d1930c4fe3afc4412e59547f7e3148fddd22ca33cefce046eb830";
    const POD: &str = "dd1bf9d1-241d-47f5-8e25-12de83135812";

    fn info(
        unit: Option<&str>,
        container: Option<&str>,
        runtime: Option<Runtime>,
        pod: Option<&str>,
    ) -> CgroupInfo {
        CgroupInfo {
            systemd_unit: unit.map(str::to_string),
            container_id: container.map(str::to_string),
            runtime,
            pod_uid: pod.map(str::to_string),
        }
    }

    fn none() -> CgroupInfo {
        CgroupInfo::default()
    }

    /// Real `/proc/<pid>/cgroup` files (IDs as published in runtime bug reports and tests).
    fn cases() -> Vec<(&'static str, String, CgroupInfo)> {
        use Runtime::*;
        vec![
            (
                "docker, cgroup v1, cgroupfs driver",
                "12:name=systemd:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
11:hugetlb:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
10:net_prio:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
9:perf_event:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
8:blkio:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
7:net_cls:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
6:freezer:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
5:devices:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
4:memory:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
3:cpuacct:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
2:cpu:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
1:cpuset:/docker/31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30
".into(),
                info(
                    None,
                    Some("31cb02944da7a12196a193cf0e0f6c226d7c453a1db62e65ba98287593a2ee30"),
                    Some(Docker),
                    None,
                ),
            ),
            (
                "docker, cgroup v1, systemd driver",
                format!(
                    "10:devices:/system.slice/docker-{DOCKER_ID}.scope
9:blkio:/system.slice/docker-{DOCKER_ID}.scope
8:memory:/system.slice/docker-{DOCKER_ID}.scope
7:freezer:/system.slice/docker-{DOCKER_ID}.scope
6:perf_event:/system.slice/docker-{DOCKER_ID}.scope
5:hugetlb:/system.slice/docker-{DOCKER_ID}.scope
4:net_cls:/system.slice/docker-{DOCKER_ID}.scope
3:cpuset:/system.slice/docker-{DOCKER_ID}.scope
2:cpuacct,cpu:/system.slice/docker-{DOCKER_ID}.scope
1:name=systemd:/system.slice/docker-{DOCKER_ID}.scope
"
                ),
                info(None, Some(DOCKER_ID), Some(Docker), None),
            ),
            (
                "docker, cgroup v2, systemd driver",
                format!("0::/system.slice/docker-{DOCKER_ID}.scope\n"),
                info(None, Some(DOCKER_ID), Some(Docker), None),
            ),
            (
                "docker, cgroup v1, old Debian layout (bare ID at the root)",
                "10:net_prio:/4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970
9:perf_event:/4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970
2:cpu:/4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970
".into(),
                info(
                    None,
                    Some("4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"),
                    None,
                    None,
                ),
            ),
            (
                "docker in docker (RancherOS): the inner container",
                "9:name=systemd:/docker/a9a5ad238e59234193ee7ec3fcff5e735b3708ea1068826952255b69e3cfa413/docker/ec08435e04266c5ba381fccbb829f626d11d8ddf5f8f547263c7a2d79ab4787a
8:memory:/docker/a9a5ad238e59234193ee7ec3fcff5e735b3708ea1068826952255b69e3cfa413/docker/ec08435e04266c5ba381fccbb829f626d11d8ddf5f8f547263c7a2d79ab4787a
".into(),
                info(
                    None,
                    Some("ec08435e04266c5ba381fccbb829f626d11d8ddf5f8f547263c7a2d79ab4787a"),
                    Some(Docker),
                    None,
                ),
            ),
            (
                "k8s, cgroup v1, cgroupfs driver, besteffort",
                "11:devices:/kubepods/besteffort/pod74ba62da-1a3d-11e7-bb11-080027cb0e22/cb1eadb7abe3a6545e9856411207073277838e1bdc003337c2f8685faeedc32c
10:memory:/kubepods/besteffort/pod74ba62da-1a3d-11e7-bb11-080027cb0e22/cb1eadb7abe3a6545e9856411207073277838e1bdc003337c2f8685faeedc32c
5:cpu,cpuacct:/kubepods/besteffort/pod74ba62da-1a3d-11e7-bb11-080027cb0e22/cb1eadb7abe3a6545e9856411207073277838e1bdc003337c2f8685faeedc32c
3:rdma:/
1:name=systemd:/kubepods/besteffort/pod74ba62da-1a3d-11e7-bb11-080027cb0e22/cb1eadb7abe3a6545e9856411207073277838e1bdc003337c2f8685faeedc32c
".into(),
                info(
                    None,
                    Some("cb1eadb7abe3a6545e9856411207073277838e1bdc003337c2f8685faeedc32c"),
                    None,
                    Some("74ba62da-1a3d-11e7-bb11-080027cb0e22"),
                ),
            ),
            (
                "containerd k8s, cgroup v1, cgroupfs driver, burstable",
                "12:pids:/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/34a2062fd26c805aa8cf814cdfe479322b791f80afb9ea4db02d50375df14b41
11:memory:/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/34a2062fd26c805aa8cf814cdfe479322b791f80afb9ea4db02d50375df14b41
1:name=systemd:/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/34a2062fd26c805aa8cf814cdfe479322b791f80afb9ea4db02d50375df14b41
0::/
".into(),
                info(
                    None,
                    Some("34a2062fd26c805aa8cf814cdfe479322b791f80afb9ea4db02d50375df14b41"),
                    None,
                    Some("2c48913c-b29f-11e7-9350-020968147796"),
                ),
            ),
            (
                "k3s, cgroup v1, cgroupfs driver, guaranteed (no QoS level)",
                "4:memory:/kubepods/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961
1:name=systemd:/kubepods/pod2c48913c-b29f-11e7-9350-020968147796/9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961
".into(),
                info(
                    None,
                    Some("9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"),
                    None,
                    Some("2c48913c-b29f-11e7-9350-020968147796"),
                ),
            ),
            (
                "k8s, a process in a sub-cgroup of its container (kube-proxy)",
                "11:freezer:/kubepods/besteffort/podf8a694f2-7c08-11e9-98da-000c29077430/c04e0a88a1de067f25bece337d4dbb897396e0b623c2a65330850fc9823f1903/kube-proxy
1:name=systemd:/kubepods/besteffort/podf8a694f2-7c08-11e9-98da-000c29077430/c04e0a88a1de067f25bece337d4dbb897396e0b623c2a65330850fc9823f1903/kube-proxy
".into(),
                info(
                    None,
                    Some("c04e0a88a1de067f25bece337d4dbb897396e0b623c2a65330850fc9823f1903"),
                    None,
                    Some("f8a694f2-7c08-11e9-98da-000c29077430"),
                ),
            ),
            (
                "kind: a pod inside a docker node container",
                "4:memory:/docker/93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26/kubepods/besteffort/poda2830d0d-b0f0-4ff0-81b5-0ee4e299cf80/09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6
".into(),
                info(
                    None,
                    Some("09bc3d7ade839efec32b6bec4ec79d099027a668ddba043083ec21d3c3b8f1e6"),
                    None,
                    Some("a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80"),
                ),
            ),
            (
                "kind: a process in the pod but not in a container is not the node container",
                "4:memory:/docker/93529524695bb00d91c1f6dba692ea8d3550c3b94fb2463af7bc9ec82f992d26/kubepods/besteffort/poda2830d0d-b0f0-4ff0-81b5-0ee4e299cf80
".into(),
                info(None, None, None, Some("a2830d0d-b0f0-4ff0-81b5-0ee4e299cf80")),
            ),
            (
                "k8s from another cgroup namespace",
                "0::/../../../burstable/pod095e82d2-713c-467a-a18a-cbb50a075296/6d1234da0f5aa7fa0ccae4c7d2d109929eb9a81694e6357bcd4547ab3985911b\n".into(),
                info(
                    None,
                    Some("6d1234da0f5aa7fa0ccae4c7d2d109929eb9a81694e6357bcd4547ab3985911b"),
                    None,
                    Some("095e82d2-713c-467a-a18a-cbb50a075296"),
                ),
            ),
            (
                "docker k8s, cgroup v1, systemd driver, besteffort",
                "11:cpuset:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod045b1e35_7f13_11e7_ac42_0050568ffca0.slice/docker-b5b6f2da8008be266864f896f93789762b2ce50792114a5c5f2cc3315af0bc70.scope
2:cpuacct,cpu:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod045b1e35_7f13_11e7_ac42_0050568ffca0.slice/docker-b5b6f2da8008be266864f896f93789762b2ce50792114a5c5f2cc3315af0bc70.scope
1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod045b1e35_7f13_11e7_ac42_0050568ffca0.slice/docker-b5b6f2da8008be266864f896f93789762b2ce50792114a5c5f2cc3315af0bc70.scope
".into(),
                info(
                    None,
                    Some("b5b6f2da8008be266864f896f93789762b2ce50792114a5c5f2cc3315af0bc70"),
                    Some(Docker),
                    Some("045b1e35-7f13-11e7-ac42-0050568ffca0"),
                ),
            ),
            (
                "containerd k8s, cgroup v1, systemd driver (Bottlerocket)",
                format!(
                    "11:cpuset:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poddd1bf9d1_241d_47f5_8e25_12de83135812.slice/cri-containerd-{CID}.scope
4:cpu,cpuacct:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poddd1bf9d1_241d_47f5_8e25_12de83135812.slice/cri-containerd-{CID}.scope
1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-poddd1bf9d1_241d_47f5_8e25_12de83135812.slice/cri-containerd-{CID}.scope
"
                ),
                info(None, Some(CID), Some(Containerd), Some(POD)),
            ),
            (
                "containerd k8s, cgroup v2, systemd driver, burstable",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope\n",
                    POD.replace('-', "_")
                ),
                info(None, Some(CID), Some(Containerd), Some(POD)),
            ),
            (
                "containerd k8s, cgroup v2, systemd driver, guaranteed",
                format!(
                    "0::/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CID}.scope\n",
                    POD.replace('-', "_")
                ),
                info(None, Some(CID), Some(Containerd), Some(POD)),
            ),
            (
                "containerd k8s, static pod (32-hex UID)",
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod187bff14cccb94f179e943eacce55bb3.slice/cri-containerd-c203a2647ef1ad78e990157c50331f3b6ef0b03336cf08535d6bf7faa5421415.scope\n".into(),
                info(
                    None,
                    Some("c203a2647ef1ad78e990157c50331f3b6ef0b03336cf08535d6bf7faa5421415"),
                    Some(Containerd),
                    Some("187bff14cccb94f179e943eacce55bb3"),
                ),
            ),
            (
                "kind on cgroup v2: kubelet-kubepods slices inside a docker node scope",
                format!(
                    "0::/system.slice/docker-{DOCKER_ID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-{CID}.scope\n",
                    POD.replace('-', "_")
                ),
                info(None, Some(CID), Some(Containerd), Some(POD)),
            ),
            (
                "containerd k8s, cgroup v1, systemd driver, runc `slice:prefix:id` form",
                "11:devices:/system.slice/containerd.service/kubepods-pod87a18a64_b74a_454a_b10b_a4a36059d0a3.slice:cri-containerd:05c48c82caff3be3d7f1e896981dd410e81487538936914f32b624d168de9db0
1:name=systemd:/system.slice/containerd.service/kubepods-pod87a18a64_b74a_454a_b10b_a4a36059d0a3.slice:cri-containerd:05c48c82caff3be3d7f1e896981dd410e81487538936914f32b624d168de9db0
".into(),
                info(
                    None,
                    Some("05c48c82caff3be3d7f1e896981dd410e81487538936914f32b624d168de9db0"),
                    Some(Containerd),
                    Some("87a18a64-b74a-454a-b10b-a4a36059d0a3"),
                ),
            ),
            (
                "`slice:prefix:id` form at the root, besteffort",
                "9:cpuset:/kubepods-besteffort-pod30556cce_0f92_11eb_b36d_02623cf324c8.slice:cri-containerd:c688c856b21cfb29c1dbf6c14793435e44a1299dfc12add33283239bffed2620\n".into(),
                info(
                    None,
                    Some("c688c856b21cfb29c1dbf6c14793435e44a1299dfc12add33283239bffed2620"),
                    Some(Containerd),
                    Some("30556cce-0f92-11eb-b36d-02623cf324c8"),
                ),
            ),
            (
                "cri-o k8s, cgroup v1, systemd driver, guaranteed",
                format!(
                    "11:cpu,cpuacct:/kubepods.slice/kubepods-pod{pod}.slice/crio-{CID}.scope
10:memory:/kubepods.slice/kubepods-pod{pod}.slice/crio-{CID}.scope
1:name=systemd:/kubepods.slice/kubepods-pod{pod}.slice/crio-{CID}.scope
",
                    pod = POD.replace('-', "_")
                ),
                info(None, Some(CID), Some(CriO), Some(POD)),
            ),
            (
                "cri-o k8s, cgroup v2, systemd driver, crun's `container` sub-cgroup",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-{CID}.scope/container\n",
                    POD.replace('-', "_")
                ),
                info(None, Some(CID), Some(CriO), Some(POD)),
            ),
            (
                "cri-o k8s, cgroupfs driver",
                format!("0::/kubepods/burstable/pod{POD}/crio-{CID}\n"),
                info(None, Some(CID), Some(CriO), Some(POD)),
            ),
            (
                "cri-o's conmon is in the pod but not the container",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-conmon-{CID}.scope\n",
                    POD.replace('-', "_")
                ),
                info(None, None, None, Some(POD)),
            ),
            (
                "cri-o outside a pod (KubeEdge), another cgroup namespace",
                "0::/../crio-45490e76e0878aaa4d9808f7d2eefba37f093c3efbba9838b6d8ab804d9bd814.scope\n".into(),
                info(
                    None,
                    Some("45490e76e0878aaa4d9808f7d2eefba37f093c3efbba9838b6d8ab804d9bd814"),
                    Some(CriO),
                    None,
                ),
            ),
            (
                "rootless podman, cgroup v2: below the user manager, names are the user's",
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n"
                ),
                info(Some("user@1000.service"), None, None, None),
            ),
            (
                "a user's cgroup named like another pod's container is not that pod",
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/x/kubepods/besteffort/pod{POD}/{CID}\n"
                ),
                info(Some("user@1000.service"), None, None, None),
            ),
            (
                "a user's cgroup named like a system service is the user manager",
                "0::/user.slice/user-1000.slice/user@1000.service/system.slice/nginx.service\n".into(),
                info(Some("user@1000.service"), None, None, None),
            ),
            (
                "systemd service, cgroup v2",
                "0::/system.slice/nginx.service\n".into(),
                info(Some("nginx.service"), None, None, None),
            ),
            (
                "templated service, cgroup v2",
                "0::/system.slice/system-getty.slice/getty@tty1.service\n".into(),
                info(Some("getty@tty1.service"), None, None, None),
            ),
            (
                "systemd service, cgroup v1: the name=systemd line, not a controller's",
                "11:memory:/system.slice
7:cpu,cpuacct:/system.slice/other.service
1:name=systemd:/system.slice/sshd.service
".into(),
                info(Some("sshd.service"), None, None, None),
            ),
            (
                "systemd hybrid: the v2 line wins",
                "1:name=systemd:/system.slice/cron.service
0::/system.slice/cron.service
".into(),
                info(Some("cron.service"), None, None, None),
            ),
            (
                "cgroup v1 without systemd: no unit from a controller line",
                "4:memory:/system.slice/foo.service\n".into(),
                none(),
            ),
            (
                "user service under the user manager: the manager is the system's unit",
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service\n".into(),
                info(Some("user@1000.service"), None, None, None),
            ),
            (
                "user session scope",
                "0::/user.slice/user-1000.slice/session-3.scope\n".into(),
                info(Some("session-3.scope"), None, None, None),
            ),
            (
                "PID 1",
                "0::/init.scope\n".into(),
                info(Some("init.scope"), None, None, None),
            ),
            (
                "a delegated service's cgroup named like a docker container is that service",
                format!("0::/system.slice/build.service/docker-{DOCKER_ID}.scope\n"),
                info(Some("build.service"), None, None, None),
            ),
            (
                "the same with the cgroupfs layout",
                format!("0::/system.slice/build.service/docker/{DOCKER_ID}\n"),
                info(Some("build.service"), None, None, None),
            ),
            (
                "a delegated service's cgroups named like a pod's",
                format!(
                    "0::/system.slice/ci.service/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{CID}.scope\n",
                    POD.replace('-', "_")
                ),
                info(Some("ci.service"), None, None, None),
            ),
            (
                "a delegated transient scope (systemd-run --scope -p Delegate=yes)",
                format!("0::/system.slice/run-r1f2e.scope/kubepods/besteffort/pod{POD}/{CID}\n"),
                info(Some("run-r1f2e.scope"), None, None, None),
            ),
            (
                "cgroup v1: a delegated service's subtree in every hierarchy",
                format!(
                    "4:memory:/system.slice/foo.service/docker-{DOCKER_ID}.scope
1:name=systemd:/system.slice/foo.service/docker-{DOCKER_ID}.scope
"
                ),
                info(Some("foo.service"), None, None, None),
            ),
            (
                "systemd inside a docker container: the container, not its unit",
                format!("0::/system.slice/docker-{DOCKER_ID}.scope/system.slice/nginx.service\n"),
                info(None, Some(DOCKER_ID), Some(Docker), None),
            ),
            (
                "a unit inside a container ends the walk: names below it are not read",
                format!(
                    "0::/system.slice/docker-{DOCKER_ID}.scope/system.slice/evil.service/docker-{CID}.scope\n"
                ),
                info(None, Some(DOCKER_ID), Some(Docker), None),
            ),
            (
                "containerd itself is a unit; its children in a container are not",
                "0::/system.slice/containerd.service\n".into(),
                info(Some("containerd.service"), None, None, None),
            ),
            ("cgroup v2 root", "0::/\n".into(), none()),
            (
                "cgroup v1 host process, everything at the root",
                "14:name=dsystemd:/
13:name=systemd:/
12:pids:/
1:cpuset:/
"
                .into(),
                none(),
            ),
            (
                "this sandbox's own file",
                "9:name=systemd:/
4:memory:/process_api/d4bc3075de2fd9db3693506654df0532
0::/
"
                .into(),
                none(),
            ),
            ("empty", String::new(), none()),
            (
                "garbage",
                "\u{0}\u{ff}::::\nnot a cgroup line\n::\n0:\nx::/docker/zzz\n:/a\n-1::/system.slice/a.service\n0::relative/x.service\n"
                    .into(),
                none(),
            ),
            (
                "near misses: short, uppercase or non-hex IDs, a bad pod UID, unknown prefixes",
                format!(
                    "0::/docker/{}/x-{CID}/crio-{}/pod{}/kubepods-podnotauuid.slice/-pod{}.slice\n",
                    &CID[1..],
                    CID.to_uppercase(),
                    &POD[1..],
                    POD.replace('-', "_"),
                ),
                none(),
            ),
        ]
    }

    #[test]
    fn parses_real_cgroup_files() {
        for (name, text, want) in cases() {
            assert_eq!(parse(&text), want, "{name}");
            // CRLF endings and a missing final newline change nothing.
            assert_eq!(parse(text.trim_end()), want, "{name} (no final newline)");
            assert_eq!(parse(&text.replace('\n', "\r\n")), want, "{name} (CRLF)");
        }
    }

    #[test]
    fn lines_that_disagree_give_no_container() {
        let text = format!("2:memory:/docker/{DOCKER_ID}\n1:cpu:/docker/{CID}\n");
        assert_eq!(parse(&text), none());
        let text = format!(
            "2:memory:/kubepods/pod{POD}/{CID}\n1:cpu:/kubepods/pod2c48913c-b29f-11e7-9350-020968147796/{CID}\n"
        );
        assert_eq!(parse(&text), none());
        // Lines without a container (rdma:/) do not count as disagreeing.
        let text = format!("3:rdma:/\n2:memory:/docker/{DOCKER_ID}\n");
        assert_eq!(parse(&text).container_id.as_deref(), Some(DOCKER_ID));
        // Two pods and no container: no pod.
        let text = format!(
            "2:memory:/kubepods/pod{POD}\n1:cpu:/kubepods/pod2c48913c-b29f-11e7-9350-020968147796\n"
        );
        assert_eq!(parse(&text), none());
    }

    #[test]
    fn identity_parents_are_the_cgroups_above_the_container() {
        let pod = POD.replace('-', "_");
        let text = format!(
            "12:pids:/kubepods/besteffort/pod{POD}/{CID}
1:name=systemd:/kubepods.slice/kubepods-pod{pod}.slice/cri-containerd-{CID}.scope/container
0::/system.slice/docker-{DOCKER_ID}.scope
3:rdma:/
2:memory:/kubepods/pod{POD}
"
        );
        assert_eq!(
            identity_parents(&text),
            [
                ("pids".to_string(), format!("/kubepods/besteffort/pod{POD}")),
                (
                    "name=systemd".to_string(),
                    format!("/kubepods.slice/kubepods-pod{pod}.slice")
                ),
                (String::new(), "/system.slice".to_string()),
                ("memory".to_string(), "/kubepods".to_string()),
            ]
        );
        // A delegated unit's subtree names nothing, so there is nothing to check.
        let text = format!("0::/system.slice/build.service/docker-{DOCKER_ID}.scope\n");
        assert!(identity_parents(&text).is_empty());
    }

    #[test]
    fn mountinfo_gives_the_hierarchies() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime shared:5 - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,release_agent=/x,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
42 31 0:38 /kubepods /mnt/kube rw - cgroup2 cgroup2 rw
43 31 0:39 / /mnt/with\\040space rw - cgroup cgroup rw,memory
";
        let m = CgroupMounts::from_mountinfo(text);
        assert_eq!(m.mount_point(""), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(
            m.mount_point("cpu,cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(
            m.mount_point("cpuacct"),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(
            m.mount_point("pids"),
            Some(Path::new("/sys/fs/cgroup/pids"))
        );
        assert_eq!(
            m.mount_point("name=systemd"),
            Some(Path::new("/sys/fs/cgroup/systemd"))
        );
        assert_eq!(m.mount_point("memory"), Some(Path::new("/mnt/with space")));
        assert_eq!(m.mount_point("blkio"), None);
        // A pure v2 host; garbage lines are skipped.
        let m = CgroupMounts::from_mountinfo(
            "garbage\n1 2 3\n - x\n35 24 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        );
        assert_eq!(m.mount_point(""), Some(Path::new("/sys/fs/cgroup")));
        assert_eq!(m.mount_point("pids"), None);
        assert_eq!(CgroupMounts::from_mountinfo(""), CgroupMounts::default());
    }

    /// A fake cgroup v2 hierarchy in a temp dir (owned by root: tests run as root), and the
    /// mounts that point at it.
    fn fake_hierarchy() -> (tempfile::TempDir, CgroupMounts) {
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mounts = CgroupMounts::from_mountinfo(&format!(
            "1 2 0:1 / {} rw - cgroup2 cgroup2 rw\n",
            dir.path().display()
        ));
        (dir, mounts)
    }

    #[test]
    fn ownership_of_the_cgroups_above_a_container() {
        use std::os::unix::fs::PermissionsExt;
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (to give directories to another user)"
        );
        let (root, mounts) = fake_hierarchy();
        let mk = |p: &str| {
            let d = root.path().join(p.trim_start_matches('/'));
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let line = |path: &str| format!("0::{path}\n");
        // Root's all the way: the container counts.
        mk(&format!("/system.slice/docker-{DOCKER_ID}.scope"));
        let docker = line(&format!("/system.slice/docker-{DOCKER_ID}.scope"));
        assert_eq!(mounts.verify(&docker), Ownership::Root);

        // A directory handed to a user (chowned, as systemd does for Delegate=yes), even with a
        // name the path rule lets through.
        let handed = mk("/handed");
        nix::unistd::chown(&handed, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        mk(&format!("/handed/docker/{DOCKER_ID}"));
        let fake = line(&format!("/handed/docker/{DOCKER_ID}"));
        assert_eq!(parse(&fake).container_id.as_deref(), Some(DOCKER_ID));
        assert_eq!(mounts.verify(&fake), Ownership::Delegated(handed.clone()));

        // Writable by a group or by anyone: as good as handed over.
        let open = mk("/open.slice");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o775)).unwrap();
        mk(&format!("/open.slice/docker-{DOCKER_ID}.scope"));
        let open_line = line(&format!("/open.slice/docker-{DOCKER_ID}.scope"));
        assert_eq!(mounts.verify(&open_line), Ownership::Delegated(open));

        // The container's own cgroup may be someone else's (runc gives it to a user-namespaced
        // container's root): only the directories above it count.
        let own = mk(&format!("/kubepods/besteffort/pod{POD}/{CID}"));
        nix::unistd::chown(&own, Some(nix::unistd::Uid::from_raw(100_000)), None).unwrap();
        let pod_line = line(&format!("/kubepods/besteffort/pod{POD}/{CID}"));
        assert_eq!(mounts.verify(&pod_line), Ownership::Root);

        // Any hierarchy that names a container may refuse it; one that names none does not count.
        let both = format!("{docker}5:pids:/\n");
        assert_eq!(mounts.verify(&both), Ownership::Root);
        let mixed = format!("{fake}{docker}");
        assert!(matches!(mounts.verify(&mixed), Ownership::Delegated(_)));

        // What cannot be seen is unknown: gone, another cgroup namespace, an unmounted hierarchy.
        let gone = line(&format!("/nothere/docker/{DOCKER_ID}"));
        assert_eq!(mounts.verify(&gone), Ownership::Unknown);
        let other_ns = line(&format!("/../../handed/docker/{DOCKER_ID}"));
        assert_eq!(mounts.verify(&other_ns), Ownership::Unknown);
        let v1 = format!("4:memory:/handed/docker/{DOCKER_ID}\n");
        assert_eq!(mounts.verify(&v1), Ownership::Unknown);
        assert_eq!(CgroupMounts::default().verify(&fake), Ownership::Unknown);
        // No container or pod: nothing to check.
        assert_eq!(mounts.verify(&line("/handed")), Ownership::Unknown);
    }

    #[test]
    fn never_panics_on_odd_input() {
        let long = format!("0::/{}\n", "a/".repeat(10_000));
        let mut odd = vec![
            long,
            "0::/é".into(),
            "0::/a.slice:b:".into(),
            "0::/:::".into(),
            format!("0::/é{CID}.scope"),
            format!("0::/{}-{CID}", "é".repeat(3)),
            format!("0::/kubepods-pod{}.slice", "é".repeat(18)),
        ];
        // Every prefix of a real file, cut anywhere (including inside a multi-byte char).
        let real =
            format!("0::/kubepods.slice/kubepods-podé{POD}.slice/cri-containerd-{CID}.scope");
        odd.extend((0..real.len()).filter_map(|i| real.get(..i).map(str::to_string)));
        for text in odd {
            let _ = parse(&text).selectors();
        }
    }

    fn strings(info: &CgroupInfo) -> Vec<String> {
        info.selectors().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn selectors() {
        use Runtime::*;
        assert_eq!(
            strings(&info(Some("nginx.service"), None, None, None)),
            ["systemd:id:nginx.service"]
        );
        assert_eq!(
            strings(&info(None, Some(CID), Some(Containerd), Some(POD))),
            [
                format!("k8s:pod-uid:{POD}"),
                format!("k8s:container-id:{CID}")
            ]
        );
        // Docker under Kubernetes is still a pod.
        assert_eq!(
            strings(&info(None, Some(CID), Some(Docker), Some(POD))),
            [
                format!("k8s:pod-uid:{POD}"),
                format!("k8s:container-id:{CID}")
            ]
        );
        assert_eq!(
            strings(&info(None, None, None, Some(POD))),
            [format!("k8s:pod-uid:{POD}")]
        );
        assert_eq!(
            strings(&info(None, Some(DOCKER_ID), Some(Docker), None)),
            [format!("docker:id:{DOCKER_ID}")]
        );
        for runtime in [None, Some(Containerd), Some(CriO)] {
            assert_eq!(
                strings(&info(None, Some(CID), runtime, None)),
                [format!("container:id:{CID}")]
            );
        }
        assert!(none().selectors().is_empty());
    }

    #[test]
    fn selectors_from_parsed_files() {
        for (name, text, want) in cases() {
            let got = parse(&text).selectors();
            assert_eq!(got, want.selectors(), "{name}");
        }
        let pod_line = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            POD.replace('-', "_")
        );
        assert_eq!(
            strings(&parse(&pod_line)),
            [
                format!("k8s:pod-uid:{POD}"),
                format!("k8s:container-id:{CID}")
            ]
        );
    }

    #[test]
    fn unit_names() {
        for ok in [
            "a.service",
            "getty@tty1.service",
            "session-3.scope",
            "x\\x2dy.service",
        ] {
            assert!(is_unit_name(ok), "{ok}");
        }
        for bad in [
            ".service",
            ".scope",
            "a.slice",
            "a.mount",
            "a b.service",
            "é.service",
            "a.service/",
            "",
        ] {
            assert!(!is_unit_name(bad), "{bad}");
        }
        assert!(!is_unit_name(&format!(
            "{}.service",
            "a".repeat(UNIT_NAME_MAX)
        )));
    }

    #[test]
    fn pod_uids() {
        assert_eq!(canonical_pod_uid(POD).as_deref(), Some(POD));
        assert_eq!(
            canonical_pod_uid(&POD.replace('-', "_")).as_deref(),
            Some(POD)
        );
        for bad in [
            "",
            &POD[1..],
            &POD.to_uppercase(),
            "dd1bf9d1241d-47f5-8e25-12de83135812x",
            "187bff14cccb94f179e943eacce55bbg",
        ] {
            assert_eq!(canonical_pod_uid(bad), None, "{bad}");
        }
    }
}
