//! Criterion benchmarks of the hot pure parts: the balancer's pick, the timer
//! wheel with 100k live timers, the admin request decoder, config parsing
//! and validation of 1,000 services, and the `GET /metrics` exposition of
//! 1,000 backends against the `GET /` JSON of the same. No sockets, no clock
//! reads in the timed code (the wheel gets its time passed in); a metrics
//! render reads `/proc/self` twice, as every scrape does.
//!
//! `cargo bench --bench pure`; measurement times are kept short so the whole
//! file runs in well under a minute.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use shuttle::control::http::{Decoder, Progress};
use shuttle::control::metrics::{self, Process};
use shuttle::model::address::Lookups;
use shuttle::model::balance::{least_connected, round_robin, Candidate, Cursor};
use shuttle::model::config::{parse_services, BackendConfig, ServiceConfig};
use shuttle::model::counters::StatusCounts;
use shuttle::model::service::{self, Services};
use shuttle::runtime::timer::Wheel;

/// Live timers in every wheel benchmark.
const LIVE_TIMERS: u64 = 100_000;

/// The 20-line xorshift the unit tests use too: deterministic, no RNG crate.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn balance(c: &mut Criterion) {
    let mut group = c.benchmark_group("balance");
    for n in [2usize, 200] {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let equal: Vec<Candidate> = (0..n).map(|_| Candidate { weight: 1, up: true, active: 0, limit: 0 }).collect();
        // Least connected sees uneven counts, as a busy service would have.
        let busy: Vec<Candidate> =
            (0..n).map(|_| Candidate { weight: 1, up: true, active: rng.below(64), limit: 0 }).collect();
        // The same with max_connections set: below it everywhere, and with every other backend full.
        let limited: Vec<Candidate> = busy.iter().map(|c| Candidate { limit: 64, ..*c }).collect();
        let half_full: Vec<Candidate> = (busy.iter().enumerate())
            .map(|(i, c)| Candidate { limit: if i % 2 == 0 { c.active } else { 64 }, ..*c })
            .collect();
        for (name, backends) in [("limited", &limited), ("half_full", &half_full)] {
            group.bench_with_input(BenchmarkId::new(format!("round_robin_{name}"), n), backends, |b, backends| {
                let mut cursor = Cursor::default();
                b.iter(|| round_robin(&mut cursor, backends.len(), |i| black_box(backends)[i]));
            });
            group.bench_with_input(BenchmarkId::new(format!("least_connected_{name}"), n), backends, |b, backends| {
                let mut cursor = Cursor::default();
                b.iter(|| least_connected(&mut cursor, backends.len(), |i| black_box(backends)[i]));
            });
        }
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("round_robin", n), &equal, |b, backends| {
            let mut cursor = Cursor::default();
            b.iter(|| round_robin(&mut cursor, backends.len(), |i| black_box(backends)[i]));
        });
        group.bench_with_input(BenchmarkId::new("least_connected", n), &busy, |b, backends| {
            let mut cursor = Cursor::default();
            b.iter(|| least_connected(&mut cursor, backends.len(), |i| black_box(backends)[i]));
        });
    }
    group.finish();
}

/// A wheel with `LIVE_TIMERS` timers at random deadlines within the next minute.
fn full_wheel(origin: Instant) -> Wheel<u64> {
    let mut wheel = Wheel::new(origin);
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    for i in 0..LIVE_TIMERS {
        wheel.insert(origin + Duration::from_millis(1 + rng.below(60_000)), i);
    }
    wheel
}

/// Runs `round(n)` with `n` ≤ `LIVE_TIMERS` until `iters` operations are timed; sums the times.
fn rounds(iters: u64, mut round: impl FnMut(u64) -> Duration) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = (iters - done).min(LIVE_TIMERS);
        total += round(n);
        done += n;
    }
    total
}

