//! Admin HTTP/1.1 framing on httparse: request heads, bodies, `Expect`, keep-alive, responses.
//!
//! Read reference §5 and design §10 first. Pure: no sockets, no clock. The admin
//! connection appends what it reads to one input buffer and calls
//! [`Decoder::decode`]; indices into that buffer stay valid between calls
//! because bytes are only removed when a whole request is returned.
//!
//! Everything is bounded: the head to [`MAX_HEAD`], the decoded
//! body to [`MAX_BODY`], chunk extensions and trailers to [`MAX_HEAD`] each.
//! Blank lines are found by scanning only new bytes, and httparse runs once per
//! head, so a head dribbled in byte by byte costs linear time (pitfall 17).

use std::fmt;

use httparse::Status;

/// Longest request head accepted: request line and headers, including the blank line.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted, inclusive; for chunked bodies, the decoded size.
pub const MAX_BODY: usize = 1024 * 1024;
/// The interim response that lets a client waiting on `Expect: 100-continue` send its body.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

// The longest standard method is 7 bytes; 32 leaves room for extensions.
const METHOD_LIMIT: usize = 32;
// curl sends about six fields; more than 64 answers 431.
const MAX_HEADERS: usize = 64;
// A chunk-size line without extensions: at most 16 hex digits (httparse's cap) and CRLF.
const BARE_SIZE_LINE: usize = 16 + 2;

/// One complete admin request, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method as sent (a valid token); the router answers 405 for unknown ones.
    pub method: String,
    /// The percent-decoded path, without the query.
    pub path: String,
    /// The raw text after the first `?`, if there was one.
    pub query: Option<String>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// Whether the connection may carry another request after this one's response.
    pub keep_alive: bool,
    /// The fields that say who is asking, for the admin API's access checks.
    pub from: Caller,
}

/// The request fields that tell a browser (or a page it runs) from curl, and
/// carry the admin token. Values are kept as sent, lossily decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// `Host`.
    pub host: Option<String>,
    /// `Origin`: only browsers send it.
    pub origin: Option<String>,
    /// `Sec-Fetch-Site`: a browser's word on where the request comes from.
    pub fetch_site: Option<String>,
    /// `Authorization`.
    pub authorization: Option<String>,
}

/// Why a request cannot be decoded; the caller answers [`HttpError::status`] and closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The head (or the trailer section) is longer than [`MAX_HEAD`] or has too many fields.
    HeadTooLarge,
    /// The body is, or is announced to be, larger than [`MAX_BODY`].
    BodyTooLarge,
    /// The request breaks HTTP/1.1 syntax or framing; the text says how.
    Malformed(String),
    /// An `Expect` value other than `100-continue`.
    UnsupportedExpect(String),
    /// A transfer coding other than `chunked`.
    UnsupportedTransferEncoding(String),
}

impl HttpError {
    /// The status code that answers this error.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::Malformed(_) => 400,
            HttpError::UnsupportedExpect(_) => 417,
            HttpError::UnsupportedTransferEncoding(_) => 501,
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::HeadTooLarge => {
                write!(f, "request head larger than {MAX_HEAD} bytes or over {MAX_HEADERS} fields")
            }
            HttpError::BodyTooLarge => write!(f, "request body larger than {MAX_BODY} bytes"),
            HttpError::Malformed(why) => write!(f, "malformed request: {why}"),
            HttpError::UnsupportedExpect(v) => write!(f, "unsupported expect value {v:?} (only 100-continue is)"),
            HttpError::UnsupportedTransferEncoding(v) => {
                write!(f, "unsupported transfer-encoding {v:?} (only chunked is)")
            }
        }
    }
}

impl std::error::Error for HttpError {}

/// What one call to [`Decoder::decode`] achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// The request is incomplete: read more, then call again.
    NeedMore,
    /// Write [`CONTINUE`], then call again (the client waits for it before sending the body).
    SendContinue,
    /// A whole request; its bytes are gone from the input.
    Request(Request),
}

/// Incremental decoder for one connection's requests.
#[derive(Debug, Default)]
pub struct Decoder {
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Looking for the blank line: `start` is past any leading empty lines, `scanned` is where to resume.
    Head { start: usize, scanned: usize, line_checked: bool },
    /// The head is parsed; the body is arriving.
    Body(Box<Pending>),
}

