//! Host-side credentials for sandpen (see docs/credentials.md).
//!
//! - [`routes`]: which service's secret goes to which host, in which header,
//!   and the pure sentinel swap the proxy applies to a request's headers.
//! - [`store`]: the 0600 secret file with scoped entries; values never show in
//!   `Debug`, errors or listings.
//! - [`ca`]: the per-sandbox CA and its cache of per-host leaf certificates.
//!
//! Nothing here talks to the network or to the guest.

pub mod ca;
pub mod custom;
mod fsutil;
pub mod keyring;
pub mod routes;
pub mod store;

pub use ca::{CaError, SandboxCa};
pub use custom::{CustomRoutes, CustomRoutesError};
pub use keyring::Keyring;
pub use routes::{
    apply, builtin_routes, foreign_credential, route_for, Applied, ApplyError, HeaderRule, Route,
    RouteError, RouteTable, ValueFormat, SENTINEL,
};
pub use store::{EntryInfo, FileStore, Found, Scope, SecretValue, StoreError};
