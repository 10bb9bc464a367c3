//! The host <-> guest protocol.
//!
//! Two virtio-serial ports: [`PORT_NAME`] carries control (setup, exec, ping,
//! shutdown: streams only the host opens) and [`EGRESS_PORT_NAME`] carries the
//! guest's outbound connections (streams only the guest opens). They never
//! share fate: whatever the guest does to the egress port (thousands of
//! connections, garbage, forged stream ids) ends at most the egress session,
//! and exec, ping and stop keep working. A guest-opened stream starts with
//! one [`GuestOpen`] frame: a connection, or an agent's request to the user
//! (`sandpen-request`), which only the host's user can answer. On each port, after a line-based
//! handshake that checks protocol versions ([`handshake`]), both sides run a
//! yamux session ([`mux`]) whose stream limits are set so that the opening
//! side runs out first ([`mux::Channel`]). Every stream the host opens starts with one [`Request`] frame;
//! frames are length-delimited postcard messages ([`frame`]) bounded by
//! [`frame::MAX_FRAME`], so a hostile guest cannot make the host buffer more.
//!
//! This is the only crate compiled for both sides, which keeps the trust boundary
//! visible in the crate graph.

pub mod fdio;
pub mod frame;
pub mod handshake;
pub mod messages;
pub mod mux;

pub use messages::*;

/// Version of everything in this crate that crosses the boundary. Bump it on any
/// change to the handshake, the framing or a message type.
pub const PROTOCOL_VERSION: u32 = 6;

/// Name of the control port (`-device virtserialport,name=...`).
pub const PORT_NAME: &str = "sandpen";

/// Name of the egress port: one stream per outbound guest connection.
pub const EGRESS_PORT_NAME: &str = "sandpen-egress";

/// virtiofs tag of the workspace mount.
pub const WORKSPACE_TAG: &str = "workspace";

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("I/O on the guest channel: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message on the guest channel: {0}")]
    Decode(#[from] postcard::Error),
    #[error(
        "the guest speaks protocol version {guest}, this sandpen speaks {host}; \
         rebuild the image's initramfs with this sandpen (`sandpen image build`)"
    )]
    VersionMismatch { guest: u32, host: u32 },
    #[error("the peer closed the stream before {0}")]
    UnexpectedEof(&'static str),
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("too many streams open on the channel (the limit is {0})")]
    TooManyStreams(usize),
    #[error("multiplexer: {0}")]
    Mux(#[from] yamux::ConnectionError),
}
