//! nf_tables over nfnetlink, in process: what `nft -f FILE` does, for the few
//! expressions the guest needs, without starting a process (under emulation a
//! process start is a large part of a second).
//!
//! A [`Table`] is described as data: base chains, and rules made of the same
//! expressions `nft` compiles its syntax into (`nft --debug=netlink` prints
//! them). [`replace_table`] sends them as one nfnetlink batch, so the kernel
//! applies all of it or nothing:
//!
//! ```text
//! NFNL_MSG_BATCH_BEGIN
//! NFT_MSG_NEWTABLE    (create if missing, like `table inet NAME`)
//! NFT_MSG_DELTABLE    (so that what follows replaces whatever was there)
//! NFT_MSG_NEWTABLE
//! NFT_MSG_NEWCHAIN    × chains (type, hook, priority)
//! NFT_MSG_NEWRULE     × rules  (a list of expressions)
//! NFNL_MSG_BATCH_END
//! ```
//!
//! Every message but the batch delimiters asks for an acknowledgement, so a
//! failure names the message the kernel refused and its errno.
//!
//! The messages are built with `netlink-packet-netfilter`; the expression
//! helpers below produce the same attributes, in the same order, as `nft`.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use netlink_packet_core::{
    DefaultNla, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NLMSG_ERROR, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook,
    HookNumber, Immediate, InetHookNumber, ListAttribute, Meta, MetaKey, NfTablesMessage, Operator,
    Payload, Register, RuleAttribute, TableAttribute, TableFlags, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::nftables::{ChainMessage, RuleMessage, TableMessage};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

// include/uapi/linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
// include/uapi/linux/netfilter.h
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
// include/uapi/linux/netfilter/nf_tables.h
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
// include/uapi/linux/netfilter/nf_nat.h
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
/// Interface names are compared on all of `IFNAMSIZ` bytes, NUL-padded.
const IFNAMSIZ: usize = 16;
/// How long to wait for the kernel's answers. It answers while handling the
/// send (the batch is processed synchronously), so this only bounds a surprise.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The kind of a base chain: what its rules may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
}

impl ChainType {
    fn name(self) -> &'static str {
        match self {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        }
    }
}

/// Where a base chain is attached in the `inet` family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InetHook {
    Prerouting,
    Forward,
    Output,
}

impl InetHook {
    fn name(self) -> &'static str {
        match self {
            InetHook::Prerouting => "prerouting",
            InetHook::Forward => "forward",
            InetHook::Output => "output",
        }
    }

    fn number(self) -> InetHookNumber {
        match self {
            InetHook::Prerouting => InetHookNumber::PreRouting,
            InetHook::Forward => InetHookNumber::Forward,
            InetHook::Output => InetHookNumber::LocalOut,
        }
    }
}

/// One rule: its expressions, and the `nft` syntax they stand for (used in
/// error messages and to render the table as an `nft` script).
#[derive(Clone, Debug)]
pub struct Rule {
    pub text: &'static str,
    pub exprs: Vec<Expressions>,
}

impl Rule {
    /// A rule from parts (each a run of expressions), in order.
    pub fn new<const N: usize>(text: &'static str, parts: [Vec<Expressions>; N]) -> Self {
        Rule {
            text,
            exprs: parts.into_iter().flatten().collect(),
        }
    }
}

/// A base chain (attached to a hook) with its rules; its policy is accept.
#[derive(Clone, Debug)]
pub struct Chain {
    pub name: &'static str,
    pub kind: ChainType,
    pub hook: InetHook,
    pub priority: i32,
    pub rules: Vec<Rule>,
}

/// A table of the `inet` family (IPv4 and IPv6).
#[derive(Clone, Debug)]
pub struct Table {
    pub name: &'static str,
    pub chains: Vec<Chain>,
}

impl fmt::Display for Table {
    /// The `nft -f` script that [`replace_table`] is equivalent to.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table inet {}", self.name)?;
        writeln!(f, "delete table inet {}", self.name)?;
        writeln!(f, "table inet {} {{", self.name)?;
        for chain in &self.chains {
            writeln!(f, "    chain {} {{", chain.name)?;
            writeln!(
                f,
                "        type {} hook {} priority {};",
                chain.kind.name(),
                chain.hook.name(),
                chain.priority
            )?;
            for rule in &chain.rules {
                writeln!(f, "        {}", rule.text)?;
            }
            writeln!(f, "    }}")?;
        }
        writeln!(f, "}}")
    }
}

