//! Tests of canopy-sandbox with real bubblewrap, the real `opencode serve` and the testkit's
//! scripted model (the fake of the hosted LLM). Each test has its own provider root and
//! sandboxes; uids are leased host-wide, so tests in parallel processes never share one.

mod egress;
mod escapes;
mod git;
mod lifecycle;
mod limits;
mod support;
