//! The admin API's routes (reference §5): what each method and path does, with
//! every status code.
//!
//! Reads are answered at once. A change goes through four steps, each its
//! own function, so that the slow ones can wait off the loop:
//! 1. [`draft`]: the route works out the new service config from the request
//!    and the running one (400/404 for bad input);
//! 2. the names in it are looked up on a helper thread (`helpers::Resolver`);
//! 3. [`prepare`]: every address is resolved and checked against what runs,
//!    and a new listener is bound and staged (400/409); nothing has changed yet;
//! 4. the state file is written on a helper thread (500 if that fails, and
//!    [`abandon`] undoes the staging), then [`commit`] applies the change,
//!    which cannot fail.
//!
//! So what runs and what is on disk never disagree, a bad request changes
//! nothing, and proxying never waits for DNS or the disk. The routes never
//! touch the loop: they work on the config and the [`Plane`] interface.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use crate::control::http::Request;
use crate::control::info::Info;
use crate::control::metrics::{self, Process};
use crate::model::address::Lookups;
use crate::model::config::{self, BackendConfig, ServiceConfig};
use crate::model::diff::{self, Fate};
use crate::model::endpoint::Endpoint;
use crate::model::service::{self, Prepared, Services};
use crate::runtime::key::Key;
use crate::runtime::privileges;

/// The media type of every admin body but the metrics'.
pub const JSON: &str = "application/json";

/// A response to one admin request.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The body's media type: JSON but for the metrics.
    pub content_type: &'static str,
    /// The body: pretty-printed JSON with a trailing newline, or the metrics' text.
    pub body: Vec<u8>,
    /// Extra header fields, e.g. the `Allow` of a 405.
    pub fields: Vec<(&'static str, String)>,
}

impl Response {
    /// A 200 with this body.
    pub fn ok(body: Vec<u8>) -> Response {
        Response { status: 200, content_type: JSON, body, fields: Vec::new() }
    }

    /// An error status with `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Response {
        Response { status, content_type: JSON, body: error_body(message), fields: Vec::new() }
    }
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
    /// 500: the state file could not be written, or a socket not registered.
    Internal(String),
    /// 503: the resolver is still busy with lookups that have not answered.
    Unavailable(String),
}

