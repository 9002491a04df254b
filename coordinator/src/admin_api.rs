//! The coordinator's operations API, merged into its HTTP router: the event log
//! (`/v1/events`, see [`crate::events_api`]) and the routing switch the supervisor uses
//! when a worker's readiness probe fails or it drains —
//! `POST /v1/workers/{id}/routing {"enabled": false}` takes the worker out of both legs'
//! routing (its streams in flight go on) until `{"enabled": true}`; the answer says
//! whether the worker is registered. The switch outlives the registration, so a worker
//! that registers again (restarted) stays out until it is enabled.

use crate::App;
use crate::error::ApiError;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use xpyd_runtime::events::{Event, Severity};

/// Longest worker id the switch accepts.
const MAX_ID: usize = 128;

/// The routes, merged into the coordinator's HTTP router.
pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/workers/{id}/routing", post(routing))
        .merge(crate::events_api::routes())
        .merge(crate::advisor::api::routes())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingBody {
    enabled: bool,
}

fn parse_routing(id: &str, body: &[u8]) -> Result<bool, ApiError> {
    let ok_id = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok_id {
        return Err(ApiError::invalid(
            "id",
            format!("`{id}` is not a worker id"),
        ));
    }
    let b: RoutingBody = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            "enabled",
            format!("the body must be {{\"enabled\": true|false}}: {e}"),
        )
    })?;
    Ok(b.enabled)
}

async fn routing(State(app): State<Arc<App>>, Path(id): Path<String>, body: Bytes) -> Response {
    let enabled = match parse_routing(&id, &body) {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    let Some((registered, changed)) = app.cluster.set_routable(&id, enabled) else {
        return ApiError::invalid(
            "id",
            format!(
                "{} workers are out of routing already; put one back before taking `{id}` out",
                crate::cluster::MAX_UNROUTABLE
            ),
        )
        .into_response();
    };
    if changed {
        let what = if enabled {
            "back in routing"
        } else {
            "out of routing"
        };
        app.events.record(Event::new(
            Severity::Normal,
            id.clone(),
            "RoutingChanged",
            format!("{id} {what} (admin)"),
        ));
    }
    axum::Json(json!({"worker_id": id, "routable": enabled, "registered": registered}))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routing_switch_checks_its_input() {
        assert!(!parse_routing("decode-1", br#"{"enabled": false}"#).unwrap());
        assert!(parse_routing("decode-1", br#"{"enabled": true}"#).unwrap());
        for body in [
            &b"{}"[..],
            b"{\"enabled\": 1}",
            b"{\"enabled\": true, \"x\": 1}",
            b"nope",
        ] {
            let e = parse_routing("decode-1", body).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some("enabled")));
        }
        let e = parse_routing("a b", br#"{"enabled": true}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("id"));
    }
}
