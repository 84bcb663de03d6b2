//! query-api over HTTP on the whole pipeline (command-api → store → relay → JetStream →
//! projectors → read models): endpoints, filters, roles, pagination under concurrent inserts,
//! read-your-writes, and the analysts' SQL.

mod analysts;
mod asyncapi;
mod audit;
mod budgets;
mod contract;
mod endpoints;
mod live;
mod openapi;
mod pagination;
mod security;
mod support;