impl ApiError {
    /// Its HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::Conflict(_) => 409,
            ApiError::Internal(_) => 500,
            ApiError::Unavailable(_) => 503,
        }
    }

    /// What the `error` field says.
    pub fn message(&self) -> String {
        match self {
            ApiError::MethodNotAllowed(allow) => format!("method not allowed; use {allow}"),
            ApiError::BadRequest(m)
            | ApiError::NotFound(m)
            | ApiError::Conflict(m)
            | ApiError::Internal(m)
            | ApiError::Unavailable(m) => m.clone(),
        }
    }

    /// The response that reports it.
    pub fn into_response(self) -> Response {
        let mut response = Response::error(self.status(), &self.message());
        if let ApiError::MethodNotAllowed(allow) = self {
            response.fields.push(("Allow", allow.to_string()));
        }
        response
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
const READ_WRITE: &str = "GET, PUT, POST, PATCH, DELETE";

/// A listener bound and registered for a change, serving nothing yet.
#[derive(Debug, Clone)]
pub struct Staged {
    /// Its entry in the loop.
    pub listener: Key,
    /// Where it is bound (the real port, when port 0 was asked for).
    pub local: Endpoint,
}

/// What the routes need of the loop (or loops) that run the services: read
/// the running state, stage listeners, and apply a prepared change.
pub trait Plane {
    /// The running services and their counters.
    fn services(&self) -> &Services;
    /// Every bound service listener: the service it serves (`None` while
    /// staged) and its local address.
    fn bound(&self) -> Vec<(Option<Key>, Endpoint)>;
    /// The admin API's own TCP address, if it listens on one.
    fn admin_addr(&self) -> Option<SocketAddr>;
    /// Binds and registers a listener (a UDP socket for `Protocol::Udp`) for
    /// `addr`; it serves nothing until committed.
    fn stage_listener(&mut self, addr: &Endpoint, settings: &ServiceConfig) -> io::Result<Staged>;
    /// Closes a staged listener of a change that did not happen.
    fn unstage(&mut self, staged: Staged);
    /// Starts a new service on its staged listener.
    fn add_service(&mut self, prepared: Prepared, listener: Staged, now: Instant);
    /// Replaces a service's settings and backends; a staged listener replaces its old one.
    fn replace_service(&mut self, key: Key, prepared: Prepared, listener: Option<Staged>, now: Instant);
    /// Replaces only a service's backends.
    fn set_backends(&mut self, key: Key, prepared: Prepared, now: Instant);
    /// Removes a service; its open connections run on.
    fn remove_service(&mut self, key: Key, now: Instant);
    /// Cuts the open connections of a service's backend, or of the whole
    /// service (`DELETE ...?close`): they close gently, on every loop.
    fn cut(&mut self, key: Key, backend: Option<&str>, now: Instant);
    /// Whether every loop has applied every change so far (the answer to a
    /// change waits until they have).
    fn settled(&self) -> bool;
    /// What `GET /_info` shows.
    fn info(&self) -> Info;
    /// What only the loop knows of the process, for `GET /metrics`.
    fn process(&self) -> Process<'_>;
}

/// Whether a request changes the config (and so takes its turn), or only reads.
pub fn is_change(request: &Request) -> bool {
    matches!(request.method.as_str(), "PUT" | "POST" | "PATCH" | "DELETE")
}

/// Answers a request that changes nothing.
pub fn read(plane: &impl Plane, request: &Request) -> Response {
    // Prometheus scrapes `/metrics` by default: it shadows the stats of a service named so (reference §5.1).
    if request.method == "GET" && matches!(segments(request).as_slice(), ["metrics"] | ["_metrics"]) {
        let body = metrics::render(plane.services(), &plane.process()).into_bytes();
        return Response { content_type: metrics::CONTENT_TYPE, ..Response::ok(body) };
    }
    match read_route(plane, request) {
        Ok(body) => Response::ok(body),
        Err(e) => e.into_response(),
    }
}

/// The path's segments, without a trailing slash.
fn segments(request: &Request) -> Vec<&str> {
    let path = request.path.strip_suffix('/').filter(|p| !p.is_empty()).unwrap_or(&request.path);
    path.trim_start_matches('/').split('/').collect()
}

fn read_route(plane: &impl Plane, request: &Request) -> Result<Vec<u8>, ApiError> {
    let services = plane.services();
    let segments = segments(request);
    match (request.method.as_str(), segments.as_slice()) {
        ("GET", [""]) => {
            let all: Vec<_> = services.keys().filter_map(|k| services.service_stats(k)).collect();
            Ok(pretty(&all))
        }
        ("GET", ["_config"]) => Ok(config::to_json(&services.configs()).into_bytes()),
        ("GET", ["_info"]) => Ok(pretty(&plane.info())),
        ("GET", [name]) => {
            let key = find_service(services, name)?;
            services.service_stats(key).map(|stats| pretty(&stats)).ok_or_else(|| no_service(name))
        }
        ("GET", [name, backend]) => {
            let service = find_service(services, name)?;
            let key = find_backend(services, service, name, backend)?;
            services.backend_stats(key).map(|stats| pretty(&stats)).ok_or_else(|| no_service(name))
        }
        (_, [""] | ["_config"] | ["_info"] | ["_metrics"]) => Err(ApiError::MethodNotAllowed(READ_ONLY)),
        (_, [_] | [_, _]) => Err(ApiError::MethodNotAllowed(READ_WRITE)),
        _ => Err(no_path(request)),
    }
}

fn no_path(request: &Request) -> ApiError {
    ApiError::NotFound(format!(
        "no such path {:?}; paths are /, /_config, /_info, /metrics, /SERVICE and /SERVICE/BACKEND",
        request.path
    ))
}

fn no_service(name: &str) -> ApiError {
    ApiError::NotFound(format!("no service named {name:?}"))
}

fn has_param(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| q.split('&').any(|pair| pair.split('=').next() == Some(name)))
}

