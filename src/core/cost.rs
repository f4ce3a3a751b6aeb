//! What a request costs: prices per model, optionally per region-model
//! (providers price regions differently), in integer micro-units of one
//! configured currency, and the cost of a usage at a price. Money is never a
//! float here: a price is micro-units per million tokens, a cost is rounded
//! once, to the micro-unit, per request (half up), so adding costs never
//! drifts. A model without a price costs nothing, and `Prices::of` says so
//! (`None`), for Admin to show.

use std::collections::HashMap;
use std::sync::Arc;

/// Micro-units in one unit of the currency.
pub const MICROS_PER_UNIT: u64 = 1_000_000;
/// Tokens a price is quoted for.
const TOKENS_PER_PRICE: u128 = 1_000_000;

/// A price in micro-units of the currency per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    pub input: u64,
    pub output: u64,
    /// Prompt tokens the provider served from its prompt cache.
    pub cached_input: u64,
}

/// Tokens as the provider counted them; `cached_prompt` is part of `prompt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub cached_prompt: u64,
}

impl Price {
    /// The cost of `u` at this price, in micro-units, rounded half up.
    pub fn cost(&self, u: Usage) -> u64 {
        let cached = u.cached_prompt.min(u.prompt);
        let part = |tokens: u64, price: u64| u128::from(tokens) * u128::from(price);
        let scaled = part(u.prompt - cached, self.input)
            .saturating_add(part(cached, self.cached_input))
            .saturating_add(part(u.completion, self.output));
        let micros = scaled.saturating_add(TOKENS_PER_PRICE / 2) / TOKENS_PER_PRICE;
        u64::try_from(micros).unwrap_or(u64::MAX)
    }

    /// The most a request of `prompt` tokens and up to `max_output` can
    /// cost: no cached prompt, every output token used.
    pub fn worst_case(&self, prompt: u64, max_output: u64) -> u64 {
        self.cost(Usage {
            prompt,
            completion: max_output,
            cached_prompt: 0,
        })
    }

    /// Each part the larger of the two.
    fn max(self, other: Price) -> Price {
        Price {
            input: self.input.max(other.input),
            output: self.output.max(other.output),
            cached_input: self.cached_input.max(other.cached_input),
        }
    }
}

/// Every configured price: per model, and per (region, model) where a region
/// file overrides it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Prices {
    currency: Arc<str>,
    models: HashMap<Arc<str>, Price>,
    /// Region, then model: looked up by `&str` with no key built (a
    /// tuple of `Arc<str>` keys cost two allocations a lookup).
    region_models: HashMap<Arc<str>, HashMap<Arc<str>, Price>>,
    /// Per model, the highest of its prices anywhere: admission's worst case
    /// (the region is not chosen yet).
    highest: HashMap<Arc<str>, Price>,
}

impl Prices {
    /// `models`: (model, price) from dispatcher.toml; `region_models`:
    /// (region, model, price) from the region files.
    pub fn new(
        currency: &str,
        models: impl IntoIterator<Item = (String, Price)>,
        region_models: impl IntoIterator<Item = (String, String, Price)>,
    ) -> Self {
        let models: HashMap<Arc<str>, Price> = models.into_iter().map(|(m, p)| (Arc::from(m), p)).collect();
        let mut by_region: HashMap<Arc<str>, HashMap<Arc<str>, Price>> = HashMap::new();
        for (r, m, p) in region_models {
            by_region.entry(Arc::from(r)).or_default().insert(Arc::from(m), p);
        }
        let region_models = by_region;
        let mut highest = models.clone();
        for (model, price) in region_models.values().flatten() {
            highest
                .entry(model.clone())
                .and_modify(|p| *p = p.max(*price))
                .or_insert(*price);
        }
        Self {
            currency: Arc::from(currency),
            models,
            region_models,
            highest,
        }
    }

    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// The price of `model` in `region`: the region's own, else the model's;
    /// `None`: not priced (it costs nothing).
    pub fn of(&self, region: &str, model: &str) -> Option<Price> {
        self.region_price(region, model)
            .or_else(|| self.models.get(model).copied())
    }

    /// `region`'s own price of `model`, if its file gives one.
    pub fn region_price(&self, region: &str, model: &str) -> Option<Price> {
        self.region_models.get(region)?.get(model).copied()
    }

