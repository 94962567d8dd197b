//! The RADIUS front. pforte's own codec (RFC 2865, 2866, 3579, 5176: `packet`, `attr`, `auth`,
//! no I/O), and the server over it: the NASes (`clients`), vendor profiles (`profile`), the
//! duplicate cache (`dedup`, RFC 5080 2.2.2), the UDP server (`server`), the upstream proxy
//! (`upstream`) and Disconnect-Requests (`dae`).
//!
//! Written here rather than taken from a crate: `radius` (moznion) is dormant and neither
//! computes nor checks Message-Authenticator, and `radius-rust` is built on mio/async-std, not
//! tokio.

pub mod attr;
pub mod auth;
pub mod clients;
pub mod dae;
pub mod dedup;
pub mod packet;
pub mod profile;
pub mod server;
pub mod upstream;

pub use attr::{AttrError, VendorAttr};
pub use auth::{AuthError, Secret};
pub use packet::{Attribute, Code, Packet, PacketError};
