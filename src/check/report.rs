//! What `check-cluster` found: one row per check (what the contract
//! expects, what was seen, the verdict) and the table it prints.

use std::fmt;

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Pass,
    /// Not a breach, but worth a look (or could not be judged).
    Warn,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        }
    }
}

/// A verdict and what it rests on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    pub verdict: Verdict,
    pub seen: String,
}

impl Judged {
    pub fn pass(seen: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Pass,
            seen: seen.into(),
        }
    }

    pub fn warn(seen: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Warn,
            seen: seen.into(),
        }
    }

    pub fn fail(seen: impl Into<String>) -> Self {
        Self {
            verdict: Verdict::Fail,
            seen: seen.into(),
        }
    }

    /// Several observations of one check: the worst verdict, every
    /// observation said (labelled).
    pub fn worst(parts: Vec<(&str, Judged)>) -> Judged {
        let verdict = parts
            .iter()
            .map(|(_, j)| j.verdict)
            .max()
            .unwrap_or(Verdict::Warn);
        let seen = parts
            .iter()
            .map(|(label, j)| format!("{label}: {}", j.seen))
            .collect::<Vec<_>>()
            .join("; ");
        Judged { verdict, seen }
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub check: &'static str,
    pub expected: &'static str,
    pub judged: Judged,
}

/// Every check's row, and what the run spent.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub requests: u32,
    pub tokens: u64,
    pub max_tokens: u64,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.rows.iter().any(|r| r.judged.verdict == Verdict::Fail)
    }

    pub fn count(&self, verdict: Verdict) -> usize {
        self.rows.iter().filter(|r| r.judged.verdict == verdict).count()
    }
}

/// Longest `seen` shown (what a cluster said is quoted in it).
const SEEN_WIDTH: usize = 400;

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let check = self.rows.iter().map(|r| r.check.len()).max().unwrap_or(5).max(5);
        let expected = self
            .rows
            .iter()
            .map(|r| r.expected.len())
            .max()
            .unwrap_or(8)
            .max(8);
        writeln!(f, "{:<check$}  {:<expected$}  RESULT  SEEN", "CHECK", "EXPECTED")?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<check$}  {:<expected$}  {:<6}  {}",
                r.check,
                r.expected,
                r.judged.verdict.as_str(),
                crate::excerpt::truncate(&r.judged.seen, SEEN_WIDTH)
            )?;
        }
        write!(
            f,
            "{} checks: {} PASS, {} WARN, {} FAIL; {} requests, {} of --max-tokens {} reserved",
            self.rows.len(),
            self.count(Verdict::Pass),
            self.count(Verdict::Warn),
            self.count(Verdict::Fail),
            self.requests,
            self.tokens,
            self.max_tokens
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_verdict_wins_and_every_part_is_said() {
        let j = Judged::worst(vec![
            ("Execute", Judged::pass("fine")),
            ("stream", Judged::fail("bad")),
            ("other", Judged::warn("odd")),
        ]);
        assert_eq!(j.verdict, Verdict::Fail);
        assert_eq!(j.seen, "Execute: fine; stream: bad; other: odd");
    }

    #[test]
    fn prints_an_aligned_table_with_a_summary() {
        let report = Report {
            rows: vec![
                Row {
                    check: "health",
                    expected: "SERVING",
                    judged: Judged::pass("SERVING"),
                },
                Row {
                    check: "unknown_model",
                    expected: "NOT_FOUND or INVALID_ARGUMENT",
                    judged: Judged::fail("OK"),
                },
            ],
            requests: 2,
            tokens: 40,
            max_tokens: 2000,
        };
        assert!(report.failed());
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0].find("RESULT"), lines[1].find("PASS"));
        assert_eq!(lines[1].find("PASS"), lines[2].find("FAIL"));
        assert_eq!(
            lines[3],
            "2 checks: 1 PASS, 0 WARN, 1 FAIL; 2 requests, 40 of --max-tokens 2000 reserved"
        );
    }
}
