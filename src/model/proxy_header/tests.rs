use super::*;

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test address")
}

fn proxied(source: &str, destination: &str) -> Origin {
    Origin::Proxied { source: addr(source), destination: addr(destination) }
}

/// Every strict prefix of `bytes` is incomplete, and the whole of it parses to `want`.
#[track_caller]
fn parses_only_when_whole(bytes: &[u8], want: Origin) {
    for n in 0..bytes.len() {
        assert_eq!(parse(&bytes[..n]), Ok(Parsed::Incomplete), "prefix of {n} bytes");
    }
    assert_eq!(parse(bytes), Ok(Parsed::Header { len: bytes.len(), origin: want }));
    let mut more = bytes.to_vec();
    more.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(parse(&more), Ok(Parsed::Header { len: bytes.len(), origin: want }), "client bytes after it");
}

#[track_caller]
fn rejected(bytes: &[u8]) -> HeaderError {
    match parse(bytes) {
        Err(e) => e,
        other => panic!("{:?} was accepted as {other:?}", String::from_utf8_lossy(bytes)),
    }
}

#[test]
fn v1_encodes_byte_exact() {
    assert_eq!(
        v1(addr("192.168.0.1:56324"), addr("192.168.0.11:443")),
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    );
    assert_eq!(v1(addr("[2001:db8::1]:1"), addr("[::1]:65535")), b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n");
    assert_eq!(
        v1(addr("[::ffff:10.0.0.1]:5"), addr("[::ffff:127.0.0.1]:80")),
        b"PROXY TCP4 10.0.0.1 127.0.0.1 5 80\r\n"
    );
    assert_eq!(v1(addr("10.0.0.1:5"), addr("[::1]:80")), b"PROXY UNKNOWN\r\n");
}

#[test]
fn v2_encodes_byte_exact() {
    let mut want = V2_SIGNATURE.to_vec();
    want.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb]);
    assert_eq!(v2(addr("192.168.0.1:56324"), addr("192.168.0.11:443")), want);
    let v6 = v2(addr("[2001:db8::1]:1"), addr("[::1]:2"));
    assert_eq!(&v6[12..16], &[0x21, 0x21, 0, 36]);
    assert_eq!(&v6[16..32], &"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
    assert_eq!(&v6[32..48], &Ipv6Addr::LOCALHOST.octets());
    assert_eq!(&v6[48..], &[0, 1, 0, 2]);
    let mut local = V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    assert_eq!(v2_local(), local);
    assert_eq!(&v2(addr("10.0.0.1:5"), addr("[::1]:80"))[12..], &[0x21, 0x00, 0, 0]);
}

#[test]
fn encodings_parse_back() {
    for (s, d) in [("1.2.3.4:0", "255.255.255.255:65535"), ("[ffff:ffff::ffff]:65535", "[::]:0")] {
        for version in [Version::V1, Version::V2] {
            parses_only_when_whole(&encode(version, addr(s), addr(d)), proxied(s, d));
        }
    }
    parses_only_when_whole(&v2_local(), Origin::Local);
}

#[test]
fn v1_longest_lines_parse() {
    let full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    let tcp6 = format!("PROXY TCP6 {full} {full} 65535 65535\r\n");
    assert_eq!(tcp6.len(), 104);
    parses_only_when_whole(tcp6.as_bytes(), proxied(&format!("[{full}]:65535"), &format!("[{full}]:65535")));
    let unknown = format!("PROXY UNKNOWN {full} {full} 65535 65535\r\n");
    assert_eq!(unknown.len(), V1_MAX);
    parses_only_when_whole(unknown.as_bytes(), Origin::Local);
    parses_only_when_whole(b"PROXY UNKNOWN\r\n", Origin::Local);
}

#[test]
fn v1_without_crlf_in_107_bytes_is_rejected() {
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(V1_MAX - 1, b'a');
    assert_eq!(parse(&line), Ok(Parsed::Incomplete));
    line.push(b'\r');
    assert_eq!(parse(&line), Err(HeaderError::NoCrlf), "the CRLF would end at byte 108");
    line.push(b'\n');
    assert_eq!(parse(&line), Err(HeaderError::NoCrlf));
}

#[test]
fn v1_grammar_is_strict() {
    for bad in [
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
        "PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        "PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        "PROXY TCP4 ::1 ::1 1 2\r\n",
        "PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
        "PROXY TCP6 ::1 1::2::3 1 2\r\n",
        "PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY UNKNOWNX\r\n",
        "PROXY \r\n",
        "PROXY\r\n",
        "proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\0\r\n",
    ] {
        rejected(bad.as_bytes());
    }
}

#[test]
fn v1_fails_early_where_no_line_can_follow() {
    assert_eq!(rejected(b"G"), HeaderError::Signature);
    assert_eq!(rejected(b"PROXX"), HeaderError::Signature);
    assert!(matches!(rejected(b"PROXY TCP5"), HeaderError::Line(_)));
    assert!(matches!(rejected(b"PROXY TCP4 1.2.3.4\n"), HeaderError::Line(_)));
    assert!(matches!(rejected(b"PROXY TCP4 1\r2"), HeaderError::Line(_)));
    assert_eq!(parse(b"PROXY UNKNOWN\r"), Ok(Parsed::Incomplete));
    assert_eq!(parse(b"PROXY TC"), Ok(Parsed::Incomplete));
}