impl Default for Phase {
    fn default() -> Self {
        Phase::Head { start: 0, scanned: 0, line_checked: false }
    }
}

/// A parsed head and its body so far; `pos` is the next unread input index.
/// Body bytes are copied out as they arrive and their framing is dropped from
/// the input, so the input never holds more than a read's worth: the body
/// limit is on the body alone, however it is chunked.
#[derive(Debug)]
struct Pending {
    /// Owned at once, since httparse's view borrows the input; the body grows in place.
    request: Request,
    pos: usize,
    step: Step,
    /// Chunk-extension bytes still allowed across the whole body.
    ext_budget: usize,
    /// True until `SendContinue` has been returned for this request.
    expect_continue: bool,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// `Content-Length` (0 without one): this many body bytes are still to come.
    Length { left: usize },
    /// Looking for a chunk-size line's LF.
    Size { scanned: usize },
    /// Inside a chunk, with this many data bytes left.
    Data { left: usize },
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Looking for the blank line after the last chunk and any trailer fields.
    Trailers { scanned: usize },
}

impl Decoder {
    /// A decoder waiting for the first request head.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes from `input` (every byte received and not yet consumed). On `Request`, the request's bytes are removed
    /// from the front of `input`; pipelined bytes after it stay for the next call.
    pub fn decode(&mut self, input: &mut Vec<u8>) -> Result<Progress, HttpError> {
        // Taken out so each phase moves instead of being cloned; after an error the caller closes anyway.
        let mut pending = match std::mem::take(&mut self.phase) {
            Phase::Head { mut start, mut scanned, mut line_checked } => {
                match decode_head(input, &mut start, &mut scanned, &mut line_checked)? {
                    Some(pending) => Box::new(pending),
                    None => {
                        self.phase = Phase::Head { start, scanned, line_checked };
                        return Ok(Progress::NeedMore);
                    }
                }
            }
            Phase::Body(pending) => pending,
        };
        if let Some(end) = pending.advance(input)? {
            input.drain(..end);
            return Ok(Progress::Request(pending.request));
        }
        pending.forget_read(input);
        // Only while the body is incomplete: curl would otherwise wait 1 s before sending it (pitfall 18).
        let send = std::mem::take(&mut pending.expect_continue);
        self.phase = Phase::Body(pending);
        Ok(if send { Progress::SendContinue } else { Progress::NeedMore })
    }
}

/// Parses the head once its blank line has arrived; `None` (scan state updated) to wait for more.
fn decode_head(
    input: &[u8],
    start: &mut usize,
    scanned: &mut usize,
    line_checked: &mut bool,
) -> Result<Option<Pending>, HttpError> {
    // RFC 9112 §2.2: ignore empty lines before the request line (some clients add CRLF after a body).
    loop {
        *start += match input.get(*start..) {
            Some([b'\n', ..]) => 1,
            Some([b'\r', b'\n', ..]) => 2,
            _ => break,
        };
        if *start > MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
    }
    *scanned = (*scanned).max(*start);
    // The early checks run whether or not the blank line is here yet, so the
    // verdict on a request never depends on how it was split into reads.
    check_early(input, *start, line_checked)?;
    let Some(end) = section_end(input, *start, scanned)? else {
        return Ok(None);
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    complete(req.parse(&input[*start..end]))?;
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(malformed("incomplete request line"));
    };
    // The same rule as before the blank line arrived: the verdict must not
    // depend on how the request was split into reads.
    if method.len() > METHOD_LIMIT {
        return Err(malformed("the request does not start with an HTTP method"));
    }
    let (path, query) = split_target(target)?;
    let fields = Fields::read(req.headers, version)?;
    let step = match (fields.codings, fields.length) {
        (None, length) => match usize::try_from(length.unwrap_or(0)) {
            Ok(len) if len <= MAX_BODY => Step::Length { left: len },
            _ => return Err(HttpError::BodyTooLarge),
        },
        // RFC 9112 §6.1: HTTP/1.0 has no chunked coding, so its framing cannot be trusted.
        (Some(_), _) if version == 0 => return Err(malformed("transfer-encoding in an http/1.0 request")),
        // RFC 9112 §6.3: both is how requests are smuggled past a proxy; refuse rather than pick one.
        (Some(_), Some(_)) => return Err(malformed("both transfer-encoding and content-length")),
        (Some(codings), None) if codings.iter().any(|c| c != "chunked") => {
            return Err(HttpError::UnsupportedTransferEncoding(codings.join(", ")));
        }
        (Some(codings), None) if codings.len() > 1 => return Err(malformed("chunked applied twice")),
        (Some(_), None) => Step::Size { scanned: end },
    };
    // HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to keep it.
    let keep_alive = !fields.close && (version >= 1 || fields.keep_alive);
    let request = Request { method: method.to_owned(), path, query, body: Vec::new(), keep_alive, from: fields.from };
    let expect_continue = fields.expect_continue;
    Ok(Some(Pending { request, pos: end, step, ext_budget: MAX_HEAD, expect_continue }))
}

