//! Former spellings of environment variables. Each setting has one name across the binaries
//! (Istio's and ztunnel's: `STATS_ADDR`, `RUST_LOG`); a binary that used another name still
//! reads it, only when neither the flag nor the current variable is set, so nothing deployed
//! with the old name changes behaviour. clap reads one variable per flag, hence this.

use std::ffi::OsString;
use std::str::FromStr;

/// A former variable is set but does not hold a valid value.
#[derive(Debug, thiserror::Error)]
#[error("{former} (the former name of {now}) is {value:?}: {reason}")]
pub struct FormerEnvError {
    pub former: &'static str,
    pub now: &'static str,
    pub value: String,
    pub reason: String,
}

/// The value of `former` (the old name of `now`), looked up with `lookup` (`std::env::var_os`
/// outside tests); `None` when it is not set. A value that is not valid is an error, never
/// silently the default.
pub fn read<T>(
    former: &'static str,
    now: &'static str,
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<Option<T>, FormerEnvError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let Some(raw) = lookup(former) else { return Ok(None) };
    let value = raw.to_string_lossy().into_owned();
    value.parse().map(Some).map_err(|e: T::Err| FormerEnvError {
        former,
        now,
        reason: e.to_string(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn unset_set_and_invalid() {
        let none = |_: &str| None;
        assert!(read::<SocketAddr>("METRICS_ADDR", "STATS_ADDR", none)
            .expect("unset")
            .is_none());
        let set = |k: &str| (k == "METRICS_ADDR").then(|| OsString::from("0.0.0.0:9020"));
        let got: Option<SocketAddr> = read("METRICS_ADDR", "STATS_ADDR", set).expect("valid");
        assert_eq!(got.map(|a| a.port()), Some(9020));
        let bad = |_: &str| Some(OsString::from("nine"));
        let err = read::<SocketAddr>("METRICS_ADDR", "STATS_ADDR", bad).expect_err("invalid");
        let text = err.to_string();
        assert!(
            text.contains("METRICS_ADDR") && text.contains("STATS_ADDR") && text.contains("nine"),
            "{text}"
        );
    }
}
