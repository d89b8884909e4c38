//! `sigil-agent helper` configuration: a TOML file (`--config`) with spiffe-helper's keys, each
//! overridable by a flag (flag > file > default). Unknown keys are an error.

use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use nix::sys::signal::Signal;
use serde::Deserialize;
use sigil::logging::LogFormat;

use super::files::check_name;

/// Default mode of the certificate and bundle files.
pub const DEFAULT_CERT_FILE_MODE: u32 = 0o644;
/// Default mode of the private key file.
pub const DEFAULT_KEY_FILE_MODE: u32 = 0o600;
/// Default mode of JWT-SVID and JWT bundle files.
pub const DEFAULT_JWT_FILE_MODE: u32 = 0o600;

/// Why a helper configuration is refused; each message names the key and what to do.
#[derive(Debug, thiserror::Error)]
pub enum HelperConfigError {
    /// The file could not be read.
    #[error("reading the helper config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not TOML, an unknown key or a value of the wrong type.
    #[error("helper config {}: {}", path.display(), source.to_string().trim_end())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error (it names the key and the line).
        #[source]
        source: toml::de::Error,
    },
    /// A required key is missing.
    #[error("{key} is required: {hint}")]
    Missing {
        /// The key.
        key: &'static str,
        /// What it is and how to give it.
        hint: &'static str,
    },
    /// A key has a value that cannot be used.
    #[error("invalid {key} {value:?}: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// Keys that cannot be used together, or one that needs another.
    #[error("{0}")]
    Conflict(String),
}

fn invalid(
    key: impl Into<String>,
    value: impl ToString,
    reason: impl Into<String>,
) -> HelperConfigError {
    HelperConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// `cmd_args`: one string split at spaces (spiffe-helper's form) or a list of arguments.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum CmdArgs {
    /// `"-p /srv -c nginx.conf"`: split at spaces; double quotes group.
    Line(String),
    /// `["-p", "/srv", "-c", "nginx.conf"]`.
    List(Vec<String>),
}

/// A file mode as written: an octal string (`"0644"`), or an integer, which is refused with an
/// explanation (see [`file_mode`]).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum FileModeValue {
    /// An octal string.
    Text(String),
    /// A TOML integer (refused: ambiguous).
    Number(i64),
}

/// One JWT-SVID to keep on disk.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwtSvidFile {
    /// The audience.
    pub jwt_audience: Option<String>,
    /// Further audiences.
    pub jwt_extra_audiences: Option<Vec<String>>,
    /// File name in `cert_dir`.
    pub jwt_svid_file_name: Option<String>,
}

/// The file as written by the operator (spiffe-helper's keys, plus logging).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Workload API socket: `unix:///path`, `unix:/path` or a path.
    pub agent_address: Option<String>,
    /// Program to start once the files are written.
    pub cmd: Option<String>,
    /// Its arguments.
    pub cmd_args: Option<CmdArgs>,
    /// File holding the PID of another process to signal on each rotation.
    pub pid_file_name: Option<PathBuf>,
    /// Directory the files are written to.
    pub cert_dir: Option<PathBuf>,
    /// Mode of the certificate and bundle files.
    pub cert_file_mode: Option<FileModeValue>,
    /// Mode of the key file.
    pub key_file_mode: Option<FileModeValue>,
    /// Mode of the JWT bundle file.
    pub jwt_bundle_file_mode: Option<FileModeValue>,
    /// Mode of JWT-SVID files.
    pub jwt_svid_file_mode: Option<FileModeValue>,
    /// Add the federated trust domains' roots to the bundle file.
    pub include_federated_domains: Option<bool>,
    /// Put intermediates in the bundle file instead of the certificate file.
    pub add_intermediates_to_bundle: Option<bool>,
    /// Signal for the child (or the `pid_file_name` process) on each rotation.
    pub renew_signal: Option<String>,
    /// `false`: write once and exit.
    pub daemon_mode: Option<bool>,
    /// Certificate chain file name.
    pub svid_file_name: Option<String>,
    /// Private key file name.
    pub svid_key_file_name: Option<String>,
    /// Trust bundle file name.
    pub svid_bundle_file_name: Option<String>,
    /// JWT-SVIDs to write.
    pub jwt_svids: Option<Vec<JwtSvidFile>>,
    /// JWT bundle file name (JSON).
    pub jwt_bundle_file_name: Option<String>,
    /// Pick the SVID with this hint instead of the default.
    pub hint: Option<String>,
    /// Log level directive.
    pub log_level: Option<String>,
    /// `text` or `json`.
    pub log_format: Option<String>,
}

