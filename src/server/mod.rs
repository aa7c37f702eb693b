//! What surrounds the routes in a running server: the accept loop and its limits ([`serve`]),
//! who a request comes from ([`client`]), pull authentication ([`auth`]), log lines
//! ([`logging`], written in batches by [`log_writer`]) and the numbers operators alert on ([`metrics`]).

pub mod auth;
pub mod client;
pub mod log_writer;
pub mod logging;
pub mod metrics;
pub mod serve;
