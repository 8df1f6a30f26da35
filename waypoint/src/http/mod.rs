//! HTTP handling inside a tunnel: the per-request pipeline ([`proxy`]), its stages before
//! anything is sent upstream ([`admission`]: authentication, authorization, routing, backend),
//! the retry decision ([`retry`]), the waypoint's own answers ([`local_reply`]), route
//! selection, the canonical request path and host ([`path`], [`authority`]), the pieces of a
//! request the pipeline rewrites, and the HTTP server a downstream connection is served by
//! ([`server`]: its bounds).

pub mod admission;
pub mod authority;
pub mod local_reply;
pub mod path;
pub mod proxy;
pub mod retry;
pub mod rewrite;
pub mod route;
pub mod server;
