//! What the dispatcher knows about a model independent of region: how to
//! estimate a request's size and how large a request may be.

/// A model's per-request settings (`[[models]]` in dispatcher.toml).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// Used when a request says `max_output_tokens = 0`.
    pub default_max_output_tokens: u64,
    /// Payload characters (bytes) per prompt token, for requests that say
    /// `prompt_tokens = 0`.
    pub chars_per_token: f64,
    /// Largest prompt + output a single request may ask for.
    pub max_request_tokens: u64,
}

/// The tokens a request reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEstimate {
    pub prompt: u64,
    pub max_output: u64,
}

impl TokenEstimate {
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.max_output)
    }
}

impl ModelSpec {
    /// The prompt as the caller gave it, or estimated from the payload size
    /// (rounded up, at least one token); the output bound as given or the
    /// model's default.
    pub fn estimate(&self, payload_len: usize, prompt_tokens: u64, max_output_tokens: u64) -> TokenEstimate {
        let prompt = if prompt_tokens > 0 {
            prompt_tokens
        } else {
            ((payload_len as f64 / self.chars_per_token).ceil() as u64).max(1)
        };
        let max_output = if max_output_tokens > 0 {
            max_output_tokens
        } else {
            self.default_max_output_tokens
        };
        TokenEstimate { prompt, max_output }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            default_max_output_tokens: 256,
            chars_per_token: 4.0,
            max_request_tokens: 10_000,
        }
    }

    #[test]
    fn estimates_prompt_from_payload_and_defaults_output() {
        let e = spec().estimate(10, 0, 0);
        assert_eq!(
            e,
            TokenEstimate {
                prompt: 3,
                max_output: 256
            }
        );
        assert_eq!(e.total(), 259);
        assert_eq!(
            spec().estimate(0, 0, 5).prompt,
            1,
            "an empty payload still costs a token"
        );
    }

    #[test]
    fn given_counts_win() {
        assert_eq!(
            spec().estimate(1_000_000, 42, 7),
            TokenEstimate {
                prompt: 42,
                max_output: 7
            }
        );
    }
}
