//! Spec-shaped CNI errors.
//!
//! On failure a plugin prints `{"cniVersion", "code", "msg", "details"}` on stdout and exits
//! non-zero. Codes 1-99 are reserved by the specification; 100 and above are ours.

use serde_json::{json, Value};
use std::fmt;

/// Error codes. The well-known ones are from the CNI specification; 100+ are plugin specific.
pub mod codes {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (CNI_COMMAND, CNI_CONTAINERID, ...).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (e.g. reading stdin, writing stdout).
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (stdin is not valid JSON).
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// A transient condition that should clear up: the runtime should retry later.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin is not available (cannot handle ADD requests).
    pub const NOT_AVAILABLE: u32 = 50;
    /// The node agent could not be reached (socket missing, connection refused, I/O error).
    pub const AGENT_UNREACHABLE: u32 = 100;
    /// The node agent answered with an error (it could not enrol / check / remove the pod).
    pub const AGENT_REFUSED: u32 = 101;
    /// The node agent answered something that is not the expected HTTP/JSON response.
    pub const AGENT_PROTOCOL: u32 = 102;
    /// A bug in the plugin (a panic was caught).
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: code, short message and optional details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The JSON object printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

pub type CniResult<T> = Result<T, CniError>;