fn wheel(c: &mut Criterion) {
    let mut group = c.benchmark_group("wheel_100k_live");
    group.throughput(Throughput::Elements(1));
    let origin = Instant::now();

    // The pair's re-arm: one timer in, and later out again, among 100k others.
    group.bench_function("insert_cancel", |b| {
        let mut wheel = full_wheel(origin);
        let mut rng = XorShift(7);
        b.iter(|| {
            let key = wheel.insert(origin + Duration::from_millis(1 + rng.below(60_000)), 0);
            black_box(wheel.cancel(key))
        });
    });

    // Arming alone, and disarming alone: timed in rounds of at most 100k on a
    // fresh full wheel each, so the wheel holds 100k to 200k timers.
    group.bench_function("insert", |b| {
        let mut rng = XorShift(11);
        b.iter_custom(|iters| {
            rounds(iters, |n| {
                let mut wheel = full_wheel(origin);
                let deadlines: Vec<Instant> =
                    (0..n).map(|_| origin + Duration::from_millis(1 + rng.below(60_000))).collect();
                let start = Instant::now();
                for (i, at) in deadlines.into_iter().enumerate() {
                    wheel.insert(at, i as u64);
                }
                start.elapsed()
            })
        });
    });
    group.bench_function("cancel", |b| {
        let mut rng = XorShift(13);
        b.iter_custom(|iters| {
            rounds(iters, |n| {
                let mut wheel = full_wheel(origin);
                let keys: Vec<_> =
                    (0..n).map(|i| wheel.insert(origin + Duration::from_millis(1 + rng.below(60_000)), i)).collect();
                let start = Instant::now();
                for key in keys {
                    black_box(wheel.cancel(key));
                }
                start.elapsed()
            })
        });
    });

    // Expiry in steady state: one timer per millisecond tick, 100k ms apart,
    // so each step fires exactly one (with whatever cascading the wheel does)
    // and re-arms it 100 s ahead, keeping 100k live.
    group.bench_function("expire_one_per_tick", |b| {
        let mut wheel = Wheel::new(origin);
        for i in 0..LIVE_TIMERS {
            wheel.insert(origin + Duration::from_millis(1 + i), i);
        }
        let mut tick = 0u64;
        b.iter(|| {
            tick += 1;
            let now = origin + Duration::from_millis(tick);
            while let Some(value) = wheel.poll(now) {
                wheel.insert(now + Duration::from_millis(LIVE_TIMERS), black_box(value));
            }
        });
    });

    // The loop asks this before every poll.
    group.bench_function("next_deadline", |b| {
        let wheel = full_wheel(origin);
        b.iter(|| black_box(&wheel).next_deadline());
    });
    group.finish();
}