fn find_service(services: &Services, name: &str) -> Result<Key, ApiError> {
    services.find(name).ok_or_else(|| no_service(name))
}

fn find_backend(services: &Services, service: Key, service_name: &str, name: &str) -> Result<Key, ApiError> {
    services
        .find_backend(service, name)
        .ok_or_else(|| ApiError::NotFound(format!("service {service_name:?} has no backend named {name:?}")))
}

/// A name from a path that is about to be written: `_` names are reserved.
fn writable_name(kind: &str, name: &str) -> Result<(), ApiError> {
    config::validate_name(name).map_err(|e| ApiError::BadRequest(format!("invalid {kind} name {name:?}: {e}")))
}

/// A change worked out from a request and the running config; its names are not looked up yet.
#[derive(Debug)]
pub enum Draft {
    /// Create a service, or replace one's settings (and backends).
    PutService {
        /// The running service it replaces.
        existing: Option<Key>,
        /// The new config.
        config: ServiceConfig,
    },
    /// Replace only a service's backends: unchanged ones keep their state and counters.
    SetBackends {
        /// The service.
        key: Key,
        /// Its config with the new backends.
        config: ServiceConfig,
    },
    /// Remove a service.
    Delete {
        /// The service.
        key: Key,
        /// Its name.
        name: String,
    },
    /// Run this whole list instead of the running one (a reload): one change.
    Reload {
        /// Every service, as the file lists them.
        configs: Vec<ServiceConfig>,
    },
    /// `DELETE ...?close`: cut the open connections of one backend (or of the
    /// whole service), then make the removal `then`.
    Cut {
        /// The service.
        key: Key,
        /// The backend; `None` for the whole service.
        backend: Option<String>,
        /// The removal.
        then: Box<Draft>,
    },
}

impl Draft {
    /// The host names the change needs looked up.
    pub fn host_names(&self) -> Vec<String> {
        match self {
            Draft::PutService { config, .. } | Draft::SetBackends { config, .. } => config::host_names(config),
            Draft::Delete { .. } => Vec::new(),
            Draft::Cut { then, .. } => then.host_names(),
            Draft::Reload { configs } => {
                let mut names: Vec<String> = configs.iter().flat_map(config::host_names).collect();
                names.sort();
                names.dedup();
                names
            }
        }
    }
}

/// Works out the change a `PUT`, `POST`, `PATCH` or `DELETE` asks for.
pub fn draft(plane: &impl Plane, request: &Request) -> Result<Draft, ApiError> {
    let services = plane.services();
    let segments = segments(request);
    let backends_only = has_param(request.query.as_deref(), "backends_only");
    let close = has_param(request.query.as_deref(), "close");
    match (request.method.as_str(), segments.as_slice()) {
        (_, [""] | ["_config"] | ["_info"] | ["_metrics"]) => Err(ApiError::MethodNotAllowed(READ_ONLY)),
        ("PUT" | "POST", [name]) => put_service(services, name, &request.body, backends_only),
        ("PATCH", [name]) => {
            writable_name("service", name)?;
            let key = find_service(services, name)?;
            let running = services.config(key).ok_or_else(|| no_service(name))?;
            let config = config::patch_service(&request.body, &running)?;
            Ok(service_draft(Some(key), Some(&running), config))
        }
        ("DELETE", [name]) => {
            writable_name("service", name)?;
            let key = find_service(services, name)?;
            let delete = Draft::Delete { key, name: name.to_string() };
            Ok(if close { Draft::Cut { key, backend: None, then: Box::new(delete) } } else { delete })
        }
        ("PUT" | "POST", [name, backend]) => {
            writable_name("service", name)?;
            writable_name("backend", backend)?;
            let config = config::parse_backend(&request.body, name, backend)?;
            let key = find_service(services, name)?;
            let mut backends = services.config(key).map(|c| c.backends).unwrap_or_default();
            match backends.iter_mut().find(|b| b.name == *backend) {
                Some(slot) => *slot = config,
                None => backends.push(config),
            }
            set_backends(services, key, backends)
        }
        ("PATCH", [name, backend]) => {
            writable_name("service", name)?;
            writable_name("backend", backend)?;
            let key = find_service(services, name)?;
            find_backend(services, key, name, backend)?;
            let mut backends = services.config(key).map(|c| c.backends).unwrap_or_default();
            if let Some(slot) = backends.iter_mut().find(|b| b.name == *backend) {
                *slot = config::patch_backend(&request.body, name, slot)?;
            }
            set_backends(services, key, backends)
        }
        ("DELETE", [name, backend]) => {
            writable_name("service", name)?;
            writable_name("backend", backend)?;
            let key = find_service(services, name)?;
            find_backend(services, key, name, backend)?;
            let mut backends = services.config(key).map(|c| c.backends).unwrap_or_default();
            backends.retain(|b| b.name != *backend);
            let remove = set_backends(services, key, backends)?;
            Ok(if close {
                Draft::Cut { key, backend: Some(backend.to_string()), then: Box::new(remove) }
            } else {
                remove
            })
        }
        (_, [_] | [_, _]) => Err(ApiError::MethodNotAllowed(READ_WRITE)),
        _ => Err(no_path(request)),
    }
}

