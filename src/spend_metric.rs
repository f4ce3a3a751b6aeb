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

/// (tenant, model, region).
type Labels = (Arc<str>, Arc<str>, Arc<str>);

#[derive(Default)]
struct Ledger {
    currency: String,
    totals: BTreeMap<Labels, u64>,
}

static LEDGER: LazyLock<Mutex<Ledger>> = LazyLock::new(Default::default);

/// Adds `micros` to (tenant, model, region)'s total.
pub fn add(tenant: &Arc<str>, model: &Arc<str>, region: &Arc<str>, currency: &str, micros: u64) {
    let mut ledger = LEDGER.lock();
    if ledger.currency != currency {
        ledger.currency = currency.to_string();
    }
    let total = ledger
        .totals
        .entry((tenant.clone(), model.clone(), region.clone()))
        .or_default();
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
    for ((tenant, model, region), micros) in &ledger.totals {
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
}