fn v2_header(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[ver_cmd, family]);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

const V4_BODY: [u8; 12] = [10, 0, 0, 1, 10, 0, 0, 2, 0x30, 0x39, 0, 80];

#[test]
fn v2_tlvs_are_skipped() {
    let mut body = V4_BODY.to_vec();
    body.extend_from_slice(&[0x02, 0, 11]);
    body.extend_from_slice(b"example.com");
    body.extend_from_slice(&[0x04, 0, 0]);
    body.extend_from_slice(&[0xEE, 0, 3, 1, 2, 3]);
    parses_only_when_whole(&v2_header(0x21, 0x11, &body), proxied("10.0.0.1:12345", "10.0.0.2:80"));
}

#[test]
fn v2_truncated_tlvs_are_rejected() {
    for tail in [&[0x02][..], &[0x02, 0], &[0x02, 0, 1], &[0x02, 0, 2, 9], &[0x04, 0, 0, 0x02]] {
        let mut body = V4_BODY.to_vec();
        body.extend_from_slice(tail);
        assert!(matches!(rejected(&v2_header(0x21, 0x11, &body)), HeaderError::Tlv { at: 28.. }), "{tail:?}");
    }
}

#[test]
fn v2_local_skips_any_block_without_reading_it() {
    parses_only_when_whole(&v2_header(0x20, 0x11, &V4_BODY), Origin::Local);
    parses_only_when_whole(&v2_header(0x20, 0x00, &[0x02, 0xff]), Origin::Local);
}

#[test]
fn v2_unsupported_families_fall_back_to_the_connection() {
    parses_only_when_whole(&v2_header(0x21, 0x00, &[]), Origin::Local);
    parses_only_when_whole(&v2_header(0x21, 0x12, &V4_BODY), Origin::Local);
    parses_only_when_whole(&v2_header(0x21, 0x31, &[0; 216]), Origin::Local);
}

#[test]
fn v2_header_fields_are_checked_as_soon_as_they_arrive() {
    assert_eq!(rejected(b"\r\n\r\n\0\r\nQUIT\r"), HeaderError::Signature);
    assert_eq!(rejected(b"\r\r"), HeaderError::Signature);
    for ver_cmd in [0x00, 0x10, 0x22, 0x2f, 0x31, 0x11] {
        assert_eq!(rejected(&v2_header(ver_cmd, 0x11, &[])[..13]), HeaderError::VersionCommand(ver_cmd));
    }
    for family in [0x01, 0x10, 0x13, 0x23, 0x33, 0x41, 0xff] {
        assert_eq!(rejected(&v2_header(0x21, family, &[])[..14]), HeaderError::Family(family));
    }
    let long = v2_header(0x21, 0x11, &vec![0; V2_MAX_BODY + 1]);
    assert_eq!(rejected(&long[..16]), HeaderError::TooLong(V2_MAX_BODY + 1));
    let mut huge = v2_header(0x21, 0x11, &[]);
    huge[14..16].copy_from_slice(&[0xff, 0xff]);
    assert_eq!(rejected(&huge), HeaderError::TooLong(65535));
    assert_eq!(parse(&v2_header(0x21, 0x11, &vec![0; V2_MAX_BODY])[..16]), Ok(Parsed::Incomplete));
}

#[test]
fn v2_length_must_hold_the_addresses() {
    assert_eq!(
        rejected(&v2_header(0x21, 0x11, &V4_BODY[..11])[..16]),
        HeaderError::ShortAddresses { family: 0x11, len: 11 }
    );
    assert!(matches!(rejected(&v2_header(0x21, 0x21, &[0; 35])), HeaderError::ShortAddresses { .. }));
    assert!(matches!(rejected(&v2_header(0x21, 0x31, &[0; 215])), HeaderError::ShortAddresses { .. }));
}

#[test]
fn errors_read_as_one_line() {
    let text = rejected(b"\r\n\r\n\0\r\nQUIT\n\x13").to_string();
    assert_eq!(text, "v2 header with bad version/command byte 0x13");
    assert!(!HeaderError::NoCrlf.to_string().contains('\n'));
}

/// Prefix consistency on arbitrary bytes: once a prefix is a header or an
/// error, every longer input gets the same verdict (so peeking more never changes a verdict).
#[test]
fn verdicts_are_stable_as_bytes_arrive() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let starts: [&[u8]; 3] = [b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", &v2_local(), &v2_header(0x21, 0x11, &V4_BODY)];
    for round in 0..2000 {
        let mut bytes = starts[round % 3].to_vec();
        let flips = next() % 3;
        for _ in 0..flips {
            let i = (next() as usize) % bytes.len();
            bytes[i] = next() as u8;
        }
        check_stable(&bytes);
    }
}

#[track_caller]
fn check_stable(bytes: &[u8]) {
    let whole = parse(bytes);
    for n in 0..=bytes.len() {
        match parse(&bytes[..n]) {
            Ok(Parsed::Incomplete) => {}
            Ok(Parsed::Header { len, .. }) => {
                assert!(len <= n);
                assert_eq!(whole, parse(&bytes[..n]), "a header, then more bytes: {bytes:?}");
                return;
            }
            // The reason may name what the bytes so far showed; the verdict stands.
            Err(_) => {
                assert!(whole.is_err(), "an error, then more bytes: {bytes:?}");
                return;
            }
        }
    }
}