fn put_service(services: &Services, name: &str, body: &[u8], backends_only: bool) -> Result<Draft, ApiError> {
    writable_name("service", name)?;
    let existing = services.find(name);
    let running = existing.and_then(|key| services.config(key));
    let config = match &running {
        Some(running) if backends_only => config::parse_backends_only(body, running)?,
        _ => config::parse_service(body, name)?,
    };
    Ok(service_draft(existing, running.as_ref(), config))
}

/// A new config for service `name`: a backends-only update when its settings
/// are those running (reference §5), else a replacement (or a new service).
fn service_draft(existing: Option<Key>, running: Option<&ServiceConfig>, config: ServiceConfig) -> Draft {
    match (existing, running) {
        (Some(key), Some(running)) if config.settings_equal(running) => Draft::SetBackends { key, config },
        _ => Draft::PutService { existing, config },
    }
}

fn set_backends(services: &Services, key: Key, backends: Vec<BackendConfig>) -> Result<Draft, ApiError> {
    let Some(mut config) = services.config(key) else {
        return Err(ApiError::NotFound("service vanished".into()));
    };
    config.backends = backends;
    config::validate_service(&config)?;
    Ok(Draft::SetBackends { key, config })
}

/// A change with every fallible step done: ready to be saved, then committed.
#[derive(Debug)]
pub struct Ready {
    /// What to do to the loop, in order (one step, or a reload's many).
    steps: Vec<Apply>,
    /// Every service's config once the change is applied, sorted by name.
    configs: Vec<ServiceConfig>,
    /// What the log says once it is applied.
    summary: String,
}

#[derive(Debug)]
enum Apply {
    Add { prepared: Prepared, listener: Staged },
    Replace { key: Key, prepared: Prepared, listener: Option<Staged> },
    Backends { key: Key, prepared: Prepared },
    Delete { key: Key },
    Cut { key: Key, backend: Option<String> },
}

impl Ready {
    /// Every service's config once the change is applied, sorted by name:
    /// what the state file is to hold.
    pub fn configs(&self) -> &[ServiceConfig] {
        &self.configs
    }

