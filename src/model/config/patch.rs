//! Partial updates (reference §5.1, `PATCH`): the body's fields laid over the
//! running config's, then read by the normal parser, so every field's rules
//! and defaults stay in one place. The merge is one level deep, as in RFC
//! 7396: a field in the body replaces the running one whole (`backends`
//! replaces the list), and `null` puts a field back to its default.

use serde::Serialize;
use serde_json::{Map, Value};

use super::{build_backend, build_service, json_error, validate_backend, BackendConfig, ConfigError, Object};
use super::{RawBackend, RawService, ServiceConfig};

/// Parses an admin `PATCH /{service}` body over `running`: the fields it
/// names change, every other keeps its value; `name`, if given, must match.
pub fn patch_service(body: &[u8], running: &ServiceConfig) -> Result<ServiceConfig, ConfigError> {
    // Shape and field names first, from the body itself: errors keep its line and column.
    let _: Object<RawService> = serde_json::from_slice(body).map_err(json_error)?;
    let raw: Object<RawService> = serde_json::from_value(merge(running, body)?).map_err(json_error)?;
    build_service(raw.0, 0, Some(&running.name))
}

/// Parses an admin `PATCH /{service}/{backend}` body over `running`, a backend of `service`.
pub fn patch_backend(body: &[u8], service: &str, running: &BackendConfig) -> Result<BackendConfig, ConfigError> {
    let _: Object<RawBackend> = serde_json::from_slice(body).map_err(json_error)?;
    let raw: Object<RawBackend> = serde_json::from_value(merge(running, body)?).map_err(json_error)?;
    let backend = build_backend(raw.0, service, 0, Some(&running.name))?;
    validate_backend(service, &backend)?;
    Ok(backend)
}

/// `running` as a JSON object with the body's fields laid over it.
fn merge(running: &impl Serialize, body: &[u8]) -> Result<Value, ConfigError> {
    let mut merged = match serde_json::to_value(running).map_err(json_error)? {
        Value::Object(map) => map,
        // Configs serialize as objects: a bug, but no reason to panic.
        _ => Map::new(),
    };
    if let Value::Object(changes) = serde_json::from_slice(body).map_err(json_error)? {
        merged.extend(changes);
    }
    Ok(Value::Object(merged))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Balance;

    fn running() -> ServiceConfig {
        let mut s = ServiceConfig::new("web", "127.0.0.1:8080");
        s.check_send = "PING\r\n".into();
        s.backends.push(BackendConfig::new("b1", "127.0.0.1:9001"));
        s.backends.push(BackendConfig::new("b2", "127.0.0.1:9002"));
        s
    }

    fn patch(body: &str) -> Result<ServiceConfig, String> {
        patch_service(body.as_bytes(), &running()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_patch_changes_the_fields_it_names_and_keeps_the_rest() {
        let patched = patch(r#"{"balance": "LC", "fall": 5, "connect_timeout": 0.5}"#).unwrap();
        let expected = ServiceConfig { balance: Balance::LeastConn, fall: 5, connect_timeout: 0.5, ..running() };
        assert_eq!(patched, expected);
        assert_eq!(patch("{}").unwrap(), running(), "an empty patch changes nothing");
        assert_eq!(patch(r#"{"name": "web"}"#).unwrap(), running(), "the URL's own name is fine");
    }

    #[test]
    fn backends_in_a_patch_replace_the_list_and_null_means_the_default() {
        let patched = patch(r#"{"backends": [{"name": "b3", "address": "127.0.0.1:9003"}]}"#).unwrap();
        assert_eq!(patched.backends, [BackendConfig::new("b3", "127.0.0.1:9003")]);
        let reset = patch(r#"{"check_send": null, "fall": null, "backends": null}"#).unwrap();
        assert_eq!((reset.check_send.as_str(), reset.fall, reset.backends.len()), ("", 2, 0));
        assert!(patch(r#"{"address": null}"#).unwrap_err().contains("address: is required"));
    }

    #[test]
    fn a_bad_patch_is_refused_naming_the_field() {
        let unknown = patch(r#"{"fal": 3}"#).unwrap_err();
        assert!(unknown.starts_with(r#"line 1, column 6: unknown field "fal""#), "{unknown}");
        let name = patch(r#"{"name": "api"}"#).unwrap_err();
        assert_eq!(name, r#"service "web": name: "api" in the body differs from "web" in the URL"#);
        let fall = patch(r#"{"fall": 0}"#).unwrap_err();
        assert_eq!(fall, r#"service "web": fall: must be an integer ≥ 1, got 0"#);
        assert!(patch(r#"{"balance": "random"}"#).unwrap_err().contains("balance: must be"));
        for not_an_object in ["[]", "3", r#""x""#, "null", ""] {
            assert!(patch(not_an_object).unwrap_err().starts_with("line 1, column "), "{not_an_object:?}");
        }
        let backend = patch(r#"{"backends": [{"name": "b3"}]}"#).unwrap_err();
        assert!(backend.contains(r#"backend "b3": address: is required"#), "{backend}");
    }

    #[test]
    fn a_backend_patch_merges_over_the_running_backend() {
        let mut b = BackendConfig::new("b1", "127.0.0.1:9001");
        b.check_address = "127.0.0.1:9101".into();
        let patched = patch_backend(br#"{"weight": 0}"#, "web", &b).unwrap();
        assert_eq!(patched, BackendConfig { weight: 0, ..b.clone() });
        let moved = patch_backend(br#"{"address": "127.0.0.1:9009", "check_address": ""}"#, "web", &b).unwrap();
        assert_eq!((moved.address.as_str(), moved.check_address.as_str(), moved.weight), ("127.0.0.1:9009", "", 1));
        let err = |body: &str| patch_backend(body.as_bytes(), "web", &b).unwrap_err().to_string();
        assert!(err(r#"{"weigth": 2}"#).contains(r#"unknown field "weigth""#));
        assert!(err(r#"{"name": "b2"}"#).contains("differs from"));
        assert!(err(r#"{"address": "nowhere"}"#).contains("address:"));
        assert!(err(r#"{"weight": -1}"#).contains("weight: must be an integer ≥ 0"));
        assert_eq!(err("[1]"), "line 1, column 0: invalid type: sequence, expected a JSON object");
    }
}
