//! What surrounds the routes in a running server: the accept loop and its limits ([`serve`]),
//! who a request comes from ([`client`]), pull authentication ([`auth`]), log lines
//! ([`logging`]) and the numbers operators alert on ([`metrics`]).

pub mod auth;
pub mod client;
pub mod logging;
pub mod metrics;
pub mod serve;