    /// Whether applying it would change nothing (a reload of the running config).
    pub fn changes_nothing(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Resolves and checks a draft and binds what it needs: 400 or 409 on
/// failure, and then nothing has changed.
pub fn prepare(plane: &mut impl Plane, draft: Draft, lookups: &Lookups) -> Result<Ready, ApiError> {
    let services = plane.services();
    let (step, configs, summary) = match draft {
        Draft::Reload { configs } => return prepare_list(plane, configs, lookups),
        Draft::Cut { key, backend, then } => {
            let mut ready = prepare(plane, *then, lookups)?;
            // Cut first, while the pairs' backend (or service) still runs; the removal follows.
            let what =
                if backend.is_some() { "its open connections closed" } else { "its open connections are closed" };
            ready.summary = match ready.summary.strip_suffix("; its open connections run on") {
                Some(rest) => format!("{rest}; {what}"),
                None => format!("{}; {what}", ready.summary),
            };
            ready.steps.insert(0, Apply::Cut { key, backend });
            return Ok(ready);
        }
        Draft::Delete { key, name } => {
            let configs = others(services, &name);
            (Apply::Delete { key }, configs, format!("service {name} removed; its open connections run on"))
        }
        Draft::SetBackends { key, config } => {
            let prepared = service::prepare(config, lookups).map_err(ApiError::BadRequest)?;
            check_against_running(plane, Some(key), &prepared, None)?;
            let services = plane.services();
            let summary = backends_summary(services, key, &prepared.config);
            let mut configs = others(services, &prepared.config.name);
            configs.push(prepared.config.clone());
            (Apply::Backends { key, prepared }, configs, summary)
        }
        Draft::PutService { existing, config } => {
            let prepared = service::prepare(config, lookups).map_err(ApiError::BadRequest)?;
            check_against_running(plane, existing, &prepared, None)?;
            let keeps_socket =
                existing.and_then(|k| plane.services().service(k)).is_some_and(|s| s.listens_as(&prepared));
            // A new address is bound and registered before anything changes: a
            // failure leaves the old service running (409), and nothing after the
            // state file can fail. The same address keeps its socket (reference §5).
            let listener = if keeps_socket {
                None
            } else {
                let staged = stage(plane, &prepared)?;
                // A port-0 listener only now has its real port: check it too.
                if let Err(e) = check_against_running(plane, existing, &prepared, Some(staged.local.clone())) {
                    plane.unstage(staged);
                    return Err(e);
                }
                Some(staged)
            };
            let name = prepared.config.name.clone();
            let mut configs = others(plane.services(), &name);
            configs.push(prepared.config.clone());
            match (existing, listener) {
                (Some(key), listener) => {
                    let summary = replace_summary(plane.services(), key, &prepared.config);
                    (Apply::Replace { key, prepared, listener }, configs, summary)
                }
                (None, Some(listener)) => (Apply::Add { prepared, listener }, configs, format!("service {name} added")),
                // A new service has no running address, so it always gets a listener.
                (None, None) => return Err(ApiError::Internal("no listener for a new service".into())),
            }
        }
    };
    Ok(Ready { steps: vec![step], configs: sorted(configs), summary })
}

/// Applies a ready change; cannot fail. Returns the 200 that answers it and
/// what changed, for the audit log.
pub fn commit(plane: &mut impl Plane, ready: Ready, now: Instant) -> (Response, String) {
    let body = config::to_json(&ready.configs).into_bytes();
    for step in ready.steps {
        match step {
            Apply::Add { prepared, listener } => plane.add_service(prepared, listener, now),
            Apply::Replace { key, prepared, listener } => plane.replace_service(key, prepared, listener, now),
            Apply::Backends { key, prepared } => plane.set_backends(key, prepared, now),
            Apply::Delete { key } => plane.remove_service(key, now),
            Apply::Cut { key, backend } => plane.cut(key, backend.as_deref(), now),
        }
    }
    (Response::ok(body), ready.summary)
}

/// Undoes what [`prepare`] staged for a change that will not happen.
pub fn abandon(plane: &mut impl Plane, ready: Ready) {
    unstage_all(plane, ready.steps);
}

fn unstage_all(plane: &mut impl Plane, steps: Vec<Apply>) {
    for step in steps {
        if let Apply::Add { listener, .. } | Apply::Replace { listener: Some(listener), .. } = step {
            plane.unstage(listener);
        }
    }
}

/// Binds and registers the listener of a service that needs a new one (409 if it can't).
fn stage(plane: &mut impl Plane, prepared: &Prepared) -> Result<Staged, ApiError> {
    plane.stage_listener(&prepared.addr, &prepared.config).map_err(|e| {
        let hint = privileges::bind_hint(prepared.addr.port(), &e).map(|h| format!(": {h}")).unwrap_or_default();
        ApiError::Conflict(format!("cannot listen on {} ({}): {e}{hint}", prepared.config.address, prepared.addr))
    })
}

/// Prepares a whole new service list, a reload, as one change: every
/// fallible step before anything changes. The list is resolved and checked
/// between its services as start-up does (`service::check_all`), then
/// against what stays bound; every new listener is staged, and any failure
/// unstages what was staged. Each service then takes the step an admin
/// change of it would: none, backends only, replace, add or remove.
fn prepare_list(plane: &mut impl Plane, configs: Vec<ServiceConfig>, lookups: &Lookups) -> Result<Ready, ApiError> {
    // By name, as everything shows services: the audit line too.
    let configs = sorted(configs);
    let all: Vec<Prepared> = configs
        .iter()
        .map(|c| service::prepare(c.clone(), lookups))
        .collect::<Result<_, _>>()
        .map_err(ApiError::BadRequest)?;
    service::check_all(&all, plane.admin_addr()).map_err(ApiError::BadRequest)?;
    check_handover(plane.services(), &all)?;
    check_still_bound(plane, &all)?;
    let running = plane.services().configs();
    let mut by_name: HashMap<&str, &Prepared> = all.iter().map(|p| (p.config.name.as_str(), p)).collect();
    let (mut steps, mut summary) = (Vec::new(), Vec::new());
    for (name, fate) in diff::diff(&running, &configs) {
        let prepared = by_name.remove(name);
        match reload_step(plane, name, fate, prepared) {
            Ok(Some((step, line))) => {
                steps.push(step);
                summary.push(line);
            }
            Ok(None) => {}
            Err(e) => {
                unstage_all(plane, steps);
                return Err(e);
            }
        }
    }
    // Listeners on port 0 have their real port only now: no backend may reach it.
    let staged = steps.iter().filter_map(|s| match s {
        Apply::Add { prepared, listener } | Apply::Replace { prepared, listener: Some(listener), .. } => {
            Some((prepared.config.name.clone(), listener.local.clone()))
        }
        _ => None,
    });
    let staged: Vec<(String, Endpoint)> = staged.collect();
    if let Some(e) = staged.iter().find_map(|(owner, local)| loops_to_listener(&all, local, owner).err()) {
        unstage_all(plane, steps);
        return Err(e);
    }
    let summary = if summary.is_empty() { "nothing changed".to_string() } else { summary.join("; ") };
    Ok(Ready { steps, configs, summary })
}

/// One service's step of a reload and its audit words; `None` when it stays as it is.
fn reload_step(
    plane: &mut impl Plane,
    name: &str,
    fate: Fate,
    prepared: Option<&Prepared>,
) -> Result<Option<(Apply, String)>, ApiError> {
    let services = plane.services();
    let key = services.find(name);
    let step = match (fate, key, prepared) {
        (Fate::Unchanged, _, _) => return Ok(None),
        (Fate::Removed, Some(key), _) => (Apply::Delete { key }, format!("service {name} removed")),
        (Fate::Added, None, Some(prepared)) => {
            let listener = stage(plane, prepared)?;
            (Apply::Add { prepared: prepared.clone(), listener }, format!("service {name} added"))
        }
        (Fate::Backends, Some(key), Some(prepared)) => {
            let line = backends_summary(services, key, &prepared.config);
            (Apply::Backends { key, prepared: prepared.clone() }, line)
        }
        (Fate::Settings, Some(key), Some(prepared)) => {
            let line = replace_summary(services, key, &prepared.config);
            // The same address keeps its socket, so no client is refused (reference §5).
            let moving = services.service(key).is_some_and(|s| !s.listens_as(prepared));
            let listener = if moving { Some(stage(plane, prepared)?) } else { None };
            (Apply::Replace { key, prepared: prepared.clone(), listener }, line)
        }
        // The fates come from the running list and the new one, both in hand: a bug.
        _ => return Err(ApiError::Internal(format!("service {name:?}: its step does not match what runs"))),
    };
    Ok(Some(step))
}

/// Refuses a reload that gives one service the address another listens on
/// now (a rename, or two services swapping ports): its listener would have
/// to be handed over between services, which one reload does not do.
fn check_handover(services: &Services, all: &[Prepared]) -> Result<(), ApiError> {
    // By port, so that a big config stays linear.
    let mut by_port: HashMap<u16, Vec<(&str, &Endpoint)>> = HashMap::new();
    for s in services.keys().filter_map(|k| services.service(k)) {
        by_port.entry(s.addr.port()).or_default().push((&s.settings.name, &s.addr));
    }
    for p in all {
        let same_port = by_port.get(&p.addr.port()).map_or(&[][..], Vec::as_slice);
        let taken = same_port.iter().find(|(owner, addr)| *owner != p.config.name && addr.overlaps(&p.addr));
        if let Some((owner, addr)) = taken {
            let name = &p.config.name;
            return Err(ApiError::BadRequest(format!(
                "service {name:?}: address: {:?} overlaps {addr}, where service {owner:?} listens now; one reload cannot hand a listening address from one service to another: do it in two steps, first without {owner:?} on that address, then with {name:?} on it",
                p.config.address
            )));
        }
    }
    Ok(())
}

/// Checks every backend of a new list against the listeners that stay
/// bound through the reload, by their real ports (port 0 included).
fn check_still_bound(plane: &impl Plane, all: &[Prepared]) -> Result<(), ApiError> {
    let services = plane.services();
    let by_name: HashMap<&str, &Prepared> = all.iter().map(|p| (p.config.name.as_str(), p)).collect();
    for (owner, local) in plane.bound() {
        let Some((key, s)) = owner.and_then(|k| Some((k, services.service(k)?))) else { continue };
        // A service removed, or moving to another address, is leaving this
        // listener; one deleted earlier still serves its queue.
        let stays = services.is_retired(key) || by_name.get(s.settings.name.as_str()).is_some_and(|p| s.listens_as(p));
        if stays {
            loops_to_listener(all, &local, &s.settings.name)?;
        }
    }
    Ok(())
}

/// Refuses a backend of `all` that would reach `listener`, where service `owner` listens.
fn loops_to_listener(all: &[Prepared], listener: &Endpoint, owner: &str) -> Result<(), ApiError> {
    for p in all {
        for (backend, (addr, _)) in p.config.backends.iter().zip(&p.backend_addrs) {
            if addr.loops_to(listener) {
                return Err(looping(&p.config.name, &backend.name, addr, listener, &format!("service {owner:?}")));
            }
        }
    }
    Ok(())
}

/// The message for a backend that would loop to one of our listeners.
fn looping(name: &str, backend: &str, addr: &Endpoint, listener: &Endpoint, owner: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "service {name:?}: backend {backend:?}: address: {addr} reaches {listener}, where {owner} listens; it would loop"
    ))
}

