//! Sources that fill the [`crate::state::StateStore`]: the Delta ADS client and a local file.
