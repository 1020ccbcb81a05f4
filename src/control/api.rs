//! The admin API's routes (SPEC §5): what each method and path does, with
//! every status code.
//!
//! A change runs as prepare → persist → commit: everything that can fail is
//! done first (validate, resolve, bind a new listener: 400/409), then the
//! state file is written (500 if that fails, and nothing is applied), then
//! the change is applied, which cannot fail. So what runs and what is on disk
//! never disagree, and a bad request changes nothing.

use std::net::SocketAddr;
use std::time::Instant;

use log::info;

use crate::control::http::Request;
use crate::model::config::{self, BackendConfig, ServiceConfig};
use crate::model::health::Health;
use crate::model::service::{self, Prepared};
use crate::runtime::key::Key;
use crate::runtime::net;
use crate::server::{Entry, Server};

/// A response to one admin request.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// JSON body, pretty-printed with a trailing newline.
    pub body: Vec<u8>,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

/// Why a request failed, by status.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the request or its body is wrong.
    BadRequest(String),
    /// 404: no such service or backend.
    NotFound(String),
    /// 405: the path exists but not with this method.
    MethodNotAllowed(&'static str),
    /// 409: the new listen address cannot be bound.
    Conflict(String),
    /// 500: the state file could not be written.
    Internal(String),
}

impl ApiError {
    fn into_response(self) -> Response {
        let (status, message, allow) = match self {
            ApiError::BadRequest(m) => (400, m, None),
            ApiError::NotFound(m) => (404, m, None),
            ApiError::MethodNotAllowed(allow) => (405, format!("method not allowed; use {allow}"), Some(allow)),
            ApiError::Conflict(m) => (409, m, None),
            ApiError::Internal(m) => (500, m, None),
        };
        Response { status, body: error_body(&message), allow }
    }
}

impl From<config::ConfigError> for ApiError {
    fn from(e: config::ConfigError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

/// `{"error": message}`, pretty-printed with a trailing newline.
pub fn error_body(message: &str) -> Vec<u8> {
    pretty(&serde_json::json!({ "error": message }))
}

fn pretty<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    body
}

const READ_ONLY: &str = "GET";
const READ_WRITE: &str = "GET, PUT, POST, DELETE";

/// Runs one admin request against the server.
pub fn execute(server: &mut Server, request: &Request, now: Instant) -> Response {
    match route(server, request, now) {
        Ok(body) => Response { status: 200, body, allow: None },
        Err(e) => e.into_response(),
    }
}

fn route(server: &mut Server, request: &Request, now: Instant) -> Result<Vec<u8>, ApiError> {
    let path = request.path.strip_suffix('/').filter(|p| !p.is_empty()).unwrap_or(&request.path);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = request.method.as_str();
    let backends_only = has_param(request.query.as_deref(), "backends_only");
    match (method, segments.as_slice()) {
        ("GET", [""]) => {
            let all: Vec<_> = server.services.keys().filter_map(|k| server.services.service_stats(k)).collect();
            Ok(pretty(&all))
        }
        (_, [""]) | (_, ["_config"]) if method != "GET" => Err(ApiError::MethodNotAllowed(READ_ONLY)),
        ("GET", ["_config"]) => Ok(config::to_json(&server.services.configs()).into_bytes()),
        ("GET", [name]) => {
            let key = find_service(server, name)?;
            server
                .services
                .service_stats(key)
                .map(|stats| pretty(&stats))
                .ok_or_else(|| ApiError::NotFound(name.to_string()))
        }
        ("PUT" | "POST", [name]) => put_service(server, name, &request.body, backends_only, now),
        ("DELETE", [name]) => delete_service(server, name),
        ("GET", [name, backend]) => {
            let service = find_service(server, name)?;
            let key = find_backend(server, service, name, backend)?;
            server
                .services
                .backend_stats(key)
                .map(|stats| pretty(&stats))
                .ok_or_else(|| ApiError::NotFound(backend.to_string()))
        }
        ("PUT" | "POST", [name, backend]) => put_backend(server, name, backend, &request.body, now),
        ("DELETE", [name, backend]) => delete_backend(server, name, backend, now),
        (_, [_] | [_, _]) => Err(ApiError::MethodNotAllowed(READ_WRITE)),
        _ => Err(ApiError::NotFound(format!(
            "no such path {:?}; paths are /, /_config, /SERVICE and /SERVICE/BACKEND",
            request.path
        ))),
    }
}

fn has_param(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| q.split('&').any(|pair| pair.split('=').next() == Some(name)))
}

fn find_service(server: &Server, name: &str) -> Result<Key, ApiError> {
    server.services.find(name).ok_or_else(|| ApiError::NotFound(format!("no service named {name:?}")))
}

fn find_backend(server: &Server, service: Key, service_name: &str, name: &str) -> Result<Key, ApiError> {
    server
        .services
        .find_backend(service, name)
        .ok_or_else(|| ApiError::NotFound(format!("service {service_name:?} has no backend named {name:?}")))
}