/// "service web updated: balance "RR" → "LC", connect_timeout 5 → 2; backends: unchanged".
fn replace_summary(services: &Services, key: Key, new: &ServiceConfig) -> String {
    let fields = |c: &ServiceConfig| match serde_json::to_value(c) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.remove("backends");
            map
        }
        _ => serde_json::Map::new(),
    };
    let old = services.config(key).map(|c| fields(&c)).unwrap_or_default();
    let changed: Vec<String> = fields(new)
        .into_iter()
        .filter(|(k, v)| old.get(k) != Some(v))
        .map(|(k, v)| format!("{k} {} → {v}", old.get(&k).map_or_else(|| "unset".to_string(), |o| o.to_string())))
        .collect();
    let backends = backends_summary(services, key, new);
    let backends = backends.split_once(" backends updated: ").map_or("", |(_, rest)| rest);
    format!("service {} updated: {}; backends: {backends}", new.name, changed.join(", "))
}

/// "service web backends updated: added b2, removed b0, changed b1".
fn backends_summary(services: &Services, key: Key, new: &ServiceConfig) -> String {
    let old = services.config(key).map(|c| c.backends).unwrap_or_default();
    let mut parts = Vec::new();
    let names = |f: &dyn Fn(&BackendConfig) -> bool, list: &[BackendConfig]| -> Vec<String> {
        list.iter().filter(|b| f(b)).map(|b| b.name.clone()).collect()
    };
    let added = names(&|b| !old.iter().any(|o| o.name == b.name), &new.backends);
    let removed = names(&|b| !new.backends.iter().any(|n| n.name == b.name), &old);
    let changed = names(&|b| old.iter().any(|o| o.name == b.name && o != b), &new.backends);
    for (label, list) in [("added", added), ("removed", removed), ("changed", changed)] {
        if !list.is_empty() {
            parts.push(format!("{label} {}", list.join(", ")));
        }
    }
    if parts.is_empty() {
        parts.push("unchanged".into());
    }
    format!("service {} backends updated: {}", new.name, parts.join("; "))
}

