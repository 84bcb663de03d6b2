//! The demo model against the real `opencode serve` (the pinned binary that
//! `scripts/setup.sh` installs): a plan turn, then a build turn in the same session.

mod demo;