    /// The cost of `usage` of `model` served in `region` (0 when unpriced).
    pub fn cost(&self, region: &str, model: &str, usage: Usage) -> u64 {
        self.of(region, model).map_or(0, |p| p.cost(usage))
    }

    /// The most a request for `model` can cost wherever it is served.
    pub fn worst_case(&self, model: &str, prompt: u64, max_output: u64) -> u64 {
        self.highest
            .get(model)
            .map_or(0, |p| p.worst_case(prompt, max_output))
    }

    /// Every price of `model` (its own, then each region's by region) as
    /// text, so a digest of it changes when a reload changes any of them
    /// (the response cache's keys carry it).
    pub fn describe(&self, model: &str) -> String {
        let mut regions: Vec<String> = self
            .region_models
            .iter()
            .filter_map(|(r, prices)| prices.get(model).map(|p| format!("{r}={p:?}")))
            .collect();
        regions.sort();
        format!("{:?};{}", self.models.get(model), regions.join(","))
    }

    /// Whether any price is configured (budgets in money mean nothing
    /// without one).
    pub fn is_empty(&self) -> bool {
        self.highest.is_empty()
    }
}

/// `micros` as a decimal amount of the currency: 1234567 → "1.234567".
/// Every priced reply carries one: written into one allocation of the
/// right size, without `format!` (`digits.rs`).
pub fn format_micros(micros: u64) -> String {
    let mut units = [0; 20];
    let units = super::digits::decimal(&mut units, micros / MICROS_PER_UNIT);
    let mut fraction = [0; 20];
    // The fraction's six digits, zeros first: 1,000,000 + f has seven.
    let fraction = super::digits::decimal(&mut fraction, MICROS_PER_UNIT + micros % MICROS_PER_UNIT);
    let mut out = String::with_capacity(units.len() + 7);
    out.push_str(units);
    out.push('.');
    out.push_str(&fraction[1..]);
    out
}