/// Checks a prepared service against everything else that runs: its listen
/// address must not clash with another service's, and no backend, its own or
/// another service's, may reach one of our listeners or the admin API (it
/// would loop). Uses the addresses resolved when those services were applied
/// and the ports actually bound, so nothing is resolved again and port-0
/// listeners count too. `staged` is the new listener's real address, once bound.
fn check_against_running(
    plane: &impl Plane,
    key: Option<Key>,
    prepared: &Prepared,
    staged: Option<Endpoint>,
) -> Result<(), ApiError> {
    let services = plane.services();
    let name = &prepared.config.name;
    let new_backends = || prepared.config.backends.iter().zip(&prepared.backend_addrs);
    let looping = |backend: &str, addr: &Endpoint, listener: &Endpoint, owner: &str| {
        looping(name, backend, addr, listener, owner)
    };
    let own = [Some(prepared.addr.clone()), staged];
    for (backend, (addr, _)) in new_backends() {
        if let Some(listener) = own.iter().flatten().find(|l| addr.loops_to(l)) {
            return Err(looping(&backend.name, addr, listener, &format!("service {name:?}")));
        }
        if let Some(admin) = plane.admin_addr().map(Endpoint::Inet).filter(|a| addr.loops_to(a)) {
            return Err(looping(&backend.name, addr, &admin, "the admin API"));
        }
    }
    for other in services.keys().filter(|&k| Some(k) != key) {
        let Some(s) = services.service(other) else { continue };
        let owner = s.settings.name.as_str();
        if s.addr.overlaps(&prepared.addr) {
            return Err(ApiError::BadRequest(format!(
                "service {name:?}: address: {:?} conflicts with {}, where service {owner:?} listens",
                prepared.config.address, s.addr
            )));
        }
        for b in s.backends.iter().filter_map(|&k| services.backend(k)) {
            if let Some(listener) = own.iter().flatten().find(|l| b.addr.loops_to(l)) {
                return Err(ApiError::BadRequest(format!(
                    "service {name:?}: address: {listener}: service {owner:?} has backend {:?} at {}, which would loop to it",
                    b.config.name, b.addr
                )));
            }
        }
    }
    // Ports actually bound: a listener on port 0 got its real port only then. A
    // service moving to a new address is leaving its current listener.
    let moving = key.and_then(|k| services.service(k)).is_some_and(|s| !s.listens_as(prepared));
    for (owner_key, local) in plane.bound() {
        if owner_key.is_none() || (moving && owner_key == key) {
            continue;
        }
        let owner = owner_key.and_then(|k| services.service(k)).map_or("?", |s| s.settings.name.as_str());
        for (backend, (addr, _)) in new_backends() {
            if addr.loops_to(&local) {
                return Err(looping(&backend.name, addr, &local, &format!("service {owner:?}")));
            }
        }
    }
    Ok(())
}

/// Every running service's config but `name`'s.
fn others(services: &Services, name: &str) -> Vec<ServiceConfig> {
    services.configs().into_iter().filter(|c| c.name != name).collect()
}

fn sorted(mut all: Vec<ServiceConfig>) -> Vec<ServiceConfig> {
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}
