//! Requests to responses: one match over the path, then the method.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use serde::Serialize;

use super::Control;
use super::types::{ActionRequest, BalloonPatch, SwapPatch};

/// A response with a JSON body (or none).
pub(super) fn json(status: StatusCode, body: Option<Vec<u8>>) -> Response<Full<Bytes>> {
    let mut r = Response::builder().status(status);
    if body.is_some() {
        r = r.header("Content-Type", "application/json");
    }
    r.body(Full::new(Bytes::from(body.unwrap_or_default()))).expect("a valid response")
}

/// `{"fault_message": ...}` with `status`, Firecracker's error shape.
pub(super) fn fault(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    #[derive(Serialize)]
    struct Fault {
        fault_message: String,
    }
    json(status, serde_json::to_vec(&Fault { fault_message: message.into() }).ok())
}

fn ok(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(b) => json(StatusCode::OK, Some(b)),
        Err(e) => fault(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn no_content() -> Response<Full<Bytes>> {
    json(StatusCode::NO_CONTENT, None)
}

fn method_not_allowed(allowed: &str) -> Response<Full<Bytes>> {
    let mut r = fault(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed here (allowed: {allowed})"));
    r.headers_mut().insert("Allow", allowed.parse().expect("a valid header"));
    r
}

/// Parses a JSON body into `T`, or says what is wrong with it (for a 400).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    if body.is_empty() {
        return Err("the request needs a JSON body".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

/// Serves one request.
pub(super) fn route(method: &Method, path: &str, body: &[u8], control: &dyn Control) -> Response<Full<Bytes>> {
    match path {
        "/vm" => match *method {
            Method::GET => ok(&control.vm()),
            _ => method_not_allowed("GET"),
        },
        "/stats" => match *method {
            Method::GET => ok(&control.stats()),
            _ => method_not_allowed("GET"),
        },
        "/balloon" => match *method {
            Method::GET => ok(&control.balloon()),
            Method::PATCH => {
                let patch: BalloonPatch = match parse(body) {
                    Ok(p) => p,
                    Err(m) => return fault(StatusCode::BAD_REQUEST, m),
                };
                if patch == BalloonPatch::default() {
                    return fault(
                        StatusCode::BAD_REQUEST,
                        "nothing to change: give amount_mib, deflate_on_oom or stats_polling_interval_s",
                    );
                }
                match control.set_balloon(patch) {
                    Ok(()) => no_content(),
                    Err(m) => fault(StatusCode::BAD_REQUEST, m),
                }
            }
            _ => method_not_allowed("GET, PATCH"),
        },
        "/balloon/statistics" => match *method {
            Method::GET => ok(&control.balloon_statistics()),
            _ => method_not_allowed("GET"),
        },
        "/actions" => match *method {
            Method::PUT => {
                let action: ActionRequest = match parse(body) {
                    Ok(a) => a,
                    Err(m) => return fault(StatusCode::BAD_REQUEST, m),
                };
                match action.action_type.as_str() {
                    "Shutdown" => {
                        control.shutdown();
                        no_content()
                    }
                    other => fault(StatusCode::BAD_REQUEST, format!("unknown action_type `{other}` (known: Shutdown)")),
                }
            }
            _ => method_not_allowed("PUT"),
        },
        "/swap" => match *method {
            Method::GET => ok(&control.swap()),
            Method::PATCH => {
                let patch: SwapPatch = match parse(body) {
                    Ok(p) => p,
                    Err(m) => return fault(StatusCode::BAD_REQUEST, m),
                };
                match control.set_swap(patch) {
                    Ok(()) => no_content(),
                    Err(m) => fault(StatusCode::BAD_REQUEST, m),
                }
            }
            _ => method_not_allowed("GET, PATCH"),
        },
        "/swap/out" | "/swap/in" => match *method {
            Method::PUT => match control.swap_action(path == "/swap/out") {
                Ok(()) => no_content(),
                Err(m) => fault(StatusCode::BAD_REQUEST, m),
            },
            _ => method_not_allowed("PUT"),
        },
        _ => fault(StatusCode::NOT_FOUND, format!("no resource at {path}")),
    }
}