/// A configured amount (a price, a budget) in micro-units: finite, not
/// negative, at most `max` units, and exact to the micro-unit (more digits
/// are refused rather than silently rounded).
pub fn micros_from_amount(amount: f64, max: f64) -> Result<u64, String> {
    if !amount.is_finite() || amount < 0.0 {
        return Err(format!(
            "{amount} is not an amount; expected a number from 0 to {max}"
        ));
    }
    if amount > max {
        return Err(format!("{amount} is above the supported maximum of {max}"));
    }
    let scaled = amount * MICROS_PER_UNIT as f64;
    let micros = scaled.round();
    // Tolerates the binary representation of a decimal (0.15 × 10⁶ is
    // 150000.00000000003), refuses a seventh decimal: a seventh decimal is a
    // tenth of a micro-unit or more, far above that error (amounts up to the
    // maximum are exact to 10⁻⁴ micro-units).
    if (scaled - micros).abs() > 0.01 {
        return Err(format!(
            "{amount} has more than six decimals (the smallest unit is 0.000001)"
        ));
    }
    Ok(micros as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(input: u64, output: u64, cached_input: u64) -> Price {
        Price {
            input,
            output,
            cached_input,
        }
    }

    /// Cost to the micro-unit for a table of models, prices and usages.
    #[test]
    fn cost_to_the_micro_unit_for_a_table_of_prices() {
        // (price per million in micro-units, usage, expected micro-units)
        let table: &[(Price, Usage, u64)] = &[
            // gpt-4o at 2.50 / 10.00 / 1.25 per million.
            (
                p(2_500_000, 10_000_000, 1_250_000),
                Usage {
                    prompt: 1_000,
                    completion: 500,
                    cached_prompt: 0,
                },
                7_500, // 1000 × 2.5 + 500 × 10 = 7500 micro-units
            ),
            (
                p(2_500_000, 10_000_000, 1_250_000),
                Usage {
                    prompt: 1_000,
                    completion: 500,
                    cached_prompt: 400,
                },
                7_000, // 600 × 2.5 + 400 × 1.25 + 500 × 10
            ),
            // A small model at 0.15 / 0.60: 0.15 × 7 = 1.05 → 1.
            (
                p(150_000, 600_000, 75_000),
                Usage {
                    prompt: 7,
                    completion: 0,
                    cached_prompt: 0,
                },
                1,
            ),
            // 0.15 × 3 + 0.6 × 1 = 1.05 → 1; 0.15 × 10 = 1.5 → 2 (half up).
            (
                p(150_000, 600_000, 75_000),
                Usage {
                    prompt: 3,
                    completion: 1,
                    cached_prompt: 0,
                },
                1,
            ),
            (
                p(150_000, 600_000, 75_000),
                Usage {
                    prompt: 10,
                    completion: 0,
                    cached_prompt: 0,
                },
                2,
            ),
            // A large model at 15 / 75 per million, a large request.
            (
                p(15_000_000, 75_000_000, 1_500_000),
                Usage {
                    prompt: 200_000,
                    completion: 8_000,
                    cached_prompt: 0,
                },
                3_600_000, // 3.00 + 0.60
            ),
            // More cached than prompt (a confused report): all of the prompt cached.
            (
                p(1_000_000, 0, 500_000),
                Usage {
                    prompt: 10,
                    completion: 0,
                    cached_prompt: 99,
                },
                5,
            ),
            // Unpriced parts cost nothing; nothing used costs nothing.
            (
                p(0, 0, 0),
                Usage {
                    prompt: 1_000_000,
                    completion: 1_000_000,
                    cached_prompt: 0,
                },
                0,
            ),
            (p(2_500_000, 10_000_000, 0), Usage::default(), 0),
        ];
        for (i, (price, usage, want)) in table.iter().enumerate() {
            assert_eq!(price.cost(*usage), *want, "row {i}: {price:?} {usage:?}");
        }
        // No overflow at the extremes.
        assert_eq!(
            p(u64::MAX, u64::MAX, 0).cost(Usage {
                prompt: u64::MAX,
                completion: u64::MAX,
                cached_prompt: 0
            }),
            u64::MAX
        );
    }

    #[test]
    fn a_region_price_overrides_the_model_and_sets_the_worst_case() {
        let prices = Prices::new(
            "EUR",
            [("big".to_string(), p(10_000_000, 30_000_000, 0))],
            [("ap".to_string(), "big".to_string(), p(12_000_000, 36_000_000, 0))],
        );
        assert_eq!(prices.currency(), "EUR");
        assert_eq!(prices.of("us", "big"), Some(p(10_000_000, 30_000_000, 0)));
        assert_eq!(prices.of("ap", "big"), Some(p(12_000_000, 36_000_000, 0)));
        assert_eq!(prices.of("us", "free"), None, "unpriced");
        let u = Usage {
            prompt: 1000,
            completion: 1000,
            cached_prompt: 0,
        };
        assert_eq!(prices.cost("us", "big", u), 40_000);
        assert_eq!(prices.cost("ap", "big", u), 48_000);
        assert_eq!(prices.cost("us", "free", u), 0);
        assert_eq!(prices.worst_case("big", 1000, 1000), 48_000, "the dearest region");
        assert_eq!(prices.worst_case("free", 1000, 1000), 0);
    }

    #[test]
    fn amounts_parse_exactly_or_are_refused() {
        assert_eq!(micros_from_amount(2.5, 1e6), Ok(2_500_000));
        assert_eq!(micros_from_amount(0.15, 1e6), Ok(150_000));
        assert_eq!(micros_from_amount(0.000001, 1e6), Ok(1));
        assert_eq!(micros_from_amount(0.0, 1e6), Ok(0));
        assert_eq!(micros_from_amount(1234.567891, 1e6), Ok(1_234_567_891));
        assert!(
            micros_from_amount(0.0000001, 1e6)
                .unwrap_err()
                .contains("six decimals")
        );
        assert!(micros_from_amount(-1.0, 1e6).is_err());
        assert!(micros_from_amount(f64::NAN, 1e6).is_err());
        assert!(micros_from_amount(2e6, 1e6).unwrap_err().contains("maximum"));
        assert_eq!(format_micros(1_234_567), "1.234567");
        assert_eq!(format_micros(7), "0.000007");
        assert_eq!(format_micros(0), "0.000000");
        assert_eq!(format_micros(1_000_000), "1.000000");
        assert_eq!(format_micros(u64::MAX), "18446744073709.551615");
        for m in [1, 9, 10, 999_999, 1_000_001, 12_345_678_901] {
            assert_eq!(
                format_micros(m),
                format!("{}.{:06}", m / 1_000_000, m % 1_000_000)
            );
        }
    }
}
