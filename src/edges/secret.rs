//! Secrets never leave the process in text: every log line, invocation answer and operator output
//! passes through [`redact`] at the edge.
//!
//! Two nets, because either alone misses something. Patterns catch the secrets whose shape is
//! known wherever they come from — a SAS `sig=` in a storage URL an error message quotes, an
//! `AccountKey=` in a connection string, a token in a webhook's query, a bearer token. Registered
//! values catch the configured secrets whatever text quotes them (a connection string, the managed
//! identity header) — [`register`] them when the settings are read.

use std::sync::RwLock;

/// What a secret is replaced with.
pub const MASK: &str = "REDACTED";

/// `name=value` pairs of connection strings whose value is a secret, found at the start of any
/// name (`accountkey=` is not found inside `myaccountkey=`).
const SECRET_SETTINGS: [&str; 4] = ["accountkey=", "sharedaccesssignature=", "password=", "pwd="];

/// Query parameters whose value is a secret (a SAS signature, a Functions key, a webhook's
/// token), found only after `?` or `&`: our own log fields (`code=OperationNotAllowed`) are not.
const SECRET_PARAMETERS: [&str; 10] = [
    "sig=",
    "code=",
    "token=",
    "access_token=",
    "refresh_token=",
    "client_secret=",
    "secret=",
    "apikey=",
    "api-key=",
    "key=",
];

/// Schemes whose value is the rest of the word: `Authorization: Bearer <token>`.
const SECRET_SCHEMES: [&str; 2] = ["bearer ", "sharedkey "];

/// Shorter registered values are not redacted: they would mask ordinary words.
const MIN_REGISTERED: usize = 8;

static REGISTERED: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Remembers a configured secret (and, for a connection string or URL, the secrets inside it),
/// so that any text quoting it is redacted.
pub fn register(value: &str) {
    let value = value.trim();
    if value.len() < MIN_REGISTERED {
        return;
    }
    let mut found = vec![value.to_string()];
    // The secret parts on their own, as an error may quote one without the rest.
    for (start, end) in secret_spans(value) {
        found.push(value[start..end].to_string());
    }
    let mut registered = REGISTERED.write().unwrap_or_else(|e| e.into_inner());
    for v in found {
        if v.len() >= MIN_REGISTERED && !registered.contains(&v) {
            registered.push(v);
        }
    }
    // Longest first, so a value containing another is masked whole.
    registered.sort_by_key(|v| std::cmp::Reverse(v.len()));
}

/// `text` with every secret it contains replaced by [`MASK`].
pub fn redact(text: &str) -> String {
    let mut out = text.to_string();
    {
        let registered = REGISTERED.read().unwrap_or_else(|e| e.into_inner());
        for v in registered.iter() {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), MASK);
            }
        }
    }
    let spans = secret_spans(&out);
    if spans.is_empty() {
        return out;
    }
    let mut masked = String::with_capacity(out.len());
    let mut at = 0;
    for (start, end) in spans {
        masked.push_str(&out[at..start]);
        masked.push_str(MASK);
        at = end;
    }
    masked.push_str(&out[at..]);
    masked
}

/// Byte ranges of the secret values in `text`, in order, not overlapping.
fn secret_spans(text: &str) -> Vec<(usize, usize)> {
    let lower = text.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let before = (i > 0).then(|| bytes[i - 1]);
        let boundary = before.is_none_or(|b| !is_name_char(b));
        let in_query = matches!(before, Some(b'?' | b'&'));
        // Bytes, not `str` slices: `i` may fall inside a multi-byte character.
        let starts = |p: &&&str| bytes[i..].starts_with(p.as_bytes());
        let hit = if !boundary {
            None
        } else {
            SECRET_SETTINGS
                .iter()
                .chain(SECRET_SCHEMES.iter())
                .find(starts)
                .or_else(|| {
                    in_query
                        .then(|| SECRET_PARAMETERS.iter().find(starts))
                        .flatten()
                })
        };
        if let Some(prefix) = hit {
            let start = i + prefix.len();
            let end = start + value_len(&bytes[start..]);
            if end > start && !already_masked(&text[start..end]) {
                spans.push((start, end));
            }
            i = end.max(start);
            continue;
        }
        if let Some(span) = userinfo_password(bytes, i) {
            spans.push(span);
            i = span.1;
            continue;
        }
        i += 1;
    }
    spans
}

