//! The endpoints: read models (get by id, list with filters), analytics, operations.

pub(crate) mod analytics;
pub(crate) mod ops;
pub(crate) mod read;