/// `sigil-agent helper` flags; each overrides the file's key of the same name.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct HelperFlags {
    /// TOML configuration file (spiffe-helper's keys).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Workload API socket [default: $SPIFFE_ENDPOINT_SOCKET, else the agent's default].
    #[arg(long, value_name = "ADDRESS")]
    pub agent_address: Option<String>,
    /// Directory the files are written to (required here or in the file).
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// X509-SVID certificate chain file name.
    #[arg(long, value_name = "NAME")]
    pub svid_file_name: Option<String>,
    /// X509-SVID private key file name.
    #[arg(long, value_name = "NAME")]
    pub svid_key_file_name: Option<String>,
    /// Trust bundle file name.
    #[arg(long, value_name = "NAME")]
    pub svid_bundle_file_name: Option<String>,
    /// JWT-SVID to keep in a file, `AUDIENCE=FILE_NAME` (split at the last `=`; repeatable;
    /// replaces the file's `jwt_svids`).
    #[arg(long = "jwt-svid", value_name = "AUDIENCE=FILE_NAME")]
    pub jwt_svids: Vec<String>,
    /// JWT bundle file name (JSON).
    #[arg(long, value_name = "NAME")]
    pub jwt_bundle_file_name: Option<String>,
    /// Program to start once the files are written; the helper exits with its status.
    #[arg(long, value_name = "PATH")]
    pub cmd: Option<String>,
    /// Its arguments as one string, split at spaces (double quotes group).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmd_args: Option<String>,
    /// Signal sent on each rotation to the child or the pid file's process, e.g. SIGHUP.
    #[arg(long, value_name = "SIGNAL")]
    pub renew_signal: Option<String>,
    /// File with the PID of a process to signal on each rotation.
    #[arg(long, value_name = "FILE")]
    pub pid_file_name: Option<PathBuf>,
    /// false: write the files once and exit [default: true].
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub daemon_mode: Option<bool>,
    /// Add federated trust domains' roots to the bundle file.
    #[arg(long)]
    pub include_federated_domains: bool,
    /// Put intermediate CA certificates in the bundle file instead of the certificate file.
    #[arg(long)]
    pub add_intermediates_to_bundle: bool,
    /// Mode of the certificate and bundle files, octal [default: 0644].
    #[arg(long, value_name = "MODE")]
    pub cert_file_mode: Option<String>,
    /// Mode of the key file, octal [default: 0600].
    #[arg(long, value_name = "MODE")]
    pub key_file_mode: Option<String>,
    /// Mode of JWT-SVID files, octal [default: 0600].
    #[arg(long, value_name = "MODE")]
    pub jwt_svid_file_mode: Option<String>,
    /// Mode of the JWT bundle file, octal [default: 0600].
    #[arg(long, value_name = "MODE")]
    pub jwt_bundle_file_mode: Option<String>,
    /// Write the SVID with this hint instead of the default one.
    #[arg(long)]
    pub hint: Option<String>,
    /// Log level [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long)]
    pub log_format: Option<String>,
}

/// File names of the X509-SVID set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Names {
    /// Certificate chain (leaf first).
    pub svid: String,
    /// PKCS#8 private key.
    pub key: String,
    /// Trust bundle.
    pub bundle: String,
}

/// One JWT-SVID file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvidOut {
    /// Audiences, the first being `jwt_audience`.
    pub audience: Vec<String>,
    /// File name in `cert_dir`.
    pub file_name: String,
}

