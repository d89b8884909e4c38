//! `tracing` set-up shared by both binaries: human text or JSON lines on stderr.

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log pipelines).
    Json,
}

/// A log format name that is neither `text` nor `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log format {0:?} is not one of: text, json")]
pub struct UnknownLogFormat(pub String);

impl std::str::FromStr for LogFormat {
    type Err = UnknownLogFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(UnknownLogFormat(other.to_string())),
        }
    }
}

/// The level names a filter may use (case does not matter; `tracing` also takes `0`–`5`).
pub const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Why a log filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogFilterError {
    /// A directive that is one bare word, and not a level.
    #[error("{word} is not a log level; use one of: {} (or TARGET=LEVEL, e.g. sigil_server=debug)", LEVELS.join(", "))]
    NotALevel {
        /// The word, quoted for display.
        word: String,
    },
    /// `target=level` with an unknown level.
    #[error("{level} in {directive} is not a log level; use one of: {}", LEVELS.join(", "))]
    NotALevelIn {
        /// The level, quoted for display.
        level: String,
        /// The directive, quoted for display.
        directive: String,
    },
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogInitError {
    /// The configured level is refused by [`check_filter`].
    #[error("invalid log level: {0}")]
    Level(#[source] LogFilterError),
    /// `RUST_LOG` is refused by [`check_filter`].
    #[error("invalid RUST_LOG: {0}")]
    Env(#[source] LogFilterError),
    /// `tracing` does not accept the filter.
    #[error("invalid {what} {shown}: {source}")]
    Parse {
        /// `log level` or `RUST_LOG`.
        what: &'static str,
        /// The filter, quoted for display.
        shown: String,
        /// `tracing`'s complaint.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber is installed already.
    #[error("installing the log subscriber: {0}")]
    Install(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Checks a log filter before it is used: a level (`info`) or `tracing` `EnvFilter` directives
/// (`sigil_server=debug,info`, `h2=off`, `sigil_agent[attest]=trace`), every level named being
/// one of [`LEVELS`].
///
/// `EnvFilter` itself takes a lone unknown word (`verbose`, `warning`) as the name of a target
/// to log at `trace`, which leaves every other target at `off`: a typo would silence the
/// process. So a directive that is one bare word must be a level; a target is named with its
/// level, `target=level`.
pub fn check_filter(filter: &str) -> Result<(), LogFilterError> {
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // A span filter `[span{field=value}]` may hold '=': the level follows the last ']'.
        let tail_start = directive.rfind(']').map_or(0, |i| i + 1);
        let level = match directive[tail_start..].rsplit_once('=') {
            Some((_, level)) => level.trim(),
            // `target[span]` with no level: trace within that span, as EnvFilter reads it.
            None if directive.contains('[') => continue,
            None => directive,
        };
        if !is_level(level) {
            let shown = crate::text::quote_for_display(level);
            return Err(if level == directive {
                LogFilterError::NotALevel { word: shown }
            } else {
                LogFilterError::NotALevelIn {
                    level: shown,
                    directive: crate::text::quote_for_display(directive),
                }
            });
        }
    }
    Ok(())
}

fn is_level(s: &str) -> bool {
    LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s))
        || matches!(s, "0" | "1" | "2" | "3" | "4" | "5")
}

/// Installs the global subscriber. `level` is an `EnvFilter` directive such as `info` or
/// `sigil_server=debug`; `RUST_LOG`, when set, wins. Both are checked with [`check_filter`]:
/// an unknown level is an error, not a silent process.
pub fn init(level: &str, format: LogFormat) -> Result<(), LogInitError> {
    check_filter(level).map_err(LogInitError::Level)?;
    let parse = |what: &'static str, filter: &str| {
        EnvFilter::try_new(filter).map_err(|source| LogInitError::Parse {
            what,
            shown: crate::text::quote_for_display(filter),
            source,
        })
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => {
            check_filter(&env).map_err(LogInitError::Env)?;
            parse("RUST_LOG", &env)
        }
        _ => parse("log level", level),
    }?;
    // Colours only on a terminal: log files and journald get plain `key=value` fields.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(LogInitError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_are_accepted() {
        for ok in [
            "info",
            "INFO",
            "Warn",
            "off",
            "trace",
            "3",
            "",
            "sigil_server=debug",
            "sigil_server=debug,info",
            "sigil_server::api=trace,h2=off,warn",
            "sigil_agent[attest]",
            "sigil_agent[attest{pid=7}]=debug",
            "[attest{path=/a=b}]=info",
        ] {
            assert_eq!(check_filter(ok), Ok(()), "{ok:?}");
            // Whatever passes must also be a filter tracing accepts.
            assert!(EnvFilter::try_new(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn unknown_levels_are_refused_with_the_valid_ones() {
        for (bad, named) in [
            ("verbose", "\"verbose\""),
            ("warning", "\"warning\""),
            ("info,verbose", "\"verbose\""),
            ("sigil_server=warning", "\"warning\""),
            ("sigil_server=debug,h2=loud", "\"loud\""),
            ("sigil_agent[attest]=chatty", "\"chatty\""),
            ("sigil_server", "\"sigil_server\""),
            ("6", "\"6\""),
        ] {
            let e = check_filter(bad).expect_err(bad).to_string();
            assert!(e.contains(named), "{bad:?}: {e}");
            assert!(
                e.contains("off, error, warn, info, debug, trace"),
                "{bad:?}: {e}"
            );
        }
        // A bare word is the mistake that silences everything: the message says how to name
        // a target instead.
        let e = check_filter("verbose").unwrap_err();
        assert!(matches!(e, LogFilterError::NotALevel { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("TARGET=LEVEL"), "{e}");
    }

    #[test]
    fn init_names_which_filter_is_wrong_and_keeps_the_cause() {
        let e = init("verbose", LogFormat::Text).unwrap_err();
        assert!(
            matches!(e, LogInitError::Level(LogFilterError::NotALevel { .. })),
            "{e}"
        );
        let line = crate::text::error_chain(&e);
        assert!(
            line.starts_with("invalid log level: \"verbose\" is not a log level"),
            "{line}"
        );
        assert_eq!(line.matches("is not a log level").count(), 1, "{line}");
    }

    #[test]
    fn a_long_filter_is_not_echoed_whole() {
        let long = "x".repeat(3000);
        let e = check_filter(&long).unwrap_err().to_string();
        assert!(e.len() < 400, "{e}");
        assert!(e.contains("(3000 bytes)"), "{e}");
    }
}
