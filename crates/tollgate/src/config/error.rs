//! [`ConfigError`]: which file, which line, which field, and what is wrong.

use std::fmt;
use std::path::PathBuf;

/// A configuration error: which file, which line, which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the configuration came from: the file given to
    /// [`Config::load`](super::Config::load), or the name given to
    /// [`Config::parse`](super::Config::parse) (`(inline config)` for text parsed without one).
    /// Never empty for an error of this module, including the ones
    /// [`Config::layer`](super::Config::layer) and [`Config::limiter`](super::Config::limiter)
    /// find after loading.
    pub file: PathBuf,
    /// The 1-based line, when known.
    pub line: Option<usize>,
    /// The field, as a dotted path (`rate_limits.basic.burst_limit`), when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // This module always names a file; an error built by hand may not: no empty `: `
        // prefix for it.
        let mut prefix = "";
        if !self.file.as_os_str().is_empty() {
            write!(f, "{}", self.file.display())?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            prefix = ": ";
        }
        if let Some(field) = &self.field {
            write!(f, "{prefix}{field}")?;
            prefix = ": ";
        }
        write!(f, "{prefix}{}", self.message)
    }
}

impl std::error::Error for ConfigError {}
