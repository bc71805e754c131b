//! Concord's entities, use cases and ports. Nothing here knows SQL, HTTP or a broker: adapters
//! implement the traits of [`ports`], the server and the sdk wire them together.

pub mod app;
pub mod domain;
pub mod ports;

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
