//! Admin's `PurgeCache`: the response cache emptied for every tenant, one
//! tenant, or one tenant's scope, here and in the shared layer.

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::dispatch::Engine;
use crate::pb;

/// Longest tenant name or scope accepted (longer ones cannot be stored).
const MAX_FIELD_BYTES: usize = 4096;

fn bad(field: &str, problem: &str) -> Status {
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("{field}: {problem}"),
        ErrorDetails::with_bad_request_violation(field, problem),
    )
}

pub async fn purge_cache(engine: &Engine, r: pb::PurgeCacheRequest) -> Result<pb::PurgeCacheReply, Status> {
    if r.tenant.len() > MAX_FIELD_BYTES {
        return Err(bad("tenant", "longer than 4096 bytes"));
    }
    if r.scope.len() > MAX_FIELD_BYTES {
        return Err(bad("scope", "longer than 4096 bytes"));
    }
    let by_scope = r.by_scope || !r.scope.is_empty();
    let (tenant, scope) = match (r.tenant.is_empty(), r.all) {
        (true, false) => {
            return Err(bad(
                "tenant",
                "name a tenant, or set all to purge every tenant's entries",
            ));
        }
        (true, true) if by_scope => return Err(bad("scope", "a scope is purged within one tenant; name it")),
        (true, true) => (None, None),
        (false, true) => return Err(bad("all", "set either all or a tenant, not both")),
        (false, false) => (Some(r.tenant.as_str()), by_scope.then_some(r.scope.as_str())),
    };
    let (entries, bytes, shared) = engine.cache().purge(tenant, scope).await;
    tracing::info!(
        tenant = tenant.unwrap_or("(all)"),
        scoped = scope.is_some(),
        entries,
        bytes,
        shared = ?shared,
        "response cache purged by an operator"
    );
    Ok(pb::PurgeCacheReply {
        entries,
        bytes,
        shared_entries: match shared {
            None => 0,
            Some(Ok(n)) => n as i64,
            Some(Err(_)) => -1,
        },
    })
}
