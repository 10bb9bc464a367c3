//! The frames the host reads from the guest (`crates/proto`): one
//! length-delimited postcard frame (`read_one`, as the supervisor reads each
//! guest-opened stream's `GuestOpen`; `EgressOpen` inside it) and the message
//! types of the control channel. No panic, no allocation beyond the frame limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandpen_proto::frame::{read_one, MAX_FRAME};
use sandpen_proto::messages::{EgressOpen, ExecEvent, GuestOpen, Pong, SetupReply};

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let _ = futures::executor::block_on(read_one::<EgressOpen, _>(&mut input, MAX_FRAME));
    let _ = postcard::from_bytes::<EgressOpen>(data);
    let _ = futures::executor::block_on(read_one::<GuestOpen, _>(&mut &data[..], MAX_FRAME));
    let _ = postcard::from_bytes::<ExecEvent>(data);
    let _ = postcard::from_bytes::<SetupReply>(data);
    let _ = postcard::from_bytes::<Pong>(data);
});
