//! The control-plane flags ztunnel and the waypoint share (xDS and CA addresses, trust bundle,
//! token file, the control plane's identity), declared once so that both binaries spell,
//! document and default them alike. Each binary flattens [`ControlPlaneArgs`] into its own
//! configuration and says which of them it requires.

use std::path::PathBuf;

use crate::identity::Identity;

/// Identity the control plane proves when xDS or the CA is reached over https.
pub const DEFAULT_CONTROL_PLANE_IDENTITY: &str = "spiffe://cluster.local/ns/istio-system/sa/mesh-controller";

/// Parses a SPIFFE identity flag, saying what shape is expected when it is not one.
pub fn parse_identity(s: &str) -> Result<Identity, String> {
    s.parse().map_err(|e| {
        format!("{e}; expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, e.g. {DEFAULT_CONTROL_PLANE_IDENTITY}")
    })
}

/// How a proxy reaches and authenticates the control plane.
#[derive(Clone, Debug, clap::Args)]
pub struct ControlPlaneArgs {
    /// Control plane address for Delta ADS (http:// or https://; https needs --trust-bundle).
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// Mesh CA address (http:// or https://; https needs --trust-bundle) for CreateCertificate.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// File holding the bearer token presented to the CA and the xDS server.
    #[arg(long, env = "TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Trust bundle (PEM roots). Required for https control plane addresses: the control
    /// plane's certificate must chain to it.
    #[arg(long, env = "TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// SPIFFE identity the control plane must prove when --xds-address or --ca-address is
    /// https:// (its certificate is checked against --trust-bundle; no client certificate is
    /// sent, the token authenticates this proxy).
    #[arg(
        long,
        env = "CONTROL_PLANE_IDENTITY",
        default_value = DEFAULT_CONTROL_PLANE_IDENTITY,
        value_parser = parse_identity
    )]
    pub control_plane_identity: Identity,
}

/// True for a control plane address reached over TLS.
pub fn uses_tls(address: &str) -> bool {
    address.starts_with("https://")
}
