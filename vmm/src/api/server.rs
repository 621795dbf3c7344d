//! The socket and the server thread.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

use crate::sync::ThreadInit;

use super::routes::{fault, route};
use super::{ApiError, BODY_TIMEOUT, CONNECTION_TIMEOUT, Control, HEADER_TIMEOUT, MAX_BODY, MAX_CONNECTIONS};

/// The listening API. Dropping it removes the socket file (if it is still ours).
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket we created.
    ident: (u64, u64),
}

impl ApiServer {
    /// Listens on `path` (mode 0600) and serves `control` from a thread that runs `init`
    /// first. A live socket at `path` is an error; a stale one (nobody listening) is replaced;
    /// anything else there is left alone and is an error.
    pub fn start(path: &Path, control: Arc<dyn Control>, init: ThreadInit) -> Result<ApiServer, ApiError> {
        let listener = bind(path)?;
        let bind_err = |source| ApiError::Bind { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(bind_err)?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::UnixListener::from_std(listener).map_err(bind_err)?
        };
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if let Err(e) = init() {
                    log::error!("the control API is unavailable: {e}");
                    return;
                }
                rt.block_on(serve(listener, control));
            })
            .map_err(ApiError::Thread)?;
        Ok(ApiServer { path: path.to_path_buf(), ident: (meta.dev(), meta.ino()) })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.ident) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `path` with mode 0600, replacing a stale socket.
fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_path_buf()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(ApiError::InUse(path.to_path_buf())),
            // Nobody listens: a socket left behind by a VMM that was killed.
            Err(_) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    // Bound under a temporary name and renamed into place once listening: a client that sees
    // the path never finds a socket that refuses it (bind and listen are two calls). A path
    // too long for the temporary name is bound directly.
    let tmp = path.with_file_name(format!(".vmm-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    if let Ok(listener) = bind_0600(&tmp) {
        if std::fs::rename(&tmp, path).is_ok() {
            return Ok(listener);
        }
        let _ = std::fs::remove_file(&tmp);
    }
    bind_0600(path).map_err(|source| ApiError::Bind { path: path.to_path_buf(), source })
}

/// Binds a Unix socket at `path`, created with mode 0600.
fn bind_0600(path: &Path) -> std::io::Result<UnixListener> {
    // SAFETY: umask only changes this process's file-creation mask; the socket file is
    // created 0600 by bind below, and the old mask is restored right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
}

/// Accepts connections, at most [`MAX_CONNECTIONS`] at a time.
async fn serve(listener: tokio::net::UnixListener, control: Arc<dyn Control>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("control API: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let control = Arc::clone(&control);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, Arc::clone(&control)));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_BODY.max(8192))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(permit);
        });
    }
}

/// Reads a request's body (bounded in size and time), then routes it.
async fn handle(req: Request<Incoming>, control: Arc<dyn Control>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Ok(fault(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is larger than {MAX_BODY} bytes")));
        }
        Ok(Err(e)) => return Ok(fault(StatusCode::BAD_REQUEST, format!("cannot read the body: {e}"))),
        Err(_) => return Ok(fault(StatusCode::REQUEST_TIMEOUT, "the body did not arrive in time")),
    };
    Ok(route(&parts.method, parts.uri.path(), &body, &*control))
}
