//! SPIFFE identities of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// Trust domain used when a workload leaves it empty.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload identity. Only the Kubernetes-shaped form is accepted: the mesh authorizes by
/// namespace and service account, so an identity that does not carry both is useless to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a string is not a valid SPIFFE identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    #[error("identity {value:?} has an invalid {part}: only lowercase letters, digits, '-', '.' and '_' are allowed")]
    Characters { value: String, part: &'static str },
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_'))
}

impl Identity {
    /// Builds an identity, defaulting an empty trust domain to `cluster.local`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        let td = if trust_domain.is_empty() {
            DEFAULT_TRUST_DOMAIN
        } else {
            trust_domain
        };
        let id = Identity {
            trust_domain: td.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        for (part, value) in [
            ("trust domain", td),
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if !valid_segment(value) {
                return Err(IdentityError::Characters {
                    value: id.to_string(),
                    part,
                });
            }
        }
        Ok(id)
    }

    /// The principal form used by authorization policies: the URI without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            // A URI must name its trust domain: only `Identity::new` (workload fields) defaults
            // an empty one, or `spiffe:///ns/a/sa/b` would read as a cluster.local identity.
            [td, "ns", ns, "sa", sa] if !td.is_empty() => Identity::new(td, ns, sa).map_err(|e| match e {
                IdentityError::Characters { part, .. } => IdentityError::Characters {
                    value: s.to_owned(),
                    part,
                },
                other => other,
            }),
            _ => Err(IdentityError::Shape(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/sleep".parse().unwrap();
        assert_eq!(id.namespace, "default");
        assert_eq!(id.service_account, "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
    }

    #[test]
    fn rejects_malformed() {
        assert!(matches!(
            "http://x/ns/a/sa/b".parse::<Identity>(),
            Err(IdentityError::Scheme(_))
        ));
        assert!(matches!(
            "spiffe://td/ns/a".parse::<Identity>(),
            Err(IdentityError::Shape(_))
        ));
        assert!(matches!(
            "spiffe://td/ns/a/sa/b/c".parse::<Identity>(),
            Err(IdentityError::Shape(_))
        ));
        assert!(matches!(
            "spiffe://td/ns//sa/b".parse::<Identity>(),
            Err(IdentityError::Characters { .. })
        ));
        assert!(matches!(
            "spiffe://td/ns/A/sa/b".parse::<Identity>(),
            Err(IdentityError::Characters { .. })
        ));
    }

    /// Found by tests/fuzz.rs: an empty trust domain in a URI parsed as `cluster.local`, so
    /// the printed identity differed from the one presented.
    #[test]
    fn uri_with_empty_trust_domain_is_rejected() {
        assert!(matches!(
            "spiffe:///ns/a/sa/b".parse::<Identity>(),
            Err(IdentityError::Shape(_))
        ));
    }

    #[test]
    fn empty_trust_domain_defaults() {
        assert_eq!(
            Identity::new("", "ns", "sa").unwrap().trust_domain,
            DEFAULT_TRUST_DOMAIN
        );
    }
}