/// The program the helper starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    /// Program path (or name, looked up on PATH).
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct HelperConfig {
    /// Workload API socket path.
    pub socket: PathBuf,
    /// Output directory.
    pub cert_dir: PathBuf,
    /// The X509-SVID files, if any.
    pub x509: Option<X509Names>,
    /// JWT-SVID files.
    pub jwt_svids: Vec<JwtSvidOut>,
    /// JWT bundle file name.
    pub jwt_bundle: Option<String>,
    /// Certificate and bundle mode.
    pub cert_file_mode: u32,
    /// Key mode.
    pub key_file_mode: u32,
    /// JWT-SVID file mode.
    pub jwt_svid_file_mode: u32,
    /// JWT bundle file mode.
    pub jwt_bundle_file_mode: u32,
    /// Add federated roots to the bundle file.
    pub include_federated_domains: bool,
    /// Intermediates go to the bundle file.
    pub add_intermediates_to_bundle: bool,
    /// Hint of the SVID to write.
    pub hint: Option<String>,
    /// Keep running and rotating (`false`: write once and exit).
    pub daemon_mode: bool,
    /// Child to start.
    pub cmd: Option<Cmd>,
    /// Signal on rotation.
    pub renew_signal: Option<Signal>,
    /// Process to signal on rotation.
    pub pid_file: Option<PathBuf>,
    /// Log level.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
}

