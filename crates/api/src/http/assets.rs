//! The page's files, compiled into the binary (docs/ui.md): nothing is
//! downloaded at run time. xterm.js is vendored from npm, unchanged
//! (`assets/vendor/xterm/VERSION`).

pub const BOOT_HTML: &[u8] = include_bytes!("../../assets/boot.html");
pub const BOOT_JS: &[u8] = include_bytes!("../../assets/boot.js");
pub const INDEX_HTML: &[u8] = include_bytes!("../../assets/index.html");

const FILES: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript",
        include_bytes!("../../assets/app.js"),
    ),
    (
        "app.css",
        "text/css",
        include_bytes!("../../assets/app.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_bytes!("../../assets/icon.svg"),
    ),
    (
        "xterm.js",
        "text/javascript",
        include_bytes!("../../assets/vendor/xterm/xterm.js"),
    ),
    (
        "xterm.css",
        "text/css",
        include_bytes!("../../assets/vendor/xterm/xterm.css"),
    ),
    (
        "addon-fit.js",
        "text/javascript",
        include_bytes!("../../assets/vendor/xterm/addon-fit.js"),
    ),
];

/// A file under `/static/` by name: its type and bytes.
pub fn find(name: &str) -> Option<(&'static str, &'static [u8])> {
    FILES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, ty, body)| (*ty, *body))
}
