//! ZDS server (todo)
