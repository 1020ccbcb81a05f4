//! Entry points of the fuzz targets in `fuzz/`, shared with the test that
//! replays their corpora in `cargo test`: each takes arbitrary bytes, must
//! never panic, and asserts what its parser promises. See `docs/fuzzing.md`.

use crate::cli;
use crate::control::http::{Decoder, HttpError, Progress, Request, MAX_BODY};
use crate::model::address;
use crate::model::config::{self, ServiceConfig};
use crate::model::handover::{self, Manifest};
use crate::model::proxy_header::{self, Origin, Parsed, Version, MAX_HEADER};

/// What decoding a byte stream came to: the requests, then the error that ended it, if any.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    requests: Vec<Request>,
    error: Option<u16>,
    continues: usize,
}

/// Feeds `chunks` one after another into one decoder, as an admin connection does.
fn decode_chunks<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> Decoded {
    let (mut decoder, mut input) = (Decoder::new(), Vec::new());
    let mut out = Decoded { requests: Vec::new(), error: None, continues: 0 };
    let mut fed = 0usize;
    for chunk in chunks {
        input.extend_from_slice(chunk);
        fed += chunk.len();
        loop {
            let before = input.len();
            match decoder.decode(&mut input) {
                Ok(Progress::NeedMore) => break,
                Ok(Progress::SendContinue) => out.continues += 1,
                Ok(Progress::Request(request)) => {
                    assert!(request.body.len() <= MAX_BODY, "a body over the limit came through");
                    out.requests.push(request);
                }
                Err(e) => {
                    out.error = Some(status(&e));
                    return out;
                }
            }
            assert!(input.len() <= before, "the decoder added bytes to its input");
            assert!(input.len() <= fed, "more input than was fed");
        }
    }
    out
}

fn status(e: &HttpError) -> u16 {
    e.status()
}

/// The admin request decoder: whatever the bytes, no panic, bounded bodies,
/// and the same requests (or the same error) however TCP splits the stream.
pub fn admin_decoder(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else { return };
    let whole = decode_chunks(std::iter::once(data));
    // Chunks of 1 to 16 bytes, from the first byte: the framing must not care.
    let size = usize::from(split % 16) + 1;
    let pieces = decode_chunks(data.chunks(size));
    let bytes = decode_chunks(data.chunks(1));
    assert_eq!(whole.requests, pieces.requests, "split into {size}-byte chunks");
    assert_eq!(whole.error, pieces.error, "split into {size}-byte chunks");
    assert_eq!(whole.requests, bytes.requests, "fed byte by byte");
    assert_eq!(whole.error, bytes.error, "fed byte by byte");
}

/// Config and state files: no panic, and what parses is written out and read back unchanged.
pub fn config_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(mut services) = config::parse_services(text) else { return };
    // Written sorted by name (reference §2).
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let written = config::to_json(&services);
    let again = config::parse_services(&written).expect("what shuttle writes, it reads");
    assert_eq!(again, services, "a config changed through a write and a read");
    assert_eq!(config::to_json(&again), written, "writing is deterministic");
}

/// Admin API bodies: no panic, and what parses is valid and round-trips through JSON.
pub fn api_bodies(data: &[u8]) {
    if let Ok(service) = config::parse_service(data, "web") {
        config::validate_service(&service).expect("a parsed service is valid");
        round_trip(&service);
    }
    if let Ok(backend) = config::parse_backend(data, "web", "b1") {
        config::validate_backend("web", &backend).expect("a parsed backend is valid");
        let json = serde_json::to_string(&backend).expect("serialize");
        let again: config::BackendConfig = serde_json::from_str(&json).expect("a backend reads back");
        assert_eq!(again, backend);
    }
    let mut running = ServiceConfig::new("web", "127.0.0.1:8080");
    running.backends.push(config::BackendConfig::new("b0", "127.0.0.1:9001"));
    if let Ok(service) = config::parse_backends_only(data, &running) {
        assert!(service.settings_equal(&running), "backends_only keeps the running settings");
        round_trip(&service);
    }
}

fn round_trip(service: &ServiceConfig) {
    let json = serde_json::to_string(service).expect("serialize");
    let again = config::parse_service(json.as_bytes(), &service.name).expect("a service reads back");
    assert_eq!(&again, service);
}

