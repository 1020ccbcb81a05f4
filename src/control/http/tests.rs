//! Unit tests of `http.rs`.
use super::*;

/// Appends `bytes` to `input` and decodes once.
fn push(d: &mut Decoder, input: &mut Vec<u8>, bytes: &[u8]) -> Result<Progress, HttpError> {
    input.extend_from_slice(bytes);
    d.decode(input)
}

fn one(bytes: &[u8]) -> Result<Progress, HttpError> {
    push(&mut Decoder::new(), &mut Vec::new(), bytes)
}

#[track_caller]
fn request(bytes: &[u8]) -> Request {
    match one(bytes) {
        Ok(Progress::Request(r)) => r,
        other => panic!("expected a request, got {other:?}"),
    }
}

#[track_caller]
fn status(bytes: &[u8]) -> u16 {
    one(bytes).map_or_else(|e| e.status(), |p| panic!("expected an error, got {p:?}"))
}

/// One test per rejected input, each named for the state it hits and the status it must get.
macro_rules! rejects {
    ($($name:ident: $bytes:expr => $status:expr;)*) => {$(
        #[test]
        fn $name() {
            assert_eq!(status($bytes), $status);
        }
    )*};
}

rejects! {
    head_over_limit_431: &head_of_len(MAX_HEAD + 1) => 431;
    head_no_blank_line_at_limit_431: &[&b"GET / HTTP/1.1\r\nX: "[..], &[b'a'; MAX_HEAD]].concat() => 431;
    head_no_method_however_long_400: &[b'a'; MAX_HEAD] => 400;
    head_too_many_fields_431: format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(65)).as_bytes() => 431;
    head_garbage_400: b"\x00\x01\x02garbage\r\n\r\n" => 400;
    head_bad_method_400: b"G(T / HTTP/1.1\r\n\r\n" => 400;
    head_bad_version_400: b"GET / HTTP/2.0\r\n\r\n" => 400;
    head_bad_field_name_400: b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n" => 400;
    head_bad_escape_400: b"GET /%zz HTTP/1.1\r\n\r\n" => 400;
    head_short_escape_400: b"GET /%4 HTTP/1.1\r\n\r\n" => 400;
    head_escape_not_utf8_400: b"GET /%ff HTTP/1.1\r\n\r\n" => 400;
    head_length_over_limit_413: &put(&format!("Content-Length: {}\r\n", MAX_BODY + 1)) => 413;
    head_length_beyond_u64_413: &put("Content-Length: 99999999999999999999999\r\n") => 413;
    head_length_letters_400: &put("Content-Length: abc\r\n") => 400;
    head_length_signed_400: &put("Content-Length: +5\r\n") => 400;
    head_length_empty_400: &put("Content-Length: \r\n") => 400;
    head_length_list_conflict_400: &put("Content-Length: 5, 6\r\n") => 400;
    head_length_repeat_conflict_400: &put("Content-Length: 1\r\nContent-Length: 2\r\n") => 400;
    head_te_then_length_400: &put("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n") => 400;
    head_length_then_te_400: &put("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n") => 400;
    head_te_gzip_501: &put("Transfer-Encoding: gzip, chunked\r\n") => 501;
    head_te_in_http10_400: b"PUT / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n" => 400;
    head_te_chunked_twice_400: &put("Transfer-Encoding: chunked, chunked\r\n") => 400;
    head_expect_other_417: &put("Expect: something-else\r\nContent-Length: 1\r\n") => 417;
    chunked_size_not_hex_400: &chunked(b"zz\r\n") => 400;
    chunked_size_empty_400: &chunked(b";ext\r\n") => 400;
    chunked_data_too_long_400: &chunked(b"3\r\nabcd\r\n") => 400;
    chunked_bare_lf_in_extension_400: &chunked(b"1;a\nb\r\n") => 400;
    chunked_bad_trailer_400: &chunked(b"0\r\nBad Name: x\r\n\r\n") => 400;
    chunked_extensions_endless_400: &chunked(&[b"1;", &[b'x'; MAX_HEAD + BARE_SIZE_LINE][..]].concat()) => 400;
    chunked_size_over_limit_413: &chunked(format!("{:x}\r\n", MAX_BODY + 1).as_bytes()) => 413;
    chunked_total_over_limit_413: &chunked(&[&full_chunk(), &b"1\r\n"[..]].concat()) => 413;
}

/// A PUT head with these fields (each ending in CRLF).
fn put(fields: &str) -> Vec<u8> {
    format!("PUT / HTTP/1.1\r\n{fields}\r\n").into_bytes()
}

/// A GET whose head is exactly `len` bytes long.
fn head_of_len(len: usize) -> Vec<u8> {
    let fixed = b"GET / HTTP/1.1\r\nX: \r\n\r\n".len();
    format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(len - fixed)).into_bytes()
}