// ---------------------------------------------------------------------------
// Expressions. Each helper loads into, or works on, register 1 (the 16-byte
// register `nft` uses for a single match), exactly as `nft` compiles it.

/// `[ meta load KEY => reg 1 ]`
fn meta(key: MetaKey) -> Expressions {
    Expressions::Meta(vec![
        Meta::Key(key),
        Meta::DestinationRegister(Register::Reg1),
    ])
}

/// `[ cmp OP reg 1 DATA ]`
fn cmp(op: Operator, data: &[u8]) -> Expressions {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::Reg1),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(data.to_vec())),
    ])
}

/// `[ payload load LENb @ BASE header + OFFSET => reg 1 ]`
fn payload(base: u32, offset: u32, len: u32) -> Expressions {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
}

/// `[ bitwise reg 1 = ( reg 1 & MASK ) ^ 0 ]`
fn mask(mask: &[u8]) -> Expressions {
    Expressions::Bitwise(vec![
        Bitwise::SourceRegister(Register::Reg1),
        Bitwise::DestinationRegister(Register::Reg1),
        Bitwise::Length(mask.len() as u32),
        Bitwise::Mask(DataAttribute::Value(mask.to_vec())),
        Bitwise::Xor(DataAttribute::Value(vec![0; mask.len()])),
    ])
}

/// `[ immediate reg 0 VERDICT ]`
fn verdict(code: Verdict) -> Vec<Expressions> {
    vec![Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(code)])),
    ])]
}

/// `accept`
pub fn accept() -> Vec<Expressions> {
    verdict(Verdict::Other(NF_ACCEPT))
}

/// `drop`
pub fn drop() -> Vec<Expressions> {
    verdict(Verdict::Other(NF_DROP))
}

/// `return`
pub fn ret() -> Vec<Expressions> {
    verdict(Verdict::Return)
}

/// `meta nfproto ipv4|ipv6`: the implicit first match of `ip`/`ip6` fields in
/// an `inet` table.
fn nfproto(proto: u8) -> [Expressions; 2] {
    [meta(MetaKey::Nfproto), cmp(Operator::Equal, &[proto])]
}

/// `ip daddr NET/PREFIX`. Like `nft`: a prefix on a byte boundary loads and
/// compares only its bytes; any other loads the address and masks it.
pub fn ip_daddr(net: Ipv4Addr, prefix: u8) -> Vec<Expressions> {
    let prefix = u32::from(prefix.min(32));
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    let net = (u32::from(net) & bits).to_be_bytes();
    let mut exprs = nfproto(NFPROTO_IPV4).to_vec();
    if prefix % 8 == 0 {
        let len = prefix / 8;
        exprs.push(payload(NFT_PAYLOAD_NETWORK_HEADER, 16, len));
        exprs.push(cmp(Operator::Equal, &net[..len as usize]));
    } else {
        exprs.push(payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4));
        exprs.push(mask(&bits.to_be_bytes()));
        exprs.push(cmp(Operator::Equal, &net));
    }
    exprs
}

/// `ip6 daddr ADDR`
pub fn ip6_daddr(addr: Ipv6Addr) -> Vec<Expressions> {
    let mut exprs = nfproto(NFPROTO_IPV6).to_vec();
    exprs.push(payload(NFT_PAYLOAD_NETWORK_HEADER, 24, 16));
    exprs.push(cmp(Operator::Equal, &addr.octets()));
    exprs
}

fn ifname(key: MetaKey, op: Operator, name: &str) -> Vec<Expressions> {
    let mut padded = [0u8; IFNAMSIZ];
    let len = name.len().min(IFNAMSIZ - 1);
    padded[..len].copy_from_slice(&name.as_bytes()[..len]);
    vec![meta(key), cmp(op, &padded)]
}

/// `iifname NAME` (`eq`) or `iifname != NAME`
pub fn iifname(equal: bool, name: &str) -> Vec<Expressions> {
    ifname(MetaKey::Iifname, operator(equal), name)
}

