//! UDP flows in the access log: one line per flow when it ends, in the same
//! fields as a connection's (no `connect_ms`: a flow connects to nothing), with
//! the flow's ends: `idle_timeout`, `max_responses`, and `shutdown`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use super::line::{parse, Line};
use super::{start, stop, wait_for_lines, Format};
use crate::support::{tempdir, Launch};
use crate::udp::{client_for, exchange, udp_service, Answer, UdpServer};

/// The line of the flow from `client`.
#[track_caller]
fn line_of(lines: &[Line], client: SocketAddr) -> &Line {
    lines.iter().find(|l| l.client == client).unwrap_or_else(|| panic!("no line for {client}: {lines:#?}"))
}

fn flows_are_logged_when_they_end(format: Format) {
    let idle = UdpServer::start("a", Answer::Echo);
    let twice = UdpServer::start("b", Answer::Twice);
    let mut dns = udp_service("dns", &[("a", &idle)]);
    dns["udp_idle_timeout"] = json!(0.3);
    let mut once = udp_service("once", &[("b", &twice)]);
    once["udp_max_responses"] = json!(1);
    let dir = tempdir();
    let log = dir.path().join("access.log");
    let args = ["-access-log", log.to_str().expect("utf-8"), "-access-log-format", format.flag(), "-grace", "5"];
    let mut shuttle = start(dir.path(), &json!([dns, once]), &args, Launch::default());
    let (dns, once) = (shuttle.service_addr("dns"), shuttle.service_addr("once"));

    let idle_client = client_for(dns);
    for query in [&b"first"[..], b"second"] {
        assert_eq!(exchange(&idle_client, dns, query, Duration::from_secs(5)).as_deref(), Some(query));
    }
    let once_client = client_for(once);
    assert_eq!(exchange(&once_client, once, b"q", Duration::from_secs(5)).as_deref(), Some(&b"b:q"[..]));
    let lines: Vec<Line> = wait_for_lines(&log, 2).iter().map(|l| parse(format, l)).collect();
    let idled = line_of(&lines, idle_client.local_addr().expect("address"));
    assert_eq!((idled.service.as_str(), idled.backend.as_deref()), ("dns", Some("a")), "{idled:?}");
    assert_eq!(idled.backend_address, Some(idle.address().parse().expect("address")), "{idled:?}");
    assert_eq!((idled.sent, idled.received, idled.end.as_str()), (11, 11, "idle_timeout"), "{idled:?}");
    assert_eq!(idled.connect_ms, None, "a flow connects to nothing: {idled:?}");
    assert!(idled.duration_ms >= 250.0, "it lasted its idle timeout: {idled:?}");
    let answered = line_of(&lines, once_client.local_addr().expect("address"));
    assert_eq!((answered.service.as_str(), answered.end.as_str()), ("once", "max_responses"), "{answered:?}");
    assert_eq!((answered.sent, answered.received), (1, 3), "only the reply relayed: {answered:?}");

    // A flow still open when shuttle stops ends with it.
    let open_client = client_for(dns);
    assert!(exchange(&open_client, dns, b"late", Duration::from_secs(5)).is_some());
    stop(&mut shuttle);
    let lines: Vec<Line> = wait_for_lines(&log, 3).iter().map(|l| parse(format, l)).collect();
    let cut = line_of(&lines, open_client.local_addr().expect("address"));
    assert_eq!((cut.end.as_str(), cut.sent, cut.received), ("shutdown", 4, 4), "{cut:?}");
}

#[test]
fn udp_flows_are_logged_when_they_end_in_text() {
    flows_are_logged_when_they_end(Format::Text);
}

#[test]
fn udp_flows_are_logged_when_they_end_in_json() {
    flows_are_logged_when_they_end(Format::Json);
}
