//! Workspace-level end-to-end tests live in `main.rs`: they run the real `canopy` binary as a
//! user would (`canopy up`, `canopy demo`) and look at it only from outside.