/// `oifname NAME` (`eq`) or `oifname != NAME`
pub fn oifname(equal: bool, name: &str) -> Vec<Expressions> {
    ifname(MetaKey::Oifname, operator(equal), name)
}

fn operator(equal: bool) -> Operator {
    if equal {
        Operator::Equal
    } else {
        Operator::NotEqual
    }
}

/// `meta l4proto PROTO`
pub fn l4proto(proto: u8) -> Vec<Expressions> {
    vec![meta(MetaKey::L4Proto), cmp(Operator::Equal, &[proto])]
}

/// `udp dport PORT` (which implies `meta l4proto udp`)
pub fn udp_dport(port: u16) -> Vec<Expressions> {
    let mut exprs = l4proto(IPPROTO_UDP);
    exprs.push(payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2));
    exprs.push(cmp(Operator::Equal, &port.to_be_bytes()));
    exprs
}

/// `redirect to :PORT`
pub fn redirect_to(port: u16) -> Vec<Expressions> {
    vec![
        Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Reg1),
            Immediate::Data(DataAttribute::Value(port.to_be_bytes().to_vec())),
        ]),
        Expressions::Other {
            expression_type: "redir".to_string(),
            attributes: vec![
                DefaultNla::new(
                    NFTA_REDIR_REG_PROTO_MIN,
                    u32::from(Register::Reg1).to_be_bytes().to_vec(),
                ),
                DefaultNla::new(
                    NFTA_REDIR_FLAGS,
                    NF_NAT_RANGE_PROTO_SPECIFIED.to_be_bytes().to_vec(),
                ),
            ],
        },
    ]
}

// ---------------------------------------------------------------------------
// Messages.

/// One message of a batch, with what it is in words (for errors).
pub struct Request {
    pub what: String,
    pub message: NfTablesMessage,
    flags: u16,
}

/// The batch's messages between BEGIN and END: the table replaced by `table`.
pub fn replace_table(table: &Table) -> Vec<Request> {
    let new_table = || {
        NfTablesMessage::NewTable(TableMessage {
            attributes: vec![
                TableAttribute::Name(table.name.to_string()),
                TableAttribute::Flags(TableFlags::default()),
            ],
        })
    };
    let mut requests = vec![
        Request {
            what: format!("table inet {} (creating it if missing)", table.name),
            message: new_table(),
            flags: NLM_F_CREATE,
        },
        Request {
            what: format!("delete table inet {}", table.name),
            message: NfTablesMessage::DeleteTable(TableMessage {
                attributes: vec![TableAttribute::Name(table.name.to_string())],
            }),
            flags: 0,
        },
        Request {
            what: format!("table inet {}", table.name),
            message: new_table(),
            flags: NLM_F_CREATE,
        },
    ];
    for chain in &table.chains {
        requests.push(Request {
            what: format!(
                "chain {} (type {} hook {} priority {})",
                chain.name,
                chain.kind.name(),
                chain.hook.name(),
                chain.priority
            ),
            message: NfTablesMessage::NewChain(ChainMessage {
                attributes: vec![
                    ChainAttribute::Table(table.name.to_string()),
                    ChainAttribute::Name(chain.name.to_string()),
                    ChainAttribute::Type(chain.kind.name().to_string()),
                    ChainAttribute::Hook(vec![
                        Hook::Number(HookNumber::Inet(chain.hook.number())),
                        // The kernel reads it as a signed 32-bit number.
                        Hook::Priority(chain.priority as u32),
                    ]),
                ],
            }),
            flags: NLM_F_CREATE,
        });
    }
    for chain in &table.chains {
        for (i, rule) in chain.rules.iter().enumerate() {
            let exprs = rule
                .exprs
                .iter()
                .cloned()
                .map(ListAttribute::<ExpressionAttribute>::from)
                .collect();
            requests.push(Request {
                what: format!("rule {} of chain {}: `{}`", i + 1, chain.name, rule.text),
                message: NfTablesMessage::NewRule(RuleMessage {
                    attributes: vec![
                        RuleAttribute::Table(table.name.to_string()),
                        RuleAttribute::Chain(chain.name.to_string()),
                        RuleAttribute::Expressions(exprs),
                    ],
                }),
                flags: NLM_F_CREATE | NLM_F_APPEND,
            });
        }
    }
    requests
}

