//! `dispatcher_cost_total{tenant,model,region}`: spend in the currency's
//! units. The metrics crate's counters count integers, and a cost is a
//! decimal amount: so the totals are kept here exactly, in micro-units, and
//! rendered as decimals beside the rest of `/metrics` (`metrics.rs`).
//!
//! Owner: `LEDGER`, one `Mutex` held for one addition or one render. A leaf:
//! it depends on nothing of ours.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

/// tenant → model → region → micro-units. Nested so that a request finds
/// its total by the names it holds (`&str`), without building (and
/// dropping) a key of three `Arc`s per request.
type Totals = BTreeMap<Arc<str>, BTreeMap<Arc<str>, BTreeMap<Arc<str>, u64>>>;

#[derive(Default)]
struct Ledger {
    currency: String,
    totals: Totals,
}

static LEDGER: LazyLock<Mutex<Ledger>> = LazyLock::new(Default::default);

/// Adds `micros` to (tenant, model, region)'s total. Nothing is added for
/// nothing: work at no price (a model without one) makes no series.
pub fn add(tenant: &Arc<str>, model: &Arc<str>, region: &Arc<str>, currency: &str, micros: u64) {
    if micros == 0 {
        return;
    }
    let mut ledger = LEDGER.lock();
    if ledger.currency != currency {
        ledger.currency = currency.to_string();
    }
    let models = match ledger.totals.get_mut(&**tenant) {
        Some(models) => models,
        None => ledger.totals.entry(tenant.clone()).or_default(),
    };
    let regions = match models.get_mut(&**model) {
        Some(regions) => regions,
        None => models.entry(model.clone()).or_default(),
    };
    let total = match regions.get_mut(&**region) {
        Some(total) => total,
        None => regions.entry(region.clone()).or_default(),
    };
    *total = total.saturating_add(micros);
}

/// The family in Prometheus' text format (nothing before the first cost).
pub fn render(out: &mut String) {
    let ledger = LEDGER.lock();
    if ledger.totals.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP dispatcher_cost_total Spend by tenant, model and region, in the configured currency ({}), from usage at each model's price",
        ledger.currency
    );
    let _ = writeln!(out, "# TYPE dispatcher_cost_total counter");
    for (tenant, models) in &ledger.totals {
        for (model, regions) in models {
            for (region, micros) in regions {
                let _ = writeln!(
                    out,
                    "dispatcher_cost_total{{model=\"{}\",region=\"{}\",tenant=\"{}\"}} {}",
                    escape(model),
                    escape(region),
                    escape(tenant),
                    crate::core::cost::format_micros(*micros)
                );
            }
        }
    }
}

/// A label value as the text format quotes it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_render_as_exact_decimals() {
        let (t, m, r): (Arc<str>, Arc<str>, Arc<str>) = ("ledger-test".into(), "m".into(), "r".into());
        add(&t, &m, &r, "EUR", 7_500);
        add(&t, &m, &r, "EUR", 1);
        let mut out = String::new();
        render(&mut out);
        assert!(out.contains("# TYPE dispatcher_cost_total counter"), "{out}");
        assert!(
            out.contains("dispatcher_cost_total{model=\"m\",region=\"r\",tenant=\"ledger-test\"} 0.007501"),
            "{out}"
        );
        assert!(out.contains("(EUR)"), "{out}");
    }

    #[test]
    fn nothing_is_added_for_nothing() {
        let (t, m, r): (Arc<str>, Arc<str>, Arc<str>) = ("ledger-free".into(), "m".into(), "r".into());
        add(&t, &m, &r, "EUR", 0);
        let mut out = String::new();
        render(&mut out);
        assert!(!out.contains("ledger-free"), "{out}");
    }
}
