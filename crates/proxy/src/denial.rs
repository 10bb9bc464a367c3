//! The text of a `403` the proxy answers itself: written for a model to act
//! on (docs/egress.md, "Denials an agent can read").
//!
//! Two lines: one sentence of fact (the request, the destination, the
//! reason code and the rule that decided, if one did) and one of what to do,
//! which for a destination the user could allow is the exact
//! `sandpen-request network HOST:PORT "..."` line to ask with.

use sandpen_policy::reason;

use crate::audit::ConnectionReport;

/// The reason code before any `: detail`.
fn code(reason: &str) -> &str {
    reason.split(':').next().unwrap_or_default().trim()
}

/// `host:port`, IPv6 in brackets.
fn destination(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// What to do about a refusal with this reason code.
pub fn advice(host: &str, port: u16, reason_code: &str) -> String {
    let dest = destination(host, port);
    let ask = format!("To ask the user: sandpen-request network {dest} \"<why you need it>\"");
    match reason_code {
        reason::NO_MATCHING_RULE | reason::ASK_TIMEOUT | reason::ASK_DENIED => ask,
        reason::DENIED_BY_RULE | reason::DENIED_ADDRESS => format!(
            "The user's policy denies it on purpose; do not try another route. If the task cannot be done without it: sandpen-request network {dest} \"<why you need it>\""
        ),
        reason::BLOCKED_ADDRESS => "Local, private and metadata addresses are never reachable from the sandbox; do not retry.".into(),
        reason::FLOW => "The sandbox read a secret, so only trusted sinks are reachable until the user runs `sandpen flow reset`; do not retry another way.".into(),
        "host-mismatch" | "sni-mismatch" => "Send the request to the host the connection was opened for (the Host header and TLS SNI must name it).".into(),
        "raw-refused" => format!(
            "Only HTTP and TLS may go to a host allowed by name; for another protocol: sandpen-request network {dest} \"<why you need it>\" and say it needs a raw connection"
        ),
        "upgrade-refused" => "Protocol upgrades over plain HTTP are not relayed; use TLS (https://, wss://).".into(),
        "policy-changed" => format!(
            "The policy changed while the connection was open; to ask the user: sandpen-request network {dest} \"<why you need it>\""
        ),
        _ => "Check the request and do not retry it unchanged.".into(),
    }
}

/// The body of a `403` for `rec` (its destination, decision and rule) and
/// `request`, the request line the guest sent, if one.
pub fn explain(rec: &ConnectionReport, request: Option<&str>) -> String {
    let dest = destination(&rec.host, rec.port);
    let mut why = rec.reason.clone();
    if let (Some(id), Some(scope), Some(text)) = (rec.rule_id, rec.rule_scope, &rec.rule) {
        why.push_str(&format!(", rule {id} ({scope}: {text})"));
    }
    let mut code_of = code(&rec.reason);
    // `policy-changed: no-matching-rule` advises as its cause does.
    if code_of == "policy-changed" {
        let cause = rec.reason.split_once(':').map_or("", |(_, c)| code(c));
        if !cause.is_empty() {
            code_of = cause;
        }
    }
    let fact = match request {
        Some(r) => {
            format!("sandpen: `{r}` was refused: {dest} is not allowed for this sandbox ({why}).")
        }
        None => format!("sandpen: {dest} is not allowed for this sandbox ({why})."),
    };
    format!("{fact}\n{}\n", advice(&rec.host, rec.port, code_of))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpen_policy::{Decision, RuleRef, Scope, Verdict};

    fn rec(reason: &str, rule: Option<RuleRef>) -> ConnectionReport {
        let mut r = ConnectionReport::new("s", "http-proxy", "denied.test", 80);
        r.set_decision(&Decision::new(Verdict::Deny, rule, reason));
        r
    }

    #[test]
    fn a_rule_denial_names_the_rule_and_the_request_line() {
        let rule = RuleRef {
            id: 2,
            scope: Scope::Global,
            text: "deny denied.test".into(),
        };
        let body = explain(
            &rec(reason::DENIED_BY_RULE, Some(rule)),
            Some("GET http://denied.test/x HTTP/1.1"),
        );
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines.len(), 2, "{body}");
        assert_eq!(
            lines[0],
            "sandpen: `GET http://denied.test/x HTTP/1.1` was refused: denied.test:80 is not \
             allowed for this sandbox (denied-by-rule, rule 2 (global: deny denied.test))."
        );
        assert!(
            lines[1].contains("sandpen-request network denied.test:80"),
            "{body}"
        );
    }

    #[test]
    fn an_undecided_destination_says_how_to_ask() {
        let body = explain(&rec(reason::NO_MATCHING_RULE, None), None);
        assert_eq!(
            body,
            "sandpen: denied.test:80 is not allowed for this sandbox (no-matching-rule).\n\
             To ask the user: sandpen-request network denied.test:80 \"<why you need it>\"\n"
        );
        let body = explain(&rec("ask-timeout: no answer within 5 s", None), None);
        assert!(
            body.contains("(ask-timeout: no answer within 5 s)"),
            "{body}"
        );
        assert!(body.contains("sandpen-request network"), "{body}");
    }

    #[test]
    fn what_no_request_can_change_says_so() {
        let body = explain(&rec("blocked-address: 10.0.0.1", None), None);
        assert!(!body.contains("sandpen-request"), "{body}");
        assert!(body.contains("never reachable"), "{body}");
        let body = explain(&rec("flow: secret-read at T from /w/.env", None), None);
        assert!(body.contains("flow reset"), "{body}");
    }
}
