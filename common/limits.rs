//! Process resource limits.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// The open-files limit before and after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// Soft limit found at start.
    pub before: u64,
    /// Soft limit now.
    pub after: u64,
}

/// Raises the soft limit on open files to the hard limit, as Go programs (SPIRE among them)
/// do at start. Every Workload API client and every agent connection holds a descriptor, and
/// systemd and container runtimes commonly start services with a soft limit of 1,024, which
/// would cap an agent at about a thousand workloads.
pub fn raise_open_files_limit() -> Result<OpenFiles, nix::Error> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(OpenFiles {
            before: soft,
            after: soft,
        });
    }
    // The kernel refuses a soft limit above fs.nr_open (an "unlimited" hard limit, say): the
    // error is returned and the limit stays as it was.
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(OpenFiles {
        before: soft,
        after: getrlimit(Resource::RLIMIT_NOFILE)?.0,
    })
}

/// [`raise_open_files_limit`] at a program's start, logged; a failure is a warning, not fatal.
pub fn raise_open_files_limit_logged() {
    match raise_open_files_limit() {
        Ok(l) if l.after > l.before => {
            tracing::info!(
                before = l.before,
                after = l.after,
                "open files limit raised"
            );
        }
        Ok(l) => tracing::debug!(limit = l.after, "open files limit"),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot raise the open files limit; every client connection holds one descriptor (raise LimitNOFILE / the container's nofile limit)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_reaches_the_hard_limit() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Start from a low soft limit, as under systemd.
        let low = hard.min(256);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        let r = raise_open_files_limit().unwrap();
        assert_eq!(r.before, low);
        assert_eq!(r.after, hard);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
        // Raising again changes nothing.
        let again = raise_open_files_limit().unwrap();
        assert_eq!((again.before, again.after), (hard, hard));
    }
}
