//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams inside mutual TLS.

/// Port HBONE listens on.
pub const HBONE_PORT: u16 = 15008;