fn netlink_message(
    family: NetfilterProtoFamily,
    res_id: u16,
    inner: impl Into<netlink_packet_netfilter::NetfilterMessageInner>,
    flags: u16,
    seq: u32,
) -> NetlinkMessage<NetfilterMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, res_id),
            inner,
        )),
    );
    msg.finalize();
    msg
}

/// The bytes of one batch: BEGIN (sequence number `first_seq`), each request
/// (the next numbers, each asking for an acknowledgement), END.
pub fn encode_batch(requests: &[Request], first_seq: u32) -> Vec<u8> {
    let mut messages = Vec::with_capacity(requests.len() + 2);
    let delimiter = |inner: ControlMessage, seq| {
        netlink_message(
            NetfilterProtoFamily::Unspec,
            NFNL_SUBSYS_NFTABLES,
            inner,
            0,
            seq,
        )
    };
    messages.push(delimiter(ControlMessage::BatchBegin, first_seq));
    let mut seq = first_seq;
    for request in requests {
        seq = seq.wrapping_add(1);
        messages.push(netlink_message(
            NetfilterProtoFamily::Inet,
            0,
            request.message.clone(),
            request.flags | NLM_F_ACK,
            seq,
        ));
    }
    messages.push(delimiter(ControlMessage::BatchEnd, seq.wrapping_add(1)));
    let mut buf = vec![0u8; messages.iter().map(|m| m.buffer_len()).sum()];
    let mut at = 0;
    for m in &messages {
        let len = m.buffer_len();
        m.serialize(&mut buf[at..at + len]);
        at += len;
    }
    buf
}

// ---------------------------------------------------------------------------
// Talking to the kernel.

/// Why a batch was not applied. The messages carry their cause (no `source`),
/// so that `{:#}` does not print it twice.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nfnetlink socket: {0}")]
    Socket(io::Error),
    #[error("the kernel refused {what}: {errno}")]
    Refused { what: String, errno: io::Error },
    #[error("the kernel did not acknowledge {what}")]
    NoAnswer { what: String },
    #[error("unreadable answer from the kernel: {0}")]
    Answer(String),
}

/// The kernel's answer to each message of a batch, by sequence number:
/// 0 for an acknowledgement, a negative errno for a refusal.
pub fn parse_answers(mut buf: &[u8], answers: &mut Vec<(u32, i32)>) -> Result<(), NftError> {
    while !buf.is_empty() {
        let msg = NetlinkBuffer::new_checked(buf).map_err(|e| NftError::Answer(e.to_string()))?;
        let len = (msg.length() as usize).min(buf.len());
        if msg.message_type() == NLMSG_ERROR {
            let err = ErrorBuffer::new_checked(msg.payload())
                .map_err(|e| NftError::Answer(e.to_string()))?;
            answers.push((msg.sequence_number(), err.code().map_or(0, |c| c.get())));
        }
        // Messages are 4-byte aligned in a datagram.
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or_default();
    }
    Ok(())
}

/// What went wrong, if anything, given the answers to a batch sent with
/// [`encode_batch`]`(requests, first_seq)`: the first refused message, else
/// the first one without an acknowledgement.
pub fn check_answers(
    requests: &[Request],
    first_seq: u32,
    answers: &[(u32, i32)],
) -> Result<(), NftError> {
    let end_seq = first_seq.wrapping_add(requests.len() as u32 + 1);
    let name = |seq: u32| -> String {
        if seq == first_seq {
            return "the batch's start".to_string();
        }
        if seq == end_seq {
            return "the batch's end".to_string();
        }
        let i = seq.wrapping_sub(first_seq).wrapping_sub(1) as usize;
        requests
            .get(i)
            .map_or_else(|| format!("message {seq}"), |r| r.what.clone())
    };
    // A refusal of the batch itself (permissions, no nf_tables) comes first.
    let mut refusals: Vec<&(u32, i32)> = answers.iter().filter(|(_, code)| *code != 0).collect();
    refusals.sort_by_key(|(seq, _)| seq.wrapping_sub(first_seq));
    if let Some((seq, code)) = refusals.first() {
        return Err(NftError::Refused {
            what: name(*seq),
            errno: io::Error::from_raw_os_error(code.saturating_neg()),
        });
    }
    for i in 0..requests.len() {
        let seq = first_seq.wrapping_add(i as u32 + 1);
        if !answers.iter().any(|(s, _)| *s == seq) {
            return Err(NftError::NoAnswer { what: name(seq) });
        }
    }
    Ok(())
}

