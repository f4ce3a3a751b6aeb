//! Which regions can take a request and what a strategy sees of each: the
//! fast scan behind every decision, and the full evaluation (with every
//! exclusion and factor) behind `Route` and "no region" errors.

use std::sync::Arc;
use std::time::Instant;

use super::region::{Exclusion, RegionState};
use super::strategy::{CandidateView, Score, Scored, Strategy};

/// A request as routing sees it.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub model: &'a str,
    /// Tokens to reserve: prompt + max output.
    pub tokens: u64,
    /// The caller's region, if it said.
    pub origin: Option<&'a str>,
}

/// Every region's verdict for one request, with factors: the slow path
/// behind `Route` and behind the error when nothing is eligible.
pub(super) struct Evaluation<'a> {
    pub scored: Vec<(CandidateView<'a>, Score)>,
    pub excluded: Vec<(usize, Exclusion)>,
    pub serving: usize,
    pub largest: u64,
}

/// The position of `req`'s origin among `regions` (name order), looked up
/// once per decision rather than compared by name for every region.
pub(super) fn origin_index(regions: &[RegionState], req: &RouteRequest<'_>) -> Option<usize> {
    let origin = req.origin?;
    regions.binary_search_by(|r| (*r.name).cmp(origin)).ok()
}

/// What a strategy sees of `region` for `req`, given its headroom.
/// `origin` is `origin_index(regions, req)`.
#[inline]
pub(super) fn view<'a>(
    regions: &'a [RegionState],
    index: usize,
    headroom: f64,
    req: &RouteRequest<'_>,
    origin: Option<usize>,
    now: Instant,
) -> CandidateView<'a> {
    let region = &regions[index];
    let load = region.load();
    let reported = load.reported(now);
    let (latency_per_1k_ms, error_rate) = load.averages(now);
    CandidateView {
        name: region.name(),
        index,
        regions: regions.len(),
        weight: region.weight(),
        headroom,
        utilization: load.utilization_with(reported),
        in_flight: load.in_flight(),
        capacity: load.capacity(),
        queued: reported.map_or(0, |r| r.queued),
        latency_per_1k_ms,
        error_rate,
        is_origin: origin == Some(index),
        request_tokens: req.tokens,
    }
}

/// Scores every region that can take `req` now into `scored`: the decision
/// path. `origin` is `origin_index(regions, req)`. A region whose bound
/// (`Strategy::bound`, from its weight and headroom alone) is already below
/// what the strategy could pick (`Strategy::floor` of the best so far) is
/// left out without working out the rest of its view (nor its quota, when
/// even a full bucket would not lift it to the floor): the best only rises,
/// so it could not have been picked. A region whose circuit is not closed is
/// always scored (a half-open trial is sent whatever its score). Returns
/// whether any eligible region's circuit is not closed (only then can a
/// half-open trial be due: see `trial`).
#[allow(clippy::too_many_arguments)]
pub(super) fn scan<S: Strategy>(
    regions: &[RegionState],
    strategy: &S,
    model: usize,
    req: &RouteRequest<'_>,
    origin: Option<usize>,
    tried: &[Arc<str>],
    now: Instant,
    scored: &mut Vec<Scored>,
) -> bool {
    let mut unclosed = false;
    let mut floor = f64::NEG_INFINITY;
    for (index, region) in regions.iter().enumerate() {
        if !tried.is_empty() && tried.iter().any(|t| **t == *region.name) {
            continue;
        }
        let closed = region.breaker.is_closed();
        let is_origin = origin == Some(index);
        // Headroom is at most 1: a region that could not be picked even
        // with a full bucket is not worth checking its quota.
        if closed && strategy.bound(region.weight(), 1.0, is_origin) < floor {
            continue;
        }
        if let Ok(headroom) = region.admit(model, req.tokens, now) {
            unclosed |= !closed;
            if closed && strategy.bound(region.weight(), headroom, is_origin) < floor {
                continue;
            }
            let view = view(regions, index, headroom, req, origin, now);
            let value = strategy.value(&view);
            floor = floor.max(strategy.floor(value));
            scored.push(Scored {
                index,
                weight: view.weight,
                value,
                regions: view.regions,
                in_flight: view.in_flight,
            });
        }
    }
    unclosed
}

/// Every region's verdict for `req`, with the strategy's factors: for
/// `Route` and for explaining why nothing was eligible.
pub(super) fn evaluate<'a>(
    regions: &'a [RegionState],
    strategy: &dyn Strategy,
    model: usize,
    req: &RouteRequest<'_>,
    tried: &[Arc<str>],
    now: Instant,
) -> Evaluation<'a> {
    let mut eval = Evaluation {
        scored: Vec::with_capacity(regions.len()),
        excluded: Vec::new(),
        serving: 0,
        largest: 0,
    };
    let origin = origin_index(regions, req);
    for (index, region) in regions.iter().enumerate() {
        if let Some(q) = region.quota(model) {
            eval.serving += 1;
            eval.largest = eval.largest.max(q.tokens().capacity());
        }
        let admitted = if region.quota(model).is_some() && tried.iter().any(|t| **t == *region.name) {
            Err(Exclusion::AlreadyTried)
        } else {
            region.admit(model, req.tokens, now)
        };
        match admitted {
            Ok(headroom) => {
                let view = view(regions, index, headroom, req, origin, now);
                let score = strategy.score(&view);
                eval.scored.push((view, score));
            }
            Err(why) => eval.excluded.push((index, why)),
        }
    }
    eval
}

/// The candidate (index into `scored`) to send a half-open trial to, if any:
/// a region whose circuit is half-open with a trial slot free takes the
/// request whatever its score, so trials are really sent (at most
/// `half_open_trials` at once, as the breaker counts them). Among several,
/// the best score, then the first name.
pub(super) fn trial(regions: &[RegionState], scored: &[Scored], now: Instant) -> Option<usize> {
    // A fold, not a collect: the decision path does not allocate.
    scored
        .iter()
        .enumerate()
        .filter(|(_, s)| regions[s.index].breaker.wants_trial(now))
        .fold(None, |best: Option<(usize, f64)>, (i, s)| match best {
            Some((_, v)) if v >= s.value => best,
            _ => Some((i, s.value)),
        })
        .map(|(i, _)| i)
}