/// The framing and connection fields of a head; the others are ignored.
#[derive(Debug, Default)]
struct Fields {
    length: Option<u64>,
    /// Lower-cased transfer codings, `Some` once a `Transfer-Encoding` field is seen.
    codings: Option<Vec<String>>,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
    from: Caller,
}

impl Fields {
    fn read(headers: &[httparse::Header<'_>], version: u8) -> Result<Fields, HttpError> {
        let mut f = Fields::default();
        for &httparse::Header { name, value } in headers {
            if name.eq_ignore_ascii_case("content-length") {
                let lengths = list(value).map(parse_length).collect::<Result<Vec<_>, _>>()?;
                let first = lengths.first().copied();
                // RFC 9110 §8.6: identical repeats are one length; different ones make the framing unknowable.
                if first.is_none() || lengths.iter().copied().chain(f.length).any(|n| Some(n) != first) {
                    return Err(malformed("invalid or conflicting content-length"));
                }
                f.length = first;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                let codings = f.codings.get_or_insert_with(Vec::new);
                codings.extend(list(value).map(|c| String::from_utf8_lossy(c).to_ascii_lowercase()));
                if codings.is_empty() {
                    return Err(malformed("empty transfer-encoding"));
                }
            } else if name.eq_ignore_ascii_case("connection") {
                f.close |= list(value).any(|t| t.eq_ignore_ascii_case(b"close"));
                f.keep_alive |= list(value).any(|t| t.eq_ignore_ascii_case(b"keep-alive"));
            } else if name.eq_ignore_ascii_case("host") {
                // RFC 9112 §3.2: a request with more than one Host is invalid.
                if f.from.host.replace(lossy(value)).is_some() {
                    return Err(malformed("more than one host field"));
                }
            } else if name.eq_ignore_ascii_case("origin") {
                f.from.origin = Some(lossy(value));
            } else if name.eq_ignore_ascii_case("sec-fetch-site") {
                f.from.fetch_site = Some(lossy(value));
            } else if name.eq_ignore_ascii_case("authorization") {
                f.from.authorization = Some(lossy(value));
            } else if name.eq_ignore_ascii_case("expect") {
                if !value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                    return Err(HttpError::UnsupportedExpect(String::from_utf8_lossy(value.trim_ascii()).into()));
                }
                // RFC 9110 §10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored.
                f.expect_continue = version >= 1;
            }
        }
        Ok(f)
    }
}

fn lossy(value: &[u8]) -> String {
    String::from_utf8_lossy(value.trim_ascii()).into_owned()
}

impl Pending {
    /// Drops the input bytes already decoded (the head, body bytes copied out,
    /// chunk framing), keeping what a scan still needs, and shifts the indices.
    fn forget_read(&mut self, input: &mut Vec<u8>) {
        let keep = match self.step {
            // The blank line ending the trailers may begin with the size line's LF.
            Step::Size { scanned } | Step::Trailers { scanned } => scanned.min(self.pos),
            _ => self.pos,
        };
        input.drain(..keep);
        self.pos -= keep;
        if let Step::Size { scanned } | Step::Trailers { scanned } = &mut self.step {
            *scanned -= keep;
        }
    }

