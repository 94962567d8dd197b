//! pforte's own RADIUS codec (RFC 2865, 2866, 3579, 5176): packets, attributes and the
//! shared-secret arithmetic, with no I/O. Duplicate detection (RFC 5080 2.2.2: source address
//! and port, Identifier and Request Authenticator) belongs to the server that uses it.
//!
//! Written here rather than taken from a crate: `radius` (moznion) is dormant and neither
//! computes nor checks Message-Authenticator, and `radius-rust` is built on mio/async-std, not
//! tokio.

pub mod attr;
pub mod auth;
pub mod packet;

pub use attr::{AttrError, VendorAttr};
pub use auth::{AuthError, Secret};
pub use packet::{Attribute, Code, Packet, PacketError};