/// Sends `requests` as one batch and waits for the kernel's verdict on each.
pub fn apply(requests: &[Request]) -> Result<(), NftError> {
    const FIRST_SEQ: u32 = 1;
    let batch = encode_batch(requests, FIRST_SEQ);
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
    socket.bind_auto().map_err(NftError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(NftError::Socket)?;
    let timeout = nix::sys::time::TimeVal::new(ANSWER_TIMEOUT.as_secs() as _, 0);
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
        .map_err(|e| NftError::Socket(e.into()))?;
    let sent = socket.send(&batch, 0).map_err(NftError::Socket)?;
    if sent != batch.len() {
        return Err(NftError::Socket(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", batch.len()),
        )));
    }

    let mut answers = Vec::with_capacity(requests.len());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let acked = answers.iter().filter(|(_, code)| *code == 0).count();
        let refused = answers.iter().any(|(_, code)| *code != 0);
        if acked >= requests.len() {
            break;
        }
        // After a refusal, take what is queued (the kernel answered while
        // handling the send) but wait for nothing more.
        let flags = if refused { libc::MSG_DONTWAIT } else { 0 };
        match socket.recv(&mut &mut buf[..], flags) {
            Ok(n) => parse_answers(&buf[..n], &mut answers)?,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(NftError::Socket(e)),
        }
    }
    check_answers(requests, FIRST_SEQ, &answers)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn table() -> Table {
        Table {
            name: "t",
            chains: vec![Chain {
                name: "c",
                kind: ChainType::Filter,
                hook: InetHook::Output,
                priority: -5,
                rules: vec![
                    Rule::new("meta l4proto tcp accept", [l4proto(IPPROTO_TCP), accept()]),
                    Rule::new("drop", [drop()]),
                ],
            }],
        }
    }

    #[test]
    fn batch_is_framed_and_numbered() {
        let requests = replace_table(&table());
        assert_eq!(requests.len(), 6); // new, delete, new, chain, 2 rules
        let batch = encode_batch(&requests, 100);
        let mut at = 0;
        let mut seen = vec![];
        while at < batch.len() {
            let m = NetlinkBuffer::new_checked(&batch[at..]).unwrap();
            seen.push((m.message_type(), m.flags(), m.sequence_number()));
            at += m.length() as usize;
        }
        assert_eq!(at, batch.len());
        let ack = NLM_F_REQUEST | NLM_F_ACK;
        assert_eq!(
            seen,
            vec![
                (0x10, NLM_F_REQUEST, 100),                       // BATCH_BEGIN
                (0x0a00, ack | NLM_F_CREATE, 101),                // NEWTABLE
                (0x0a02, ack, 102),                               // DELTABLE
                (0x0a00, ack | NLM_F_CREATE, 103),                // NEWTABLE
                (0x0a03, ack | NLM_F_CREATE, 104),                // NEWCHAIN
                (0x0a06, ack | NLM_F_CREATE | NLM_F_APPEND, 105), // NEWRULE
                (0x0a06, ack | NLM_F_CREATE | NLM_F_APPEND, 106),
                (0x11, NLM_F_REQUEST, 107), // BATCH_END
            ]
        );
        // BATCH_BEGIN: nfgenmsg with res_id NFNL_SUBSYS_NFTABLES (big endian).
        assert_eq!(hex(&batch[16..20]), "0000000a");
    }

    #[test]
    fn renders_as_an_nft_script() {
        assert_eq!(
            table().to_string(),
            "table inet t\ndelete table inet t\ntable inet t {\n    chain c {\n        \
             type filter hook output priority -5;\n        meta l4proto tcp accept\n        \
             drop\n    }\n}\n"
        );
    }

    #[test]
    fn prefixes_compile_like_nft() {
        // nft: [ payload load 1b @ network header + 16 => reg 1 ] [ cmp eq reg 1 0x0000007f ]
        let e = ip_daddr(Ipv4Addr::new(127, 0, 0, 1), 8);
        assert_eq!(e.len(), 4);
        assert_eq!(e[2], payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 1));
        assert_eq!(e[3], cmp(Operator::Equal, &[127]));
        // nft: [ payload load 4b ... ] [ bitwise reg 1 = ( reg 1 & 0x0000f0ff ) ^ 0x00000000 ]
        //      [ cmp eq reg 1 0x000010ac ]
        let e = ip_daddr(Ipv4Addr::new(172, 16, 0, 0), 12);
        assert_eq!(e.len(), 5);
        assert_eq!(e[2], payload(NFT_PAYLOAD_NETWORK_HEADER, 16, 4));
        assert_eq!(e[3], mask(&[0xff, 0xf0, 0, 0]));
        assert_eq!(e[4], cmp(Operator::Equal, &[172, 16, 0, 0]));
        let e = ip_daddr(Ipv4Addr::new(192, 168, 7, 7), 16);
        assert_eq!(e[3], cmp(Operator::Equal, &[192, 168]));
    }

    /// Runs `f` on a thread in a new, empty network namespace (a thread may
    /// have one of its own; the test process stays where it is). `None` when
    /// that is not allowed here (not root).
    pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| eprintln!("skipped: no network namespace ({e})"))
                .ok()
                .map(|()| f())
        })
        .join()
        .unwrap()
    }

    /// Whether this kernel has nf_tables at all (a host test may run anywhere).
    pub fn no_nf_tables(e: &NftError) -> bool {
        let skip = matches!(e, NftError::Refused { what, errno }
            if what == "the batch's start" || errno.raw_os_error() == Some(libc::EPROTONOSUPPORT));
        if skip {
            eprintln!("skipped: no nf_tables here ({e})");
        }
        skip
    }

    #[test]
    fn the_kernel_refusal_names_the_rule() {
        // A redirect in a filter chain: valid syntax, refused by the kernel
        // (nat expressions only run in nat chains).
        let mut t = table();
        t.chains[0].rules.insert(
            1,
            Rule::new(
                "meta l4proto tcp redirect to :1",
                [l4proto(IPPROTO_TCP), redirect_to(1)],
            ),
        );
        let Some(result) = in_new_netns(move || apply(&replace_table(&t))) else {
            return;
        };
        let err = result.unwrap_err();
        if no_nf_tables(&err) {
            return;
        }
        match &err {
            NftError::Refused { what, errno } => {
                assert_eq!(what, "rule 2 of chain c: `meta l4proto tcp redirect to :1`");
                assert_eq!(errno.raw_os_error(), Some(libc::EOPNOTSUPP), "{err}");
            }
            other => panic!("{other}"),
        }
    }

    fn answer(seq: u32, code: i32) -> Vec<u8> {
        // nlmsghdr + nlmsgerr (error code + the request's header)
        let mut m = vec![];
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&code.to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]);
        m
    }

    #[test]
    fn answers_name_the_refused_message() {
        let requests = replace_table(&table());
        let mut buf = vec![];
        for seq in 2..=5 {
            buf.extend(answer(seq, 0));
        }
        buf.extend(answer(6, -libc::EOPNOTSUPP));
        buf.extend(answer(7, 0));
        let mut answers = vec![];
        parse_answers(&buf, &mut answers).unwrap();
        assert_eq!(answers.len(), 6);
        let err = check_answers(&requests, 1, &answers).unwrap_err();
        match &err {
            NftError::Refused { what, errno } => {
                assert_eq!(what, "rule 1 of chain c: `meta l4proto tcp accept`");
                assert_eq!(errno.raw_os_error(), Some(libc::EOPNOTSUPP));
            }
            other => panic!("{other:?}"),
        }

        // All acknowledged.
        let all: Vec<(u32, i32)> = (2..=7).map(|s| (s, 0)).collect();
        check_answers(&requests, 1, &all).unwrap();
        // One missing.
        let some: Vec<(u32, i32)> = (2..=6).map(|s| (s, 0)).collect();
        let err = check_answers(&requests, 1, &some).unwrap_err();
        assert!(err.to_string().contains("rule 2 of chain c"), "{err}");
        // The batch itself refused (as without CAP_NET_ADMIN).
        let err = check_answers(&requests, 1, &[(1, -libc::EPERM)]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the kernel refused the batch's start"),
            "{err}"
        );
        // Garbage is an error, not a panic.
        assert!(parse_answers(&[1, 2, 3], &mut vec![]).is_err());
    }
}