impl HelperConfig {
    /// Reads `--config` (if given) and applies the flags; `endpoint_env` is
    /// `SPIFFE_ENDPOINT_SOCKET`'s value.
    pub fn load(
        flags: &HelperFlags,
        endpoint_env: Option<&str>,
    ) -> Result<Self, HelperConfigError> {
        let file = match &flags.config {
            Some(path) => parse_file(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(file, flags, endpoint_env)
    }

    /// Merges file and flags and checks every value.
    pub fn resolve(
        file: FileConfig,
        flags: &HelperFlags,
        endpoint_env: Option<&str>,
    ) -> Result<Self, HelperConfigError> {
        let socket = match flags.agent_address.clone().or(file.agent_address) {
            Some(a) => agent_address(&a, "agent_address")?,
            None => match endpoint_env.filter(|v| !v.is_empty()) {
                Some(v) => agent_address(v, "SPIFFE_ENDPOINT_SOCKET")?,
                None => PathBuf::from(crate::config::DEFAULT_SOCKET_PATH),
            },
        };
        let cert_dir = flags.cert_dir.clone().or(file.cert_dir).ok_or(HelperConfigError::Missing {
            key: "cert_dir",
            hint: "the directory the files are written to (set it in the config file or pass --cert-dir)",
        })?;
        let names = [
            flags.svid_file_name.clone().or(file.svid_file_name),
            flags.svid_key_file_name.clone().or(file.svid_key_file_name),
            flags
                .svid_bundle_file_name
                .clone()
                .or(file.svid_bundle_file_name),
        ];
        let x509 = match names {
            [Some(svid), Some(key), Some(bundle)] => Some(X509Names { svid, key, bundle }),
            [None, None, None] => None,
            _ => {
                return Err(HelperConfigError::Conflict(
                    "svid_file_name, svid_key_file_name and svid_bundle_file_name go together: set all three (or none, for JWT only)".into(),
                ))
            }
        };
        let jwt_svids = if flags.jwt_svids.is_empty() {
            jwt_svids_from_file(file.jwt_svids.unwrap_or_default())?
        } else {
            flags
                .jwt_svids
                .iter()
                .map(|s| jwt_svid_flag(s))
                .collect::<Result<_, _>>()?
        };
        let jwt_bundle = flags
            .jwt_bundle_file_name
            .clone()
            .or(file.jwt_bundle_file_name);
        if x509.is_none() && jwt_svids.is_empty() && jwt_bundle.is_none() {
            return Err(HelperConfigError::Missing {
                key: "svid_file_name, svid_key_file_name and svid_bundle_file_name",
                hint: "nothing to write: set the three X509-SVID file names (or jwt_svids / jwt_bundle_file_name)",
            });
        }
        let mut seen = std::collections::HashSet::new();
        let all_names = x509
            .iter()
            .flat_map(|x| {
                [
                    ("svid_file_name", &x.svid),
                    ("svid_key_file_name", &x.key),
                    ("svid_bundle_file_name", &x.bundle),
                ]
            })
            .chain(
                jwt_svids
                    .iter()
                    .map(|j| ("jwt_svid_file_name", &j.file_name)),
            )
            .chain(jwt_bundle.iter().map(|b| ("jwt_bundle_file_name", b)));
        for (key, name) in all_names {
            check_name(name).map_err(|e| invalid(key, name, e.to_string()))?;
            if !seen.insert(name.clone()) {
                return Err(invalid(key, name, "another file has the same name"));
            }
        }
        let mode =
            |key: &str, flag: &Option<String>, value: Option<FileModeValue>, default: u32| {
                match flag.clone().map(FileModeValue::Text).or(value) {
                    Some(v) => file_mode(key, &v),
                    None => Ok(default),
                }
            };
        let cert_file_mode = mode(
            "cert_file_mode",
            &flags.cert_file_mode,
            file.cert_file_mode,
            DEFAULT_CERT_FILE_MODE,
        )?;
        let key_file_mode = mode(
            "key_file_mode",
            &flags.key_file_mode,
            file.key_file_mode,
            DEFAULT_KEY_FILE_MODE,
        )?;
        let jwt_svid_file_mode = mode(
            "jwt_svid_file_mode",
            &flags.jwt_svid_file_mode,
            file.jwt_svid_file_mode,
            DEFAULT_JWT_FILE_MODE,
        )?;
        let jwt_bundle_file_mode = mode(
            "jwt_bundle_file_mode",
            &flags.jwt_bundle_file_mode,
            file.jwt_bundle_file_mode,
            DEFAULT_JWT_FILE_MODE,
        )?;
        let renew_signal = flags
            .renew_signal
            .clone()
            .or(file.renew_signal)
            .map(|s| parse_signal(&s))
            .transpose()?;
        let pid_file = flags.pid_file_name.clone().or(file.pid_file_name);
        let cmd = match flags.cmd.clone().or(file.cmd) {
            Some(program) if program.trim().is_empty() => {
                return Err(invalid("cmd", program, "must name a program"))
            }
            Some(program) => {
                let args = match flags.cmd_args.clone().map(CmdArgs::Line).or(file.cmd_args) {
                    Some(CmdArgs::Line(l)) => split_args(&l)?,
                    Some(CmdArgs::List(v)) => v,
                    None => Vec::new(),
                };
                Some(Cmd { program, args })
            }
            None if file.cmd_args.is_some() || flags.cmd_args.is_some() => {
                return Err(HelperConfigError::Conflict(
                    "cmd_args needs cmd: name the program to start in cmd".into(),
                ))
            }
            None => None,
        };
        if pid_file.is_some() && renew_signal.is_none() {
            return Err(HelperConfigError::Conflict(
                "pid_file_name needs renew_signal: the signal to send that process on each rotation (e.g. renew_signal = \"SIGHUP\")".into(),
            ));
        }
        if renew_signal.is_some() && cmd.is_none() && pid_file.is_none() {
            return Err(HelperConfigError::Conflict(
                "renew_signal needs cmd or pid_file_name: the process to signal on each rotation"
                    .into(),
            ));
        }
        let daemon_mode = flags.daemon_mode.or(file.daemon_mode).unwrap_or(true);
        if !daemon_mode && (cmd.is_some() || pid_file.is_some()) {
            return Err(HelperConfigError::Conflict(
                "cmd and pid_file_name need daemon_mode = true: with daemon_mode = false the helper writes the files once and exits".into(),
            ));
        }
        let hint = flags.hint.clone().or(file.hint).filter(|h| !h.is_empty());
        if hint.is_some() && x509.is_none() && jwt_svids.is_empty() {
            return Err(HelperConfigError::Conflict(
                "hint selects an X509-SVID or JWT-SVID: configure one to write".into(),
            ));
        }
        let log_format = flags
            .log_format
            .clone()
            .or(file.log_format)
            .map(|s| {
                s.parse::<LogFormat>()
                    .map_err(|e| invalid("log_format", &s, e.to_string()))
            })
            .transpose()?
            .unwrap_or_default();
        Ok(Self {
            socket,
            cert_dir,
            x509,
            jwt_svids,
            jwt_bundle,
            cert_file_mode,
            key_file_mode,
            jwt_svid_file_mode,
            jwt_bundle_file_mode,
            include_federated_domains: flags.include_federated_domains
                || file.include_federated_domains.unwrap_or(false),
            add_intermediates_to_bundle: flags.add_intermediates_to_bundle
                || file.add_intermediates_to_bundle.unwrap_or(false),
            hint,
            daemon_mode,
            cmd,
            renew_signal,
            pid_file,
            log_level: flags
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format,
        })
    }
}

/// Reads and parses the TOML file.
pub fn parse_file(path: &Path) -> Result<FileConfig, HelperConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| HelperConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| HelperConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// `unix:///path`, `unix:/path` or a plain path.
fn agent_address(value: &str, key: &str) -> Result<PathBuf, HelperConfigError> {
    if value.starts_with("unix:") {
        crate::cli::api::endpoint_to_path(value).map_err(|e| invalid(key, value, e.to_string()))
    } else if value.contains("://") {
        Err(invalid(
            key,
            value,
            "expected the Workload API's Unix socket: unix:///path/to/api.sock or /path/to/api.sock",
        ))
    } else if value.is_empty() {
        Err(invalid(key, value, "must not be empty"))
    } else {
        Ok(PathBuf::from(value))
    }
}

fn jwt_svids_from_file(list: Vec<JwtSvidFile>) -> Result<Vec<JwtSvidOut>, HelperConfigError> {
    list.into_iter()
        .enumerate()
        .map(|(i, j)| {
            let audience = j.jwt_audience.filter(|a| !a.is_empty()).ok_or_else(|| {
                HelperConfigError::Conflict(format!(
                    "jwt_svids[{i}]: jwt_audience is required (the audience the JWT-SVID is for)"
                ))
            })?;
            let file_name = j.jwt_svid_file_name.ok_or_else(|| {
                HelperConfigError::Conflict(format!(
                    "jwt_svids[{i}]: jwt_svid_file_name is required (the file in cert_dir for the token)"
                ))
            })?;
            let mut all = vec![audience];
            all.extend(j.jwt_extra_audiences.unwrap_or_default().into_iter().filter(|a| !a.is_empty()));
            Ok(JwtSvidOut {
                audience: all,
                file_name,
            })
        })
        .collect()
}

/// `--jwt-svid AUDIENCE=FILE_NAME`.
fn jwt_svid_flag(s: &str) -> Result<JwtSvidOut, HelperConfigError> {
    match s.rsplit_once('=') {
        Some((aud, file)) if !aud.is_empty() && !file.is_empty() => Ok(JwtSvidOut {
            audience: vec![aud.to_string()],
            file_name: file.to_string(),
        }),
        _ => Err(invalid("--jwt-svid", s, "expected AUDIENCE=FILE_NAME")),
    }
}

/// An octal permission mode (at most 0o777) written as a string: `"0644"`, `"644"` or `"0o644"`.
///
/// TOML integers are refused: `key_file_mode = 600` is decimal 600 (0o1130), and `0o400` cannot
/// be told apart from a mistyped `256`, so only a string says unambiguously what is meant.
pub fn file_mode(key: &str, v: &FileModeValue) -> Result<u32, HelperConfigError> {
    let reason =
        "write the mode as an octal string, e.g. \"0644\" (a TOML integer such as 644 is decimal)";
    let s = match v {
        FileModeValue::Text(s) => s,
        FileModeValue::Number(n) => return Err(invalid(key, n, reason)),
    };
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return Err(invalid(key, s, reason));
    }
    let mode = u32::from_str_radix(digits, 8).map_err(|_| invalid(key, s, reason))?;
    if mode > 0o777 {
        return Err(invalid(
            key,
            s,
            "only permission bits (at most 0777) can be set",
        ));
    }
    Ok(mode)
}

/// `SIGHUP`, `HUP`, `sighup`: a signal by name.
pub fn parse_signal(name: &str) -> Result<Signal, HelperConfigError> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&full).map_err(|_| {
        invalid(
            "renew_signal",
            name,
            "not a signal name; use e.g. SIGHUP, SIGUSR1 or SIGUSR2",
        )
    })
}

