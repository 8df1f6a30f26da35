//! HTTP handling inside a tunnel: route selection, the per-request pipeline, and the pieces
//! of a request the pipeline rewrites.

pub mod proxy;
pub mod rewrite;
pub mod route;
