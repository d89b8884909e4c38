//! Reaching the Kubernetes API server, shared by `k8s_psat` node attestation and the bundle
//! publisher: the in-cluster defaults a pod gets (`KUBERNETES_SERVICE_HOST`/`_PORT`, the
//! service-account token, CA and namespace files) and the resolution of the
//! `api_server_url` / `api_token_file` / `api_ca_file` keys every such config section has.

use std::path::PathBuf;

use sigil::config::ConfigError;

/// In-cluster defaults: where a pod finds its API server credentials.
pub const IN_CLUSTER_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// In-cluster default CA of the API server.
pub const IN_CLUSTER_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The namespace the pod runs in.
pub const IN_CLUSTER_NAMESPACE_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT` when running in a pod.
pub fn in_cluster_api_server_url() -> Option<String> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .ok()
        .filter(|h| !h.is_empty())?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "443".into());
    Some(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

/// The pod's namespace ([`IN_CLUSTER_NAMESPACE_FILE`]), when running in a pod.
pub fn in_cluster_namespace() -> Option<String> {
    std::fs::read_to_string(IN_CLUSTER_NAMESPACE_FILE)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// What the environment says about the cluster the server runs in (nothing outside a pod).
/// Detected once by the config loader and passed in, so resolution is testable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InCluster {
    /// [`in_cluster_api_server_url`].
    pub api_server_url: Option<String>,
    /// [`in_cluster_namespace`].
    pub namespace: Option<String>,
}

impl InCluster {
    /// Reads the environment and the service-account namespace file.
    pub fn detect() -> Self {
        Self {
            api_server_url: in_cluster_api_server_url(),
            namespace: in_cluster_namespace(),
        }
    }
}

/// `url` if it is `https://host…`, without a trailing `/`; the error names `key`.
pub fn https_url(key: &str, url: &str) -> Result<String, ConfigError> {
    let parsed: hyper::Uri = url
        .parse()
        .map_err(|e| ConfigError::unusable(key.to_string(), url, e))?;
    if parsed.scheme_str() != Some("https") || parsed.host().is_none() {
        return Err(ConfigError::invalid(
            key.to_string(),
            url,
            "expected an https:// URL",
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// How to reach one API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServerAccess {
    /// Base URL, `https://…` without a trailing `/`.
    pub url: String,
    /// Bearer token file (read for every call: it rotates).
    pub token_file: PathBuf,
    /// PEM CA of the API server.
    pub ca_file: PathBuf,
}

/// Resolves a section's `api_server_url`, `api_token_file` and `api_ca_file` (`section` is the
/// key prefix for messages, e.g. `bundle_publisher.k8s_configmap`): the URL defaults to
/// `in_cluster_url` (required outside a pod: `why` says what it is for), the files to the pod's
/// service-account token and CA.
pub fn resolve_api_server(
    section: &str,
    api_server_url: Option<&str>,
    api_token_file: Option<PathBuf>,
    api_ca_file: Option<PathBuf>,
    in_cluster_url: Option<&str>,
    why: &str,
) -> Result<ApiServerAccess, ConfigError> {
    let key = |k: &str| format!("{section}.{k}");
    let url = match api_server_url.or(in_cluster_url) {
        Some(u) => https_url(&key("api_server_url"), u)?,
        None => {
            return Err(ConfigError::missing(
                key("api_server_url"),
                format!("set it when running outside a Kubernetes pod ({why})"),
            ))
        }
    };
    let token_file = api_token_file.unwrap_or_else(|| IN_CLUSTER_TOKEN_FILE.into());
    let ca_file = api_ca_file.unwrap_or_else(|| IN_CLUSTER_CA_FILE.into());
    for (k, p) in [("api_token_file", &token_file), ("api_ca_file", &ca_file)] {
        if p.as_os_str().is_empty() {
            return Err(ConfigError::rule(key(k), "the path is empty"));
        }
    }
    Ok(ApiServerAccess {
        url,
        token_file,
        ca_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_server_defaults_and_errors() -> anyhow::Result<()> {
        let a = resolve_api_server("s", None, None, None, Some("https://10.0.0.1:443/"), "x")?;
        assert_eq!(a.url, "https://10.0.0.1:443");
        assert_eq!(a.token_file, PathBuf::from(IN_CLUSTER_TOKEN_FILE));
        assert_eq!(a.ca_file, PathBuf::from(IN_CLUSTER_CA_FILE));
        let a = resolve_api_server(
            "s",
            Some("https://api:6443"),
            Some("/t".into()),
            Some("/c".into()),
            Some("https://10.0.0.1:443"),
            "x",
        )?;
        assert_eq!(a.url, "https://api:6443");
        assert_eq!(a.token_file, PathBuf::from("/t"));
        assert_eq!(a.ca_file, PathBuf::from("/c"));
        let err = resolve_api_server("s", None, None, None, None, "for y").expect_err("no URL");
        assert!(
            err.to_string().contains("s.api_server_url is required")
                && err.to_string().contains("for y"),
            "{err}"
        );
        let err = resolve_api_server("s", Some("http://api"), None, None, None, "x")
            .expect_err("plain http");
        assert!(err.to_string().contains("s.api_server_url"), "{err}");
        let err = resolve_api_server("s", Some("https://api"), Some("".into()), None, None, "x")
            .expect_err("empty path");
        assert!(err.to_string().contains("s.api_token_file"), "{err}");
        Ok(())
    }
}