/// Splits spiffe-helper's one-string `cmd_args` at spaces; double quotes group words and `""`
/// inside quotes is a literal quote.
pub fn split_args(line: &str) -> Result<Vec<String>, HelperConfigError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err(invalid(
            "cmd_args",
            line,
            "a double quote is not closed (or give cmd_args as a list of strings)",
        ));
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(text: &str) -> Result<HelperConfig, HelperConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|source| HelperConfigError::Parse {
            path: "helper.toml".into(),
            source,
        })?;
        HelperConfig::resolve(file, &HelperFlags::default(), None)
    }

    const X509: &str = "cert_dir = \"/c\"\nsvid_file_name = \"s.pem\"\nsvid_key_file_name = \"k.pem\"\nsvid_bundle_file_name = \"b.pem\"\n";

    #[test]
    fn spiffe_helper_style_file() {
        let c = from_toml(
            r#"
agent_address = "unix:///run/sigil/api.sock"
cmd = "/usr/sbin/nginx"
cmd_args = "-p /srv -g \"daemon off;\""
cert_dir = "/certs"
renew_signal = "SIGHUP"
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
jwt_svids = [{jwt_audience = "db", jwt_extra_audiences = ["x"], jwt_svid_file_name = "db.jwt"}]
jwt_bundle_file_name = "jwt_bundle.json"
cert_file_mode = "0444"
key_file_mode = "0640"
include_federated_domains = true
hint = "internal"
"#,
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/sigil/api.sock"));
        assert_eq!(
            c.cmd,
            Some(Cmd {
                program: "/usr/sbin/nginx".into(),
                args: vec![
                    "-p".into(),
                    "/srv".into(),
                    "-g".into(),
                    "daemon off;".into()
                ]
            })
        );
        assert_eq!(c.renew_signal, Some(Signal::SIGHUP));
        assert_eq!(c.cert_file_mode, 0o444);
        assert_eq!(c.key_file_mode, 0o640);
        assert_eq!(c.jwt_svid_file_mode, 0o600);
        assert_eq!(c.jwt_svids[0].audience, ["db", "x"]);
        assert!(c.daemon_mode && c.include_federated_domains && !c.add_intermediates_to_bundle);
        assert_eq!(c.hint.as_deref(), Some("internal"));
    }

    #[test]
    fn defaults_flags_and_the_endpoint_variable() {
        let c = from_toml(X509).unwrap();
        assert_eq!(c.cert_file_mode, 0o644);
        assert_eq!(c.key_file_mode, 0o600);
        assert_eq!(c.socket, PathBuf::from(crate::config::DEFAULT_SOCKET_PATH));
        let file: FileConfig = toml::from_str(X509).unwrap();
        let flags = HelperFlags {
            cert_dir: Some("/flag".into()),
            key_file_mode: Some("0640".into()),
            daemon_mode: Some(false),
            ..HelperFlags::default()
        };
        let c = HelperConfig::resolve(file, &flags, Some("unix:/env.sock")).unwrap();
        assert_eq!(c.cert_dir, PathBuf::from("/flag"));
        assert_eq!(c.key_file_mode, 0o640);
        assert!(!c.daemon_mode);
        assert_eq!(c.socket, PathBuf::from("/env.sock"));
        // Flags alone are enough.
        let flags = HelperFlags {
            cert_dir: Some("/c".into()),
            jwt_svids: vec!["https://db.example.org/?a=b=db.jwt".into()],
            ..HelperFlags::default()
        };
        let c = HelperConfig::resolve(FileConfig::default(), &flags, None).unwrap();
        assert_eq!(c.jwt_svids[0].audience, ["https://db.example.org/?a=b"]);
        assert_eq!(c.jwt_svids[0].file_name, "db.jwt");
    }

    #[test]
    fn missing_and_unknown_keys_are_named() {
        let err = from_toml("svid_file_name = \"a\"").unwrap_err().to_string();
        assert!(err.starts_with("cert_dir is required"), "{err}");
        let err = from_toml("cert_dir = \"/c\"").unwrap_err().to_string();
        assert!(err.contains("nothing to write"), "{err}");
        let err = from_toml("cert_dir = \"/c\"\nsvid_file_name = \"a\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("go together"), "{err}");
        let err = from_toml(&format!("{X509}svid_file = \"x\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `svid_file`"), "{err}");
        let err = from_toml(&format!(
            "{X509}jwt_svids = [{{jwt_svid_file_name = \"a\"}}]"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("jwt_svids[0]: jwt_audience is required"),
            "{err}"
        );
        let err = from_toml(&format!(
            "{X509}jwt_svids = [{{jwt_audience = \"a\", file = \"a\"}}]"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `file`"), "{err}");
    }

    #[test]
    fn bad_values_are_refused() {
        let cases = [
            (
                "renew_signal = \"SIGFOO\"\ncmd = \"x\"",
                "not a signal name",
            ),
            ("cert_file_mode = 644", "octal string"),
            ("cert_file_mode = 0o644", "octal string"),
            ("key_file_mode = \"0x1\"", "octal string"),
            ("key_file_mode = \"4755\"", "at most 0777"),
            ("agent_address = \"tcp://127.0.0.1:1\"", "Unix socket"),
            ("cmd = \"x\"\ncmd_args = \"a \\\"b\"", "not closed"),
            ("cmd_args = [\"a\"]", "cmd_args needs cmd"),
            ("pid_file_name = \"/run/nginx.pid\"", "needs renew_signal"),
            ("renew_signal = \"SIGHUP\"", "needs cmd or pid_file_name"),
            (
                "cmd = \"x\"\ndaemon_mode = false",
                "need daemon_mode = true",
            ),
            ("log_format = \"xml\"", "log_format"),
        ];
        for (extra, want) in cases {
            let err = from_toml(&format!("{X509}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{extra}: {err}");
        }
        let err = from_toml("cert_dir = \"/c\"\nsvid_file_name = \"a/b\"\nsvid_key_file_name = \"k\"\nsvid_bundle_file_name = \"b\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid svid_file_name \"a/b\""), "{err}");
        let err = from_toml("cert_dir = \"/c\"\nsvid_file_name = \"a\"\nsvid_key_file_name = \"a\"\nsvid_bundle_file_name = \"b\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("same name"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helper/helper.toml");
        let c = HelperConfig::resolve(parse_file(&path).unwrap(), &HelperFlags::default(), None)
            .unwrap();
        assert_eq!(c.renew_signal, Some(Signal::SIGHUP));
        assert_eq!(c.cmd.unwrap().program, "/usr/sbin/nginx");
        assert_eq!(c.x509.unwrap().key, "svid_key.pem");
        assert_eq!((c.cert_file_mode, c.key_file_mode), (0o644, 0o600));
    }

    #[test]
    fn signals_and_arguments() {
        assert_eq!(parse_signal("SIGHUP").unwrap(), Signal::SIGHUP);
        assert_eq!(parse_signal("usr1").unwrap(), Signal::SIGUSR1);
        assert!(parse_signal("HANGUP").is_err());
        assert_eq!(split_args("").unwrap(), Vec::<String>::new());
        assert_eq!(split_args("  a   b ").unwrap(), ["a", "b"]);
        assert_eq!(split_args("\"\" x").unwrap(), ["", "x"]);
        assert_eq!(
            split_args("-g \"say \"\"hi\"\"\"").unwrap(),
            ["-g", "say \"hi\""]
        );
    }
}
