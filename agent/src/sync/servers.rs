//! The sigil-servers an agent may talk to, and which one it talks to now.
//!
//! Servers sharing one datastore are interchangeable for an agent: its SVID, the entries and the
//! trust bundle are the same on each. The agent is configured with one or more `HOST:PORT`
//! addresses; a host name that resolves to several IP addresses counts as one server per
//! address. The agent uses one at a time ([`Servers::current`]); when a session with it fails
//! for a reason another server may not share (unreachable, stream broken, keepalive timeout),
//! the worker calls [`Servers::failed`] and the next session goes to the next address, wrapping
//! around. Names are resolved when the rotation starts and again each time it wraps, so DNS
//! changes are followed; a name that does not resolve is kept as it is (connecting to it then
//! fails with the resolver's error, and the rotation moves on).

use std::sync::Mutex;

/// Where sessions go after a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    /// The address used from now on.
    pub next: String,
    /// The rotation went round to its first address again: every server was tried (the caller
    /// backs off before the next round).
    pub wrapped: bool,
}

/// The configured server addresses and the rotation over their resolved addresses.
#[derive(Debug)]
pub struct Servers {
    configured: Vec<String>,
    rotation: Mutex<Rotation>,
}

#[derive(Debug)]
struct Rotation {
    /// `ip:port` (or a `host:port` that did not resolve), in configured order.
    targets: Vec<String>,
    index: usize,
    /// Resolved since the last wrap-around.
    resolved: bool,
}

impl Servers {
    /// The servers at `addresses` (`HOST:PORT`, at least one; checked by the configuration);
    /// unresolved until [`Servers::resolve`] or the first failure.
    pub fn new(addresses: Vec<String>) -> Self {
        Self {
            rotation: Mutex::new(Rotation {
                targets: addresses.clone(),
                index: 0,
                resolved: false,
            }),
            configured: addresses,
        }
    }

    /// The addresses as configured.
    pub fn configured(&self) -> &[String] {
        &self.configured
    }

    /// The address to connect to now.
    pub fn current(&self) -> String {
        let r = self.lock();
        r.targets
            .get(r.index)
            .or_else(|| self.configured.first())
            .cloned()
            .unwrap_or_default()
    }

    /// Number of addresses in the rotation now.
    pub fn len(&self) -> usize {
        self.lock().targets.len()
    }

    /// True if there is no address at all (never, once configured).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves the configured names into the rotation, starting over at the first address.
    pub async fn resolve(&self) {
        let targets = resolve_all(&self.configured).await;
        let mut r = self.lock();
        r.targets = targets;
        r.index = 0;
        r.resolved = true;
    }

    /// The session with `address` failed: unless the rotation moved on already (another
    /// caller), the next session uses the next address.
    pub async fn failed(&self, address: &str) -> Failover {
        {
            let mut r = self.lock();
            if r.targets.get(r.index).map(String::as_str) != Some(address) {
                let next = r.targets.get(r.index).cloned().unwrap_or_default();
                return Failover {
                    next,
                    wrapped: false,
                };
            }
            if r.resolved && r.index + 1 < r.targets.len() {
                r.index += 1;
                return Failover {
                    next: r.targets[r.index].clone(),
                    wrapped: false,
                };
            }
        }
        // Around once (or never resolved): look the names up again, and go on after the
        // address that failed when it is still among them.
        let targets = resolve_all(&self.configured).await;
        let mut r = self.lock();
        let next = targets
            .iter()
            .position(|t| t == address)
            .map_or(0, |i| (i + 1) % targets.len().max(1));
        r.targets = targets;
        r.index = next;
        r.resolved = true;
        Failover {
            next: r.targets.get(next).cloned().unwrap_or_default(),
            wrapped: next == 0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rotation> {
        self.rotation.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every configured address resolved (duplicates dropped, order kept).
async fn resolve_all(configured: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for address in configured {
        for t in resolve(address).await {
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    if out.is_empty() {
        out = configured.to_vec();
    }
    out
}

/// `host:port` as `ip:port` addresses; an IP literal as itself; a name that does not resolve as
/// itself (the connection attempt reports why).
async fn resolve(address: &str) -> Vec<String> {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_ok() {
        return vec![address.to_string()];
    }
    match tokio::net::lookup_host(address).await {
        Ok(addrs) => {
            let mut v: Vec<String> = Vec::new();
            for a in addrs {
                let s = a.to_string();
                if !v.contains(&s) {
                    v.push(s);
                }
            }
            if v.is_empty() {
                vec![address.to_string()]
            } else {
                v
            }
        }
        Err(e) => {
            tracing::debug!(server = address, error = %e, "resolving the server address failed");
            vec![address.to_string()]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_move_through_the_addresses_and_wrap_around() {
        let s = Servers::new(vec!["127.0.0.1:1".into(), "[::1]:2".into()]);
        assert_eq!(s.current(), "127.0.0.1:1");
        s.resolve().await;
        assert_eq!(s.len(), 2);
        let to = |next: &str, wrapped| Failover {
            next: next.into(),
            wrapped,
        };
        assert_eq!(s.failed("127.0.0.1:1").await, to("[::1]:2", false));
        // A stale report (another session already moved on) changes nothing.
        assert_eq!(s.failed("127.0.0.1:1").await, to("[::1]:2", false));
        assert_eq!(s.current(), "[::1]:2");
        assert_eq!(s.failed("[::1]:2").await, to("127.0.0.1:1", true));
        assert_eq!(s.failed("127.0.0.1:1").await, to("[::1]:2", false));
        // One server: every failure is a full round.
        let one = Servers::new(vec!["127.0.0.1:1".into()]);
        assert_eq!(one.failed("127.0.0.1:1").await, to("127.0.0.1:1", true));
        assert_eq!(one.failed("127.0.0.1:1").await, to("127.0.0.1:1", true));
    }

    #[tokio::test]
    async fn a_name_with_several_addresses_is_one_server_per_address() {
        // `localhost` resolves to 127.0.0.1 and often ::1 as well; every address is tried.
        let s = Servers::new(vec!["localhost:8081".into()]);
        s.resolve().await;
        let resolved = resolve("localhost:8081").await;
        assert!(
            resolved.contains(&"127.0.0.1:8081".to_string()),
            "{resolved:?}"
        );
        assert_eq!(s.len(), resolved.len());
        let mut seen = vec![s.current()];
        for _ in 1..resolved.len() {
            let current = s.current();
            seen.push(s.failed(&current).await.next);
        }
        seen.sort();
        let mut want = resolved.clone();
        want.sort();
        assert_eq!(seen, want);
        // A name that does not resolve stays as given.
        assert_eq!(
            resolve("no-such-host.invalid:1").await,
            vec!["no-such-host.invalid:1".to_string()]
        );
    }

    #[tokio::test]
    async fn the_first_failure_resolves_names_and_moves_past_the_failed_address() {
        let s = Servers::new(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()]);
        // Not resolved yet: the failure resolves and moves on from the failed address.
        assert_eq!(s.failed("127.0.0.1:1").await.next, "127.0.0.1:2");
        assert_eq!(s.failed("127.0.0.1:2").await.next, "127.0.0.1:1");
    }
}