/// A name from a path that is about to be written: `_` names are reserved.
fn writable_name(kind: &str, name: &str) -> Result<(), ApiError> {
    config::validate_name(name).map_err(|e| ApiError::BadRequest(format!("invalid {kind} name {name:?}: {e}")))
}

fn put_service(
    server: &mut Server,
    name: &str,
    body: &[u8],
    backends_only: bool,
    now: Instant,
) -> Result<Vec<u8>, ApiError> {
    writable_name("service", name)?;
    let existing = server.services.find(name);
    let running = existing.and_then(|key| server.services.config(key));
    let config = match &running {
        Some(running) if backends_only => config::parse_backends_only(body, running)?,
        _ => config::parse_service(body, name)?,
    };
    if let (Some(key), Some(running)) = (existing, &running) {
        if config.settings_equal(running) {
            return update_backends(server, key, config.backends, now);
        }
    }
    let prepared = service::prepare(config).map_err(ApiError::BadRequest)?;
    check_against_running(server, existing, &prepared)?;
    let running_addr = existing.and_then(|k| server.services.service(k)).map(|s| s.addr);
    // Bind and register a new address before anything changes: a failure leaves
    // the old service running (409), and nothing after the state file can fail.
    let listener = if running_addr == Some(prepared.addr) {
        None
    } else {
        let socket = net::bind(prepared.addr).map_err(|e| {
            ApiError::Conflict(format!("cannot listen on {} ({}): {e}", prepared.config.address, prepared.addr))
        })?;
        Some(
            server
                .stage_listener(socket)
                .map_err(|e| ApiError::Internal(format!("cannot register a listener: {e}")))?,
        )
    };
    let mut all = others(server, name);
    all.push(prepared.config.clone());
    if let Err(e) = persist(server, &all) {
        if let Some(staged) = listener {
            server.remove_entry(staged);
        }
        return Err(e);
    }
    let body = config::to_json(&sorted(all)).into_bytes();
    match existing {
        Some(key) => {
            let changes = server.services.replace(key, prepared);
            for removed in changes.removed {
                if let Some(probe) = removed.probe {
                    server.remove_entry(probe);
                }
            }
            if let Some(staged) = listener {
                server.adopt_listener(key, staged);
            }
            reconcile_probes(server, key, now);
            info!("service {name} updated");
        }
        // A new service always has a staged listener: it had no running address.
        None => {
            if let Some(staged) = listener {
                server.commit_service(prepared, staged, now);
                info!("service {name} added");
            }
        }
    }
    Ok(body)
}

fn delete_service(server: &mut Server, name: &str) -> Result<Vec<u8>, ApiError> {
    writable_name("service", name)?;
    let key = find_service(server, name)?;
    let all = others(server, name);
    persist(server, &all)?;
    if let Some((service, backends)) = server.services.remove(key) {
        if let Some(listener) = service.listener {
            server.remove_entry(listener);
        }
        for probe in backends.into_iter().filter_map(|b| b.probe) {
            server.remove_entry(probe);
        }
    }
    info!("service {name} removed; its open connections run on");
    Ok(config::to_json(&all).into_bytes())
}

fn put_backend(server: &mut Server, name: &str, backend: &str, body: &[u8], now: Instant) -> Result<Vec<u8>, ApiError> {
    writable_name("service", name)?;
    writable_name("backend", backend)?;
    let config = config::parse_backend(body, name, backend)?;
    let key = find_service(server, name)?;
    let mut backends = server.services.config(key).map(|c| c.backends).unwrap_or_default();
    match backends.iter_mut().find(|b| b.name == backend) {
        Some(slot) => *slot = config,
        None => backends.push(config),
    }
    update_backends(server, key, backends, now)
}

fn delete_backend(server: &mut Server, name: &str, backend: &str, now: Instant) -> Result<Vec<u8>, ApiError> {
    writable_name("service", name)?;
    writable_name("backend", backend)?;
    let key = find_service(server, name)?;
    find_backend(server, key, name, backend)?;
    let mut backends = server.services.config(key).map(|c| c.backends).unwrap_or_default();
    backends.retain(|b| b.name != backend);
    update_backends(server, key, backends, now)
}

/// Replaces a service's backends, keeping unchanged ones as they are (SPEC §5).
fn update_backends(
    server: &mut Server,
    key: Key,
    backends: Vec<BackendConfig>,
    now: Instant,
) -> Result<Vec<u8>, ApiError> {
    let Some(mut config) = server.services.config(key) else {
        return Err(ApiError::NotFound("service vanished".into()));
    };
    config.backends = backends;
    config::validate_service(&config)?;
    let mut all = others(server, &config.name);
    all.push(config.clone());
    let prepared = service::prepare(config).map_err(ApiError::BadRequest)?;
    check_against_running(server, Some(key), &prepared)?;
    let Prepared { config, backend_addrs, .. } = prepared;
    persist(server, &all)?;
    let changes = server.services.set_backends(key, config.backends, backend_addrs);
    for removed in changes.removed {
        if let Some(probe) = removed.probe {
            server.remove_entry(probe);
        }
    }
    reconcile_probes(server, key, now);
    info!("service {} backends updated", config.name);
    Ok(config::to_json(&sorted(all)).into_bytes())
}

