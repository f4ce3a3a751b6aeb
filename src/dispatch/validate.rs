//! Checks a request before anything is reserved: every field bounded, every
//! problem reported at once with the field's name.

use crate::config::RequestLimits;
use crate::core::{ModelSpec, TokenEstimate};
use crate::pb::DispatchRequest;

use super::error::Violation;
use crate::excerpt::excerpt;

/// Model, tenant and origin_region are names; none is longer.
pub(super) const MAX_NAME_BYTES: usize = 128;
/// Oversized labels reported one by one, at most; the rest are counted in
/// one more violation (thousands of them made 640 KB of trailers).
const MAX_LABEL_VIOLATIONS: usize = 3;

/// Checks what can be checked without the model's settings.
pub fn check_fields(r: &DispatchRequest, limits: &RequestLimits) -> Vec<Violation> {
    let mut v = Vec::new();
    if r.model.is_empty() {
        v.push(Violation::new("model", "required"));
    } else if r.model.len() > MAX_NAME_BYTES {
        v.push(Violation::new(
            "model",
            format!("longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    if r.payload.len() > limits.max_payload_bytes {
        v.push(Violation::new(
            "payload",
            format!(
                "{} bytes is above the limit of {} (limits.max_payload_bytes)",
                r.payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    if r.tenant.len() > MAX_NAME_BYTES {
        v.push(Violation::new(
            "tenant",
            format!("longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    if r.origin_region.len() > MAX_NAME_BYTES {
        v.push(Violation::new(
            "origin_region",
            format!("longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    if r.request_id.len() > limits.max_request_id_bytes {
        v.push(Violation::new(
            "request_id",
            format!(
                "{} bytes is above the limit of {} (limits.max_request_id_bytes)",
                r.request_id.len(),
                limits.max_request_id_bytes
            ),
        ));
    } else if r.request_id.chars().any(|c| c.is_control()) {
        v.push(Violation::new("request_id", "contains control characters"));
    }
    if r.labels.len() > limits.max_labels {
        v.push(Violation::new(
            "labels",
            format!(
                "{} labels is above the limit of {} (limits.max_labels)",
                r.labels.len(),
                limits.max_labels
            ),
        ));
    }
    let mut oversized = 0;
    for (key, value) in &r.labels {
        if key.is_empty() {
            v.push(Violation::new("labels", "a label key is empty"));
        }
        if key.len() > limits.max_label_bytes || value.len() > limits.max_label_bytes {
            oversized += 1;
            if oversized <= MAX_LABEL_VIOLATIONS {
                v.push(Violation::new(
                    "labels",
                    format!(
                        "label {}: key or value above {} bytes (limits.max_label_bytes)",
                        excerpt(key),
                        limits.max_label_bytes
                    ),
                ));
            }
        }
    }
    if oversized > MAX_LABEL_VIOLATIONS {
        v.push(Violation::new(
            "labels",
            format!(
                "and {} more labels with a key or value above {} bytes (limits.max_label_bytes)",
                oversized - MAX_LABEL_VIOLATIONS,
                limits.max_label_bytes
            ),
        ));
    }
    v
}

/// Checks the token counts against the model and estimates the reservation.
pub fn check_tokens(r: &DispatchRequest, model: &ModelSpec) -> Result<TokenEstimate, Vec<Violation>> {
    check_counts(r.payload.len(), r.prompt_tokens, r.max_output_tokens, model)
}

/// `check_tokens` of a payload's size and token counts (0: estimated).
pub fn check_counts(
    payload_len: usize,
    prompt_tokens: u64,
    max_output_tokens: u64,
    model: &ModelSpec,
) -> Result<TokenEstimate, Vec<Violation>> {
    let max = model.max_request_tokens;
    let mut v = Vec::new();
    if prompt_tokens > max {
        v.push(Violation::new(
            "prompt_tokens",
            format!(
                "{prompt_tokens} is above {}'s max_request_tokens ({max})",
                model.name
            ),
        ));
    }
    if max_output_tokens > max {
        v.push(Violation::new(
            "max_output_tokens",
            format!(
                "{max_output_tokens} is above {}'s max_request_tokens ({max})",
                model.name
            ),
        ));
    }
    if !v.is_empty() {
        return Err(v);
    }
    let estimate = model.estimate(payload_len, prompt_tokens, max_output_tokens);
    if estimate.total() > max {
        return Err(vec![Violation::new(
            "max_output_tokens",
            format!(
                "prompt ({}{}) + max_output_tokens ({}) = {} is above {}'s max_request_tokens ({max})",
                estimate.prompt,
                if prompt_tokens == 0 {
                    ", estimated from the payload"
                } else {
                    ""
                },
                estimate.max_output,
                estimate.total(),
                model.name
            ),
        )]);
    }
    Ok(estimate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            default_max_output_tokens: 100,
            chars_per_token: 4.0,
            max_request_tokens: 1000,
        }
    }

    fn request() -> DispatchRequest {
        DispatchRequest {
            model: "m".into(),
            payload: "hello".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_plain_request_passes() {
        assert!(check_fields(&request(), &RequestLimits::default()).is_empty());
        let e = check_tokens(&request(), &model()).unwrap();
        assert_eq!(e.total(), 102);
    }

    #[test]
    fn every_bad_field_is_named() {
        let limits = RequestLimits {
            max_payload_bytes: 4,
            max_labels: 1,
            max_label_bytes: 8,
            max_request_id_bytes: 4,
        };
        let mut r = request();
        r.model.clear();
        r.request_id = "12345".into();
        r.labels.insert("a".into(), "b".into());
        r.labels.insert("".into(), "0123456789".into());
        let fields: Vec<_> = check_fields(&r, &limits).iter().map(|v| v.field).collect();
        assert!(fields.contains(&"model"));
        assert!(fields.contains(&"payload"));
        assert!(fields.contains(&"request_id"));
        assert_eq!(fields.iter().filter(|f| **f == "labels").count(), 3);
    }

    #[test]
    fn thousands_of_long_labels_make_a_few_violations() {
        let mut r = request();
        for i in 0..3000 {
            r.labels.insert(format!("{i}{}", "k".repeat(300)), "v".into());
        }
        let v = check_fields(&r, &RequestLimits::default());
        assert_eq!(v.len(), 1 + MAX_LABEL_VIOLATIONS + 1, "{v:?}");
        assert!(v[0].description.contains("3000 labels"), "{v:?}");
        assert!(v.last().unwrap().description.contains("2997 more"), "{v:?}");
        assert!(v.iter().all(|x| x.description.len() < 200), "{v:?}");
    }

    #[test]
    fn absurd_token_counts_are_refused() {
        let mut r = request();
        r.max_output_tokens = u64::MAX;
        r.prompt_tokens = u64::MAX;
        let v = check_tokens(&r, &model()).unwrap_err();
        assert_eq!(v.len(), 2);
        r.prompt_tokens = 600;
        r.max_output_tokens = 600;
        let v = check_tokens(&r, &model()).unwrap_err();
        assert!(v[0].description.contains("1200"), "{:?}", v);
    }
}