/// `https://user:password@host`: the password.
fn userinfo_password(bytes: &[u8], i: usize) -> Option<(usize, usize)> {
    if !bytes[i..].starts_with(b"://") {
        return None;
    }
    let start = i + 3;
    let authority_end = bytes[start..]
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#' | b'"') || b.is_ascii_whitespace())
        .map_or(bytes.len(), |n| start + n);
    let authority = &bytes[start..authority_end];
    let at = authority.iter().rposition(|b| *b == b'@')? + start;
    let colon = bytes[start..at].iter().position(|b| *b == b':')? + start;
    (at > colon + 1).then_some((colon + 1, at))
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// A value runs to the next separator of the text it sits in (a connection string, a query, a
/// quoted string, a log line).
fn value_len(rest: &[u8]) -> usize {
    rest.iter()
        .position(|b| {
            matches!(
                b,
                b';' | b'&'
                    | b'"'
                    | b'\''
                    | b'`'
                    | b'\\'
                    | b')'
                    | b'('
                    | b'<'
                    | b'>'
                    | b','
                    | b']'
                    | b'}'
            ) || b.is_ascii_whitespace()
        })
        .unwrap_or(rest.len())
}

fn already_masked(value: &str) -> bool {
    value == MASK
}

/// A `tracing` writer that redacts each formatted event before it reaches the output. The
/// formatter writes one event in one `write_all`, so a secret is never split between calls.
pub struct Redacting<W>(pub W);

impl<W: std::io::Write> std::io::Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Makes [`Redacting`] writers over standard output or standard error.
#[derive(Debug, Clone, Copy)]
pub enum Output {
    Stdout,
    Stderr,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Output {
    type Writer = Redacting<Box<dyn std::io::Write + 'a>>;

    fn make_writer(&'a self) -> Self::Writer {
        match self {
            Output::Stdout => Redacting(Box::new(std::io::stdout().lock())),
            Output::Stderr => Redacting(Box::new(std::io::stderr().lock())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_shapes_are_masked_wherever_they_appear() {
        #[rustfmt::skip]
        let cases = [
            ("a SAS in a request URL",
             "error sending request for url (https://acct.table.core.windows.net/Tables?sv=2022-11-02&ss=t&sig=AbC%2Bd3%3D&se=2099)",
             "error sending request for url (https://acct.table.core.windows.net/Tables?sv=2022-11-02&ss=t&sig=REDACTED&se=2099)"),
            ("an account key in a connection string",
             "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=Zm9vYmFy+/==;EndpointSuffix=core.windows.net",
             "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=REDACTED;EndpointSuffix=core.windows.net"),
            ("a SAS connection string",
             "TableEndpoint=https://a/;SharedAccessSignature=sv=1&sig=x",
             "TableEndpoint=https://a/;SharedAccessSignature=REDACTED&sig=REDACTED"),
            ("a webhook's query token, quoted in JSON",
             r#"{"error":"POST https://hooks.example/x?code=s3cr3t&y=1 failed"}"#,
             r#"{"error":"POST https://hooks.example/x?code=REDACTED&y=1 failed"}"#),
            ("a bearer token", "Authorization: Bearer eyJ0eXAi.eyJhdWQi.sig", "Authorization: Bearer REDACTED"),
            ("a password in a URL", "https://user:hunter22@example.com/x", "https://user:REDACTED@example.com/x"),
            ("case does not matter", "ACCOUNTKEY=abc;", "ACCOUNTKEY=REDACTED;"),
            ("a name that only ends like one is left", "x?monkey=1&turnkey=2 myaccountkey=3", "x?monkey=1&turnkey=2 myaccountkey=3"),
            ("our own log fields are not query parameters", "code=OperationNotAllowed key=web", "code=OperationNotAllowed key=web"),
            ("nothing secret", "instance 7 of web: restart sent", "instance 7 of web: restart sent"),
            ("already masked stays so", "sig=REDACTED", "sig=REDACTED"),
            ("text around it may be any Unicode", "…/web[DOWN_PROOF=name] é?sig=ü…", "…/web[DOWN_PROOF=name] é?sig=REDACTED"),
        ];
        for (name, input, want) in cases {
            assert_eq!(redact(input), want, "{name}");
        }
    }

    proptest::proptest! {
        /// It runs on every log line: it must never panic, and never leave a known shape behind.
        #[test]
        fn any_text_is_redacted_without_panicking(before in "\\PC{0,40}", secret in "[A-Za-z0-9%+/=]{1,30}", after in "\\PC{0,40}") {
            let _ = redact(&before);
            let text = format!("{before} https://h/?sig={secret} {after}");
            let out = redact(&text);
            proptest::prop_assert!(out.contains("sig=REDACTED"), "{}", out);
        }
    }

    #[test]
    fn registered_values_are_masked_whatever_quotes_them() {
        register("IdentityHeaderValue-0123456789");
        register("short");
        assert_eq!(
            redact("header X-IDENTITY-HEADER: IdentityHeaderValue-0123456789 refused"),
            "header X-IDENTITY-HEADER: REDACTED refused"
        );
        assert_eq!(redact("short words stay"), "short words stay");
        // The parts of a registered connection string are registered on their own too.
        register("AccountName=a;AccountKey=c2VjcmV0LWtleS12YWx1ZQ==");
        assert_eq!(
            redact("the key c2VjcmV0LWtleS12YWx1ZQ== is not base64"),
            "the key REDACTED is not base64"
        );
    }

    #[test]
    fn the_log_writer_redacts_what_it_writes() {
        use std::io::Write;
        let mut out = Redacting(Vec::new());
        out.write_all(b"failed: https://x/?sig=abc&sv=1\n").unwrap();
        assert_eq!(
            String::from_utf8(out.0).unwrap(),
            "failed: https://x/?sig=REDACTED&sv=1\n"
        );
    }
}
