//! Tests of canopy-sandbox with real bubblewrap, the real `opencode serve` and the testkit's
//! scripted model (the fake of the hosted LLM). Each test has its own provider root and
//! sandboxes; uids are leased host-wide, so tests in parallel processes never share one.
//! Every test passes as root (root mode) and as a normal user (rootless mode), asserting the
//! mode's own property where they differ; the `rootless_*` tests force rootless mode, so a root
//! run covers both. `CANOPY_TEST_SANDBOX_ROOTLESS=1` runs every harness rootless.

mod disk;
mod egress;
mod escapes;
mod git;
mod lifecycle;
mod limits;
mod model_proxy;
mod support;
mod upstream;
