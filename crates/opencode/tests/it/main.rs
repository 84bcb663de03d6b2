//! Tests of canopy-opencode against the real `opencode serve` (the pinned binary that
//! `scripts/setup.sh` installs) and the testkit's scripted model. Each test starts its own
//! server and model in its own temp dirs, on free ports.

mod abort;
mod failures;
mod permissions;
mod server;
mod support;
mod tools;
