//! `AppError`: every failure the HTTP edge can answer, turned into a response
//! in one place. Client mistakes are not logged; internal details never leave.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use imhost_client::api::{ErrorBody, ErrorDetail};

use crate::cluster::ClusterError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request body did not arrive within `body_read_timeout`.
    #[error("{0}")]
    RequestTimeout(String),
    /// A terminal connected to a node that does not own its client.
    #[error("{0}")]
    Misdirected(String),
    /// The caller is over a rate limit; retry later.
    #[error("{0}")]
    TooManyRequests(String),
    /// The node or the cluster store cannot serve now; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The node's delivery backlog is full; it took nothing: retry later
    /// (503 with `Retry-After`).
    #[error("{0}")]
    Overloaded(String),
}

impl AppError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            AppError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AppError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AppError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            AppError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            AppError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            AppError::Misdirected(_) => (StatusCode::MISDIRECTED_REQUEST, "misdirected"),
            AppError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
            AppError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            AppError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
        }
    }
}

impl AppError {
    /// The error response with `Retry-After: seconds`.
    pub fn with_retry_after(self, seconds: u32) -> Response {
        let mut response = self.into_response();
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(seconds),
        );
        response
    }
}

/// Seconds an overloaded node asks callers to wait: its backlog is written
/// in well under that.
pub const OVERLOADED_RETRY_AFTER: u32 = 1;

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if matches!(self, AppError::Overloaded(_)) {
            let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(self.body())).into_response();
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(OVERLOADED_RETRY_AFTER),
            );
            return response;
        }
        let (status, _) = self.status_and_code();
        (status, Json(self.body())).into_response()
    }
}

impl AppError {
    /// The JSON error body of SPEC section 3.
    pub fn body(&self) -> ErrorBody {
        let (_, code) = self.status_and_code();
        ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: self.to_string(),
            },
        }
    }
}

impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError::PayloadTooLarge("request body too large".into())
        } else {
            // axum's text says what is wrong ("missing field `receivers` at line 1…")
            // and echoes nothing internal.
            AppError::BadRequest(rejection.body_text())
        }
    }
}

/// Whether reading a body failed on its size limit.
pub fn is_length_limit(err: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = cause {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = err.source();
    }
    false
}

impl From<crate::business::BusinessError> for AppError {
    fn from(err: crate::business::BusinessError) -> Self {
        match err {
            crate::business::BusinessError::Invalid(why) => AppError::BadRequest(why),
            crate::business::BusinessError::Cluster(err) => err.into(),
        }
    }
}

impl From<crate::ws::Refusal> for AppError {
    fn from(refusal: crate::ws::Refusal) -> Self {
        use crate::ws::Refusal;
        match refusal {
            Refusal::BadRequest(why) => AppError::BadRequest(why),
            Refusal::Unauthorized(why) => AppError::Unauthorized(why),
            Refusal::Misdirected(why) => AppError::Misdirected(why),
            Refusal::RateLimited(why) => AppError::TooManyRequests(why),
            Refusal::Unavailable { reason, .. } => AppError::Unavailable(reason),
            Refusal::Cluster(err) => err.into(),
        }
    }
}

/// A refused terminal's answer: [`AppError`]'s, with `Retry-After: 1` where
/// trying again shortly will work.
impl IntoResponse for crate::ws::Refusal {
    fn into_response(self) -> Response {
        let retry_soon = matches!(
            self,
            crate::ws::Refusal::RateLimited(_)
                | crate::ws::Refusal::Unavailable {
                    retry_soon: true,
                    ..
                }
        );
        let error = AppError::from(self);
        if retry_soon {
            error.with_retry_after(1)
        } else {
            error.into_response()
        }
    }
}

impl From<PathRejection> for AppError {
    fn from(rejection: PathRejection) -> Self {
        AppError::BadRequest(rejection.body_text())
    }
}

impl From<QueryRejection> for AppError {
    fn from(rejection: QueryRejection) -> Self {
        AppError::BadRequest(rejection.body_text())
    }
}

impl From<ClusterError> for AppError {
    fn from(err: ClusterError) -> Self {
        if !matches!(err, ClusterError::Overloaded) {
            tracing::warn!(cause = %err, "cluster error");
        }
        match err {
            ClusterError::Unavailable(_) => {
                AppError::Unavailable("cluster store unavailable, retry later".into())
            }
            ClusterError::Unheard(_) => AppError::Unavailable(format!("{err}; retry later")),
            ClusterError::Overloaded => AppError::Overloaded(err.to_string()),
        }
    }
}
