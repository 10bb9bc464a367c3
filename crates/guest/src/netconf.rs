//! Interface and route setup over rtnetlink, in process: an `ip` command costs
//! a process start, which is tens of milliseconds under emulation.

use std::io;

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The loopback interface's index (always 1).
const LOOPBACK: u32 = 1;
/// The kernel's `main` routing table.
const RT_TABLE_MAIN: u8 = 254;

fn request(message: RouteNetlinkMessage, extra_flags: u16) -> io::Result<()> {
    let mut msg = NetlinkMessage::from(message);
    msg.header.flags = NLM_F_REQUEST | NLM_F_ACK | extra_flags;
    msg.header.sequence_number = 1;
    msg.finalize();
    let mut buf = vec![0u8; msg.header.length as usize];
    msg.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let mut reply = vec![0u8; 8192];
    let n = socket.recv(&mut &mut reply[..], 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// `ip link set lo up`
pub fn loopback_up() -> io::Result<()> {
    let mut link = LinkMessage::default();
    link.header.index = LOOPBACK;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    request(RouteNetlinkMessage::SetLink(link), 0)
}

/// `ip route replace local 0.0.0.0/0 dev lo table main`: every IPv4 address is
/// local, so a connection to anywhere reaches the nat redirect instead of
/// failing with "network unreachable". It is in the main table, not the local
/// one (which is looked up first), so that the more specific routes of Docker
/// bridges inside the guest still win.
pub fn route_everything_local() -> io::Result<()> {
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route.header.destination_prefix_length = 0;
    route.header.table = RT_TABLE_MAIN;
    route.header.protocol = RouteProtocol::Boot;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route.attributes.push(RouteAttribute::Oif(LOOPBACK));
    request(
        RouteNetlinkMessage::NewRoute(route),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
}