fn chunked(body: &[u8]) -> Vec<u8> {
    [&b"PUT /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..], body].concat()
}

/// One chunk carrying exactly MAX_BODY bytes.
fn full_chunk() -> Vec<u8> {
    [format!("{MAX_BODY:x}\r\n").as_bytes(), &vec![b'x'; MAX_BODY], b"\r\n"].concat()
}

const CHUNKED: &[u8] = b"PUT /svc HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
    5;name=value\r\nhello\r\n1 ; x\r\n \r\n6\r\nworld!\r\n0;last\r\nX-Trailer: yes\r\nY: z\r\n\r\n";

#[test]
fn head_byte_by_byte() {
    let (mut d, mut input) = (Decoder::new(), Vec::new());
    let bytes = b"GET /svc HTTP/1.1\r\nHost: x\r\n\r\n";
    for b in &bytes[..bytes.len() - 1] {
        assert_eq!(push(&mut d, &mut input, &[*b]), Ok(Progress::NeedMore));
    }
    let Ok(Progress::Request(r)) = push(&mut d, &mut input, b"\n") else { panic!("no request") };
    assert_eq!((r.method.as_str(), r.path.as_str(), r.keep_alive), ("GET", "/svc", true));
    assert!(input.is_empty());
}

#[test]
fn idle_two_pipelined() {
    let (mut d, mut input) = (Decoder::new(), Vec::new());
    let first = push(&mut d, &mut input, b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n");
    assert!(matches!(first, Ok(Progress::Request(r)) if r.path == "/a" && r.body == b"hi"));
    assert_eq!(input, b"GET /b HTTP/1.1\r\n\r\n");
    assert!(matches!(d.decode(&mut input), Ok(Progress::Request(r)) if r.path == "/b"));
    assert!(input.is_empty());
}

#[test]
fn head_method_limit_holds_however_the_head_arrives() {
    // Found by the admin_decoder fuzz target: a 45-byte method was refused
    // when the head came in pieces and accepted when it came whole.
    let head = format!("{} / HTTP/1.1\r\n\r\n", "M".repeat(45));
    assert_eq!(status(head.as_bytes()), 400);
    let (mut d, mut input) = (Decoder::new(), Vec::new());
    assert!(push(&mut d, &mut input, &head.as_bytes()[..40]).is_err());
}

#[test]
fn head_long_method_is_400_even_with_too_many_fields() {
    // Found by the admin_decoder fuzz target: whole, the head was 431 (too many
    // fields); in pieces, 400 (the method, seen before the blank line).
    let fields = "Host: x\r\n".repeat(70);
    let head = format!("{} / HTTP/1.1\r\n{fields}\r\n", "M".repeat(45));
    assert_eq!(status(head.as_bytes()), 400);
}

#[test]
fn idle_crlf_after_a_request_split_at_its_cr() {
    // Found by the admin_decoder fuzz target: a CRLF after a request, its CR
    // arriving alone, was taken for a request that starts with no method.
    let (mut d, mut input) = (Decoder::new(), Vec::new());
    let first = push(&mut d, &mut input, b"GET / HTTP/1.1\r\n\r\n\r");
    assert!(matches!(first, Ok(Progress::Request(_))));
    assert_eq!(d.decode(&mut input), Ok(Progress::NeedMore));
    assert_eq!(push(&mut d, &mut input, b"\nGET /b HTTP/1.1\r\n"), Ok(Progress::NeedMore));
    assert!(matches!(push(&mut d, &mut input, b"\r\n"), Ok(Progress::Request(r)) if r.path == "/b"));
}

#[test]
fn idle_leading_empty_lines() {
    assert_eq!(request(b"\r\n\n\r\nGET / HTTP/1.1\r\n\r\n").path, "/");
}

#[test]
fn head_at_limit_accepted() {
    assert_eq!(request(&head_of_len(MAX_HEAD)).method, "GET");
    // Byte by byte too: the scan resumes where it stopped, so this stays linear.
    let (mut d, mut input, head) = (Decoder::new(), Vec::new(), head_of_len(MAX_HEAD));
    let last = head.iter().map(|b| push(&mut d, &mut input, &[*b])).last();
    assert!(matches!(last, Some(Ok(Progress::Request(_)))));
    let mut unfinished = b"GET / HTTP/1.1\r\nX: ".to_vec();
    unfinished.resize(MAX_HEAD - 1, b'a');
    assert_eq!(one(&unfinished), Ok(Progress::NeedMore));
}

#[test]
fn head_length_at_limit_accepted() {
    let head = format!("PUT /s HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n");
    assert_eq!(request(&[head.as_bytes(), &vec![b'x'; MAX_BODY]].concat()).body.len(), MAX_BODY);
    // Identical repeats are one length (RFC 9110 §8.6).
    assert_eq!(request(b"PUT / HTTP/1.1\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok").body, b"ok");
}

#[test]
fn chunked_split_everywhere() {
    for split in 0..CHUNKED.len() {
        let (mut d, mut input) = (Decoder::new(), Vec::new());
        assert_eq!(push(&mut d, &mut input, &CHUNKED[..split]), Ok(Progress::NeedMore), "split {split}");
        let done = push(&mut d, &mut input, &CHUNKED[split..]);
        assert!(matches!(done, Ok(Progress::Request(r)) if r.body == b"hello world!"), "split {split}");
    }
    // Every byte in its own read, then the next request pipelined behind it in one read.
    let (mut d, mut input) = (Decoder::new(), Vec::new());
    let results: Vec<_> = CHUNKED.iter().map(|b| push(&mut d, &mut input, &[*b])).collect();
    assert!(results[..results.len() - 1].iter().all(|r| *r == Ok(Progress::NeedMore)));
    assert!(matches!(results.last(), Some(Ok(Progress::Request(_)))));
    let both = push(&mut d, &mut input, &[CHUNKED, b"GET /next HTTP/1.1\r\n\r\n"].concat());
    assert!(matches!(both, Ok(Progress::Request(r)) if r.body == b"hello world!"));
    assert_eq!(input, b"GET /next HTTP/1.1\r\n\r\n");
}

#[test]
fn chunked_at_limit_accepted() {
    assert_eq!(request(&chunked(&[&full_chunk(), &b"0\r\n\r\n"[..]].concat())).body.len(), MAX_BODY);
}

#[test]
fn head_expect_continue_once_then_body() {
    let (mut d, mut input) = (Decoder::new(), Vec::new());
    let head = b"PUT /s HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 4\r\n\r\n";
    assert_eq!(push(&mut d, &mut input, head), Ok(Progress::SendContinue));
    assert_eq!(d.decode(&mut input), Ok(Progress::NeedMore));
    assert_eq!(push(&mut d, &mut input, b"ab"), Ok(Progress::NeedMore));
    assert!(matches!(push(&mut d, &mut input, b"cd"), Ok(Progress::Request(r)) if r.body == b"abcd"));
    // `curl -T -`: chunked, and nothing sent before the 100.
    let te = b"PUT /s HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(one(te), Ok(Progress::SendContinue));
}

#[test]
fn head_expect_continue_not_needed() {
    // Body already here, or none to wait for: no interim response.
    assert_eq!(request(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx").body, b"x");
    assert_eq!(request(b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").body, b"");
    // RFC 9110 §10.1.1: ignored in HTTP/1.0.
    assert_eq!(one(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"), Ok(Progress::NeedMore));
}

#[test]
fn head_keep_alive_rules() {
    let keep = |head: &str| request(format!("GET / {head}\r\n\r\n").as_bytes()).keep_alive;
    assert!(!keep("HTTP/1.0"));
    assert!(keep("HTTP/1.0\r\nConnection: Keep-Alive"));
    assert!(keep("HTTP/1.1"));
    assert!(!keep("HTTP/1.1\r\nConnection: Upgrade, close"));
    assert!(!keep("HTTP/1.0\r\nConnection: close, keep-alive"));
}

#[test]
fn head_path_decoded_query_raw() {
    let r = request(b"GET /a%20b/caf%C3%a9?x=%20&y?z HTTP/1.1\r\n\r\n");
    assert_eq!((r.path.as_str(), r.query.as_deref()), ("/a b/caf\u{e9}", Some("x=%20&y?z")));
    assert_eq!(request(b"GET /s HTTP/1.1\r\n\r\n").query, None);
    let r = request(b"GET HTTP://host:9/svc?q HTTP/1.1\r\n\r\n");
    assert_eq!((r.path.as_str(), r.query.as_deref()), ("/svc", Some("q")));
    assert_eq!(request(b"GET http://host HTTP/1.1\r\n\r\n").path, "/");
}

#[test]
fn response_bytes_exact() {
    let bytes = response(405, "application/json", b"{}\n", false, &[("Allow", "GET, PUT"), ("X", "a\r\nb")]);
    let want = "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\nContent-Length: 3\r\n\
        Connection: close\r\nAllow: GET, PUT\r\n\r\n{}\n";
    assert_eq!(String::from_utf8_lossy(&bytes), want);
    assert_eq!(HttpError::BodyTooLarge.to_string(), "request body larger than 1048576 bytes");
}

#[test]
fn head_garbage_is_rejected_before_any_line_end() {
    let mut decoder = Decoder::new();
    let mut input = b"\x16\x03\x01\x02\x00\x01".to_vec();
    assert_eq!(decoder.decode(&mut input).map_err(|e| e.status()), Err(400));
}

#[test]
fn head_bad_request_line_is_rejected_before_the_blank_line() {
    let mut decoder = Decoder::new();
    let mut input = b"GET /x HTTP/9\x01\r\nHost: a".to_vec();
    assert_eq!(decoder.decode(&mut input).map_err(|e| e.status()), Err(400));
}

#[test]
fn head_partial_method_and_line_are_waited_for() {
    let mut decoder = Decoder::new();
    let mut input = b"PU".to_vec();
    assert_eq!(decoder.decode(&mut input), Ok(Progress::NeedMore));
    input.extend_from_slice(b"T /web HTTP/1.1\r\nHost: x\r\n");
    assert_eq!(decoder.decode(&mut input), Ok(Progress::NeedMore));
    input.extend_from_slice(b"\r\n");
    assert!(matches!(decoder.decode(&mut input), Ok(Progress::Request(_))));
}