    /// Reads whatever body bytes arrived; `Some(end)` once the request ends at input index `end`.
    fn advance(&mut self, input: &[u8]) -> Result<Option<usize>, HttpError> {
        loop {
            match self.step {
                Step::Length { left } => {
                    let arrived = input.get(self.pos..).unwrap_or_default();
                    let take = left.min(arrived.len());
                    self.request.body.extend_from_slice(&arrived[..take]);
                    self.pos += take;
                    if take < left {
                        self.step = Step::Length { left: left - take };
                        return Ok(None);
                    }
                    return Ok(Some(self.pos));
                }
                Step::Size { scanned } => {
                    let limit = self.pos + BARE_SIZE_LINE + self.ext_budget;
                    let window = input.get(scanned..input.len().min(limit)).unwrap_or_default();
                    let Some(nl) = window.iter().position(|&b| b == b'\n').map(|i| scanned + i) else {
                        if input.len() >= limit {
                            return Err(malformed("chunk extensions too long"));
                        }
                        self.step = Step::Size { scanned: input.len() };
                        return Ok(None);
                    };
                    let left = self.size_line(&input[self.pos..=nl])?;
                    self.pos = nl + 1;
                    // The blank line ending the trailers may begin with this line's LF.
                    self.step = if left == 0 { Step::Trailers { scanned: nl } } else { Step::Data { left } };
                }
                Step::Data { left } => {
                    let arrived = input.get(self.pos..).unwrap_or_default();
                    let take = left.min(arrived.len());
                    self.request.body.extend_from_slice(&arrived[..take]);
                    self.pos += take;
                    if take < left {
                        self.step = Step::Data { left: left - take };
                        return Ok(None);
                    }
                    self.step = Step::DataEnd;
                }
                Step::DataEnd => match input.get(self.pos..self.pos + 2) {
                    None => return Ok(None),
                    Some(b"\r\n") => {
                        self.pos += 2;
                        self.step = Step::Size { scanned: self.pos };
                    }
                    Some(_) => return Err(malformed("chunk data longer than its size")),
                },
                Step::Trailers { mut scanned } => {
                    let found = section_end(input, self.pos, &mut scanned)?;
                    self.step = Step::Trailers { scanned };
                    let Some(end) = found else { return Ok(None) };
                    // Trailer fields are checked for syntax, then dropped: no admin route reads them.
                    complete(httparse::parse_headers(
                        &input[self.pos..end],
                        &mut [httparse::EMPTY_HEADER; MAX_HEADERS],
                    ))?;
                    return Ok(Some(end));
                }
            }
        }
    }

    /// Parses one chunk-size line (through its LF) and charges it to the extension and body budgets.
    fn size_line(&mut self, line: &[u8]) -> Result<usize, HttpError> {
        // httparse reads an empty size as 0, which would end the body early; demand a digit.
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let size = match httparse::parse_chunk_size(line) {
            Ok(Status::Complete((used, size))) if digits > 0 && used == line.len() => size,
            _ => return Err(malformed("invalid chunk size line")),
        };
        // Extensions are ignored, but a client must not be able to stream them forever.
        let extensions = line.len().saturating_sub(digits + 2);
        self.ext_budget =
            self.ext_budget.checked_sub(extensions).ok_or_else(|| malformed("chunk extensions too long"))?;
        // Refused as soon as the size is known, before its data is read.
        match usize::try_from(size) {
            Ok(size) if size <= MAX_BODY - self.request.body.len() => Ok(size),
            _ => Err(HttpError::BodyTooLarge),
        }
    }
}

