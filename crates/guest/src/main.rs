//! `sandpen-guest`: PID 1 of a sandpen VM.
//!
//! It starts as `/init` in sandpen's initramfs, loads the few boot modules, mounts
//! the root disk and switches to it, then serves the host over the virtio-serial
//! port. Everything here is plumbing: the guest is untrusted, and no security rule
//! is enforced on this side.

mod boot;
mod channel;
mod copy;
mod docker;
mod egress;
mod exec;
mod netconf;
mod nftables;
mod reaper;
mod request;
mod setup;
mod sys;
mod users;

use std::sync::Arc;

/// Prints to the serial console, which the host keeps in `logs/console.log`.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("sandpen-guest: {}", format_args!($($arg)*))
    };
}

fn main() {
    // `sandpen-request` (the same binary, installed under that name), or
    // `sandpen-guest request ...`: an agent's request to the user.
    let mut args = std::env::args();
    let argv0 = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    if std::path::Path::new(&argv0).file_name() == Some(std::ffi::OsStr::new("sandpen-request")) {
        std::process::exit(request::main(rest));
    }
    if rest.first().map(String::as_str) == Some("request") {
        std::process::exit(request::main(rest[1..].to_vec()));
    }
    if std::process::id() != 1 {
        eprintln!(
            "sandpen-guest is the init process of a sandpen VM; it is not meant to be run by hand"
        );
        std::process::exit(2);
    }
    // The kernel starts init with almost no environment; the tools setup runs
    // (useradd, ip, resize2fs) live in sbin directories.
    std::env::set_var("PATH", exec::DEFAULT_PATH);
    if let Err(e) = boot::early_boot() {
        log!("boot failed: {e:#}");
        sys::power_off();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot start the runtime: {e}");
            sys::power_off();
        }
    };
    rt.block_on(async {
        let reaper = Arc::new(reaper::Reaper::default());
        reaper::spawn_reaper_task(reaper.clone());
        if let Err(e) = channel::serve(reaper).await {
            log!("host channel failed: {e:#}");
        }
    });
    sys::shutdown_and_power_off();
}