/// Checks a prepared service against everything else that runs: its listen
/// address must not clash with another service's, and no backend, its own or
/// another service's, may reach one of our listeners (it would loop). Uses the
/// addresses resolved when those services were applied and the ports actually
/// bound, so nothing is resolved again and port-0 listeners count too.
fn check_against_running(server: &Server, key: Option<Key>, prepared: &Prepared) -> Result<(), ApiError> {
    let name = &prepared.config.name;
    let new_backends = || prepared.config.backends.iter().zip(&prepared.backend_addrs);
    let looping = |backend: &str, addr: SocketAddr, listener: SocketAddr, owner: &str| {
        ApiError::BadRequest(format!(
            "service {name:?}: backend {backend:?}: address: {addr} reaches {listener}, where service {owner:?} listens; it would loop"
        ))
    };
    for (backend, (addr, _)) in new_backends() {
        if config::loops_to(*addr, prepared.addr) {
            return Err(looping(&backend.name, *addr, prepared.addr, name));
        }
    }
    for other in server.services.keys().filter(|&k| Some(k) != key) {
        let Some(s) = server.services.service(other) else { continue };
        let owner = s.settings.name.as_str();
        if config::overlaps(s.addr, prepared.addr) {
            return Err(ApiError::BadRequest(format!(
                "service {name:?}: address: {:?} conflicts with {}, where service {owner:?} listens",
                prepared.config.address, s.addr
            )));
        }
        for (backend, (addr, _)) in new_backends() {
            if config::loops_to(*addr, s.addr) {
                return Err(looping(&backend.name, *addr, s.addr, owner));
            }
        }
        for b in s.backends.iter().filter_map(|&k| server.services.backend(k)) {
            if config::loops_to(b.addr, prepared.addr) {
                return Err(ApiError::BadRequest(format!(
                    "service {name:?}: address: service {owner:?} has backend {:?} at {}, which would loop to it",
                    b.config.name, b.addr
                )));
            }
        }
    }
    // Ports actually bound: a listener on port 0 got its real port only then. A
    // service moving to a new address is leaving its current listener.
    let moving = key.and_then(|k| server.services.service(k)).is_some_and(|s| s.addr != prepared.addr);
    for (_, entry) in server.entries.iter() {
        let Entry::Listener(listener) = entry else { continue };
        if moving && Some(listener.service) == key {
            continue;
        }
        let Ok(local) = listener.socket.local_addr() else { continue };
        let owner = server.services.service(listener.service).map_or("?", |s| s.settings.name.as_str());
        for (backend, (addr, _)) in new_backends() {
            if config::loops_to(*addr, local) {
                return Err(looping(&backend.name, *addr, local, owner));
            }
        }
    }
    Ok(())
}

/// Starts or stops probes so that exactly the checked backends of a checking
/// service have one. A backend left without checks is up: nothing could ever
/// bring it back otherwise.
fn reconcile_probes(server: &mut Server, service: Key, now: Instant) {
    let Some(s) = server.services.service(service) else { return };
    let checks = config::seconds(s.settings.check_interval).is_some();
    let name = s.settings.name.clone();
    for backend in s.backends.clone() {
        let Some(b) = server.services.backend(backend) else { continue };
        let want = checks && b.check_addr.is_some();
        let have = b.probe.filter(|&p| matches!(server.entries.get(p), Some(Entry::Probe(_))));
        match (want, have) {
            (true, None) => server.start_probe(backend, now),
            (false, Some(probe)) => server.remove_entry(probe),
            _ => {}
        }
        if let Some(b) = server.services.backend_mut(backend).filter(|_| !want) {
            b.probe = None;
            if !b.health.is_up() {
                b.health = Health::default();
                info!("{name}/{} is up: health checks are off", b.config.name);
            }
        }
    }
}

/// Every running service's config but `name`'s.
fn others(server: &Server, name: &str) -> Vec<ServiceConfig> {
    server.services.configs().into_iter().filter(|c| c.name != name).collect()
}

fn sorted(mut all: Vec<ServiceConfig>) -> Vec<ServiceConfig> {
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// Writes the state file (if any) with the config about to run; a failure is 500 and stops the change.
fn persist(server: &Server, all: &[ServiceConfig]) -> Result<(), ApiError> {
    let Some(path) = &server.options.state else { return Ok(()) };
    config::save_atomic(path, &sorted(all.to_vec())).map_err(|e| {
        ApiError::Internal(format!("cannot write the state file {}: {e}; nothing was changed", path.display()))
    })
}