/// A typical admin request: `curl -X PUT -d @service.json` of one service.
fn put_request() -> Vec<u8> {
    let body = br#"{"address":"127.0.0.1:8080","balance":"LC","check_interval":2,"fall":2,"rise":2,"client_timeout":30,"server_timeout":30,"connect_timeout":5,"backends":[{"name":"app1","address":"127.0.0.1:9001","check_address":"127.0.0.1:9001","weight":1},{"name":"app2","address":"127.0.0.1:9002","check_address":"127.0.0.1:9002","weight":2}]}"#;
    let mut request = format!(
        "PUT /web HTTP/1.1\r\nHost: 127.0.0.1:9090\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

fn chunked(request: &[u8]) -> Vec<u8> {
    let split = request.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
    let (head, body) = request.split_at(split);
    let head = String::from_utf8_lossy(head);
    let head: String = head
        .lines()
        .filter(|l| !l.starts_with("Content-Length"))
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\r\n"))
        .collect();
    let mut out = format!("{head}Transfer-Encoding: chunked\r\n\r\n").into_bytes();
    for chunk in body.chunks(64) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn decode_one(input: &mut Vec<u8>) -> usize {
    match Decoder::new().decode(input) {
        Ok(Progress::Request(request)) => request.body.len(),
        other => panic!("expected a whole request, got {other:?}"),
    }
}

fn admin(c: &mut Criterion) {
    let mut group = c.benchmark_group("admin_request");
    let plain = put_request();
    let chunked = chunked(&plain);
    for (name, bytes) in [("put_content_length", &plain), ("put_chunked", &chunked)] {
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(name, |b| b.iter_batched_ref(|| bytes.clone(), decode_one, BatchSize::SmallInput));
    }
    // What the handler does next with the body: one service's config.
    let body = {
        let mut input = plain.clone();
        match Decoder::new().decode(&mut input) {
            Ok(Progress::Request(request)) => request.body,
            other => panic!("expected a whole request, got {other:?}"),
        }
    };
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("parse_service_body", |b| {
        b.iter(|| shuttle::model::config::parse_service(black_box(&body), "web").expect("valid service"))
    });
    group.finish();
}

/// A config of `n` services, three backends each, every field written out.
fn services_json(n: usize) -> String {
    let services: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let backends: Vec<serde_json::Value> = (0..3)
                .map(|j| {
                    let port = 20_000 + 3 * i + j;
                    serde_json::json!({
                        "name": format!("app{j}"),
                        "address": format!("127.0.0.1:{port}"),
                        "check_address": format!("127.0.0.1:{port}"),
                        "weight": 1 + j,
                    })
                })
                .collect();
            serde_json::json!({
                "name": format!("service-{i:04}"),
                "address": format!("127.0.0.1:{}", 10_000 + i),
                "balance": if i % 2 == 0 { "RR" } else { "LC" },
                "check_interval": 2,
                "fall": 2,
                "rise": 2,
                "client_timeout": 60,
                "server_timeout": 60,
                "connect_timeout": 5,
                "check_send": "",
                "check_expect": "",
                "backends": backends,
            })
        })
        .collect();
    serde_json::to_string_pretty(&services).expect("serializable")
}

fn config(c: &mut Criterion) {
    let mut group = c.benchmark_group("config");
    let text = services_json(1_000);
    assert_eq!(parse_services(&text).expect("valid config").len(), 1_000);
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("parse_validate_1000_services", |b| {
        b.iter(|| parse_services(black_box(&text)).expect("valid config"))
    });
    group.finish();
}

/// `services` services of `backends` backends each, built as the admin API
/// builds them, with counters and histograms that have seen traffic (so the
/// figures have digits, as in a real scrape).
fn running(services: usize, backends: usize) -> Services {
    let mut all = Services::default();
    let mut rng = XorShift(0x5851_f42d_4c95_7f2d);
    for i in 0..services {
        let mut config = ServiceConfig::new(format!("service-{i:04}"), format!("127.0.0.1:{}", 10_000 + i));
        for j in 0..backends {
            let port = 20_000 + (i * backends + j) % 40_000;
            config.backends.push(BackendConfig::new(format!("app-{j:04}"), format!("127.0.0.1:{port}")));
        }
        let (key, keys) = all.insert(service::prepare(config, &Lookups::new()).expect("a valid service"));
        let s = all.service(key).expect("just inserted");
        for _ in 0..100 {
            s.state.connect_time.observe(Duration::from_micros(rng.below(20_000)));
            s.state.duration.observe(Duration::from_millis(rng.below(120_000)));
        }
        s.state.errors.add(rng.below(10));
        for k in keys {
            let b = &all.backend(k).expect("just inserted").state;
            b.connections.add(rng.below(1_000_000));
            b.sent.add(rng.below(1 << 40));
            b.received.add(rng.below(1 << 40));
            b.errors.add(rng.below(1_000));
            b.check_success.add(rng.below(100_000));
        }
    }
    all
}

/// `GET /` of the same services: every service's stats, pretty-printed.
fn stats_json(services: &Services) -> Vec<u8> {
    let all: Vec<_> = services.keys().filter_map(|k| services.service_stats(k)).collect();
    serde_json::to_vec_pretty(&all).expect("serializable")
}

fn metrics(c: &mut Criterion) {
    let mut group = c.benchmark_group("metrics_1000_backends");
    let statuses = StatusCounts::default();
    for (status, n) in [(200, 12_345), (404, 17), (405, 2)] {
        (0..n).for_each(|_| statuses.count(status));
    }
    let process = Process {
        started: std::time::UNIX_EPOCH + Duration::from_secs(1_796_000_000),
        workers: 2,
        active: 1_234,
        max_fds: 20_000,
        admin: &statuses,
        access_log: None,
    };
    group.throughput(Throughput::Elements(1_000));
    for (services, backends) in [(100, 10), (1, 1_000)] {
        let all = running(services, backends);
        let id = format!("{services}x{backends}");
        let text = metrics::render(&all, &process);
        assert_eq!(text.matches("shuttle_backend_up{").count(), 1_000, "one up sample a backend");
        group
            .bench_function(BenchmarkId::new("render", &id), |b| b.iter(|| metrics::render(black_box(&all), &process)));
        group.bench_function(BenchmarkId::new("stats_json", &id), |b| b.iter(|| stats_json(black_box(&all))));
    }
    group.finish();
}

fn quick() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .configure_from_args()
}

criterion_group! {
    name = benches;
    config = quick();
    targets = balance, wheel, admin, config, metrics
}
criterion_main!(benches);
