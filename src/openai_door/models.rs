//! `GET /v1/models` and `GET /v1/models/{id}`: the models and rollout
//! aliases the caller's tenant may name (`dispatch::CatalogEntry`), as
//! OpenAI's `model` objects; an alias says its targets in `targets`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use http::{HeaderMap, HeaderValue, Response, header};
use serde_json::{Value, json};

use super::Door;
use super::errors::DoorError;
use super::request;
use crate::dispatch::CatalogEntry;

fn model(e: &CatalogEntry) -> Value {
    let mut v = json!({"id": e.id, "object": "model", "created": 0, "owned_by": "dispatcher"});
    if !e.targets.is_empty() {
        v["targets"] = json!(e.targets);
    }
    v
}

fn ok(v: &Value) -> Response<Body> {
    let mut r = Response::new(Body::from(serde_json::to_vec(v).unwrap_or_default()));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

impl Door {
    fn catalog(&self, headers: &HeaderMap) -> Result<Vec<CatalogEntry>, DoorError> {
        self.engine
            .models_for(&request::caller(headers))
            .map_err(|e| DoorError::from_dispatch(&e, "", true))
    }
}

pub async fn list(State(door): State<Arc<Door>>, headers: HeaderMap) -> Response<Body> {
    let response = match door.catalog(&headers) {
        Ok(entries) => ok(&json!({"object": "list", "data": entries.iter().map(model).collect::<Vec<_>>()})),
        Err(e) => door.error(&e),
    };
    super::observe("models", response.status());
    response
}

pub async fn one(
    State(door): State<Arc<Door>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response<Body> {
    let response = match door.catalog(&headers) {
        Ok(entries) => match entries.iter().find(|e| e.id == id) {
            Some(e) => ok(&model(e)),
            None => door.error(&DoorError::unknown_model(&id)),
        },
        Err(e) => door.error(&e),
    };
    super::observe("models", response.status());
    response
}