/// Addresses as configs write them: no panic, and what parses prints back to itself.
pub fn address(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(parsed) = address::parse(text) {
        let printed = parsed.to_string();
        assert_eq!(address::parse(&printed).as_ref(), Ok(&parsed), "{text:?} printed as {printed:?}");
        match &parsed.host {
            address::Host::Ip(ip) => assert_eq!(parsed.literal().map(|a| a.ip()), Some(*ip)),
            address::Host::Name(name) => {
                assert!(parsed.literal().is_none());
                assert!(!name.is_empty() && name.len() <= 254, "{name:?}");
                assert_eq!(name, &name.to_ascii_lowercase());
            }
        }
        if parsed.port != 0 {
            assert_eq!(address::parse_connect(text), Ok(parsed));
        }
    }
}

/// A client's first bytes where a PROXY header is required: no panic, a
/// header never longer than the bound, the same verdict whatever prefix of
/// it arrived first, and the addresses of a header survive re-encoding.
pub fn proxy_header(data: &[u8]) {
    let whole = proxy_header::parse(data);
    for n in 0..data.len() {
        match proxy_header::parse(&data[..n]) {
            Ok(Parsed::Incomplete) => continue,
            Ok(header) => assert_eq!(whole, Ok(header), "a header, then more bytes"),
            Err(_) => assert!(whole.is_err(), "an error, then more bytes"),
        }
        break;
    }
    if let Ok(Parsed::Header { len, origin }) = whole {
        assert!(len <= MAX_HEADER && len <= data.len(), "header of {len} bytes");
        if let Origin::Proxied { source, destination } = origin {
            for version in [Version::V1, Version::V2] {
                let again = proxy_header::encode(version, source, destination);
                let parsed = proxy_header::parse(&again);
                assert_eq!(parsed, Ok(Parsed::Header { len: again.len(), origin }), "{version:?} re-encoding");
            }
        }
    }
}

/// What an upgrade's new process reads from the old one (the first byte is
/// how many descriptors came): no panic; a manifest taken names exactly those
/// descriptors, one socket per worker each, and survives its own round trip;
/// counters taken survive theirs.
pub fn handover(data: &[u8]) {
    let Some((&fds, json)) = data.split_first() else { return };
    if let Ok(manifest) = Manifest::parse(json, usize::from(fds)) {
        assert_eq!(manifest.fds(), Some(usize::from(fds)), "the descriptors the manifest names");
        assert!(manifest.sockets.iter().all(|s| s.count == manifest.workers.max(1)));
        let again = serde_json::to_vec(&manifest).expect("a manifest taken writes back");
        assert_eq!(Manifest::parse(&again, usize::from(fds)), Ok(manifest), "a manifest's round trip");
    }
    if let Ok(counters) = handover::parse_counters(json) {
        let again = serde_json::to_vec(&counters).expect("counters taken write back");
        assert_eq!(handover::parse_counters(&again), Ok(counters), "the counters' round trip");
    }
}

/// The command line: no panic, whatever the arguments (NUL-separated).
pub fn cli(data: &[u8]) {
    let args: Vec<String> = data.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let _ = cli::parse(args);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    type Target = fn(&[u8]);

    const TARGETS: &[(&str, Target)] = &[
        ("admin_decoder", super::admin_decoder),
        ("config_file", super::config_file),
        ("api_bodies", super::api_bodies),
        ("address", super::address),
        ("cli", super::cli),
        ("proxy_header", super::proxy_header),
        ("handover", super::handover),
    ];

    /// Every committed corpus input and seed, through the same entry points as the fuzzers.
    #[test]
    fn fuzz_corpora_replay_cleanly() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        for (name, target) in TARGETS {
            let mut inputs = 0;
            for dir in ["corpus", "seeds"] {
                let dir = root.join(dir).join(name);
                let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
                for entry in entries {
                    let path = entry.expect("corpus entry").path();
                    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    let replay = std::panic::catch_unwind(|| target(&data));
                    assert!(replay.is_ok(), "{name}: {} fails", path.display());
                    inputs += 1;
                }
            }
            assert!(inputs > 0, "{name}: no corpus");
        }
    }
}