/// Rejects a head that is already wrong before its blank line arrives, so a
/// client speaking another protocol (a TLS hello, say) gets its 400 at once
/// instead of waiting out the request timer: the method must be a token, and
/// once the request line is complete httparse must accept it.
fn check_early(input: &[u8], start: usize, line_checked: &mut bool) -> Result<(), HttpError> {
    let head = input.get(start..).unwrap_or_default();
    // A lone CR may be the start of an empty line's CRLF, which is skipped.
    if head == b"\r" {
        return Ok(());
    }
    let method = head.iter().take(METHOD_LIMIT + 1).take_while(|&&b| b != b' ');
    if method.clone().any(|&b| !is_tchar(b)) || method.count() > METHOD_LIMIT {
        return Err(malformed("the request does not start with an HTTP method"));
    }
    if *line_checked {
        return Ok(());
    }
    // Checked once, when the first line end shows up: no re-parse as more arrives.
    if let Some(nl) = head.iter().take(MAX_HEAD).position(|&b| b == b'\n') {
        *line_checked = true;
        let mut headers = [httparse::EMPTY_HEADER; 1];
        if let Err(e) = httparse::Request::new(&mut headers).parse(&head[..=nl]) {
            return Err(malformed(&e.to_string()));
        }
    }
    Ok(())
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Finds the end of the field section starting at `base`: the index just past its blank line.
///
/// Resumes at `*scanned` and leaves it a few bytes short of the end, so each byte is looked at about once. Like
/// httparse, a bare LF ends a line too (RFC 9112 §2.2).
fn section_end(input: &[u8], base: usize, scanned: &mut usize) -> Result<Option<usize>, HttpError> {
    let window = &input[..input.len().min(base + MAX_HEAD)];
    let mut i = *scanned;
    while let Some(nl) = window.get(i..).and_then(|w| w.iter().position(|&b| b == b'\n')).map(|o| i + o) {
        match window.get(nl + 1..) {
            Some([b'\n', ..]) => return Ok(Some(nl + 2)),
            Some([b'\r', b'\n', ..]) => return Ok(Some(nl + 3)),
            _ => i = nl + 1,
        }
    }
    if window.len() >= base + MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    // Back up: the blank line may straddle this read and the next.
    *scanned = window.len().saturating_sub(3).max(*scanned);
    Ok(None)
}

/// Maps httparse's verdict on a section whose blank line we already found.
fn complete<T>(parsed: httparse::Result<T>) -> Result<(), HttpError> {
    match parsed {
        Ok(Status::Complete(_)) => Ok(()),
        Ok(Status::Partial) => Err(malformed("incomplete field section")),
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::HeadTooLarge),
        Err(e) => Err(HttpError::Malformed(e.to_string())),
    }
}

/// Splits a request target into the percent-decoded path and the raw query.
fn split_target(target: &str) -> Result<(String, Option<String>), HttpError> {
    let (mut path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query.to_owned())),
        None => (target, None),
    };
    // Absolute form (RFC 9112 §3.2.2): keep only what follows the authority.
    for scheme in ["http://", "https://"] {
        if path.get(..scheme.len()).is_some_and(|p| p.eq_ignore_ascii_case(scheme)) {
            let rest = &path[scheme.len()..];
            path = rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    let mut out = Vec::with_capacity(path.len());
    let mut bytes = path.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let mut digit = || bytes.next().and_then(|d| char::from(d).to_digit(16));
        let (Some(high), Some(low)) = (digit(), digit()) else {
            return Err(malformed("invalid percent-escape in path"));
        };
        // Two hex digits make at most 0xff.
        out.push((high << 4 | low) as u8);
    }
    let path = String::from_utf8(out).map_err(|_| malformed("path is not utf-8 once percent-decoded"))?;
    Ok((path, query))
}

/// The non-empty, trimmed elements of a comma-separated field value.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

fn parse_length(value: &[u8]) -> Result<u64, HttpError> {
    // Digits only: `str::parse` would also take a sign.
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(malformed("invalid or conflicting content-length"));
    }
    // All digits, so failing to parse can only mean too large for u64: far beyond MAX_BODY anyway.
    Ok(std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX))
}

fn malformed(why: &str) -> HttpError {
    HttpError::Malformed(why.to_owned())
}

/// The reason phrase for `status`; empty (which RFC 9112 allows) for codes the admin API never sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Bytes of a complete HTTP/1.1 response with a body of `content_type`, then the `extra` fields (e.g. `("Allow", "GET, PUT")`).
pub fn response(status: u16, content_type: &str, body: &[u8], keep_alive: bool, extra: &[(&str, &str)]) -> Vec<u8> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let (reason, len) = (reason(status), body.len());
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {len}\r\nConnection: {connection}\r\n"
    );
    // A CR or LF in a field would split the response: such a field is dropped, never sent.
    for (name, value) in extra.iter().filter(|(n, v)| !n.contains(['\r', '\n']) && !v.contains(['\r', '\n'])) {
        head.extend([*name, ": ", value, "\r\n"]);
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests;
