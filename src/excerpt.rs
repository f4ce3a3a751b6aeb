//! Caller input quoted back in an error: at most a short excerpt. A field
//! can be a megabyte; quoting it whole made a megabyte of trailers, which
//! clients refuse (as RESOURCE_EXHAUSTED, which reads as "retry").

/// Bytes of (escaped) caller input an excerpt shows at most.
pub const EXCERPT_BYTES: usize = 40;

/// `s` quoted, escaped to printable ASCII (so `grpc-message`'s
/// percent-encoding cannot triple it) and cut to about `EXCERPT_BYTES`;
/// when cut, its length follows: `"abc..." (1000000 bytes)`.
pub fn excerpt(s: &str) -> String {
    let mut shown = String::with_capacity(EXCERPT_BYTES + 2);
    let mut cut = false;
    for c in s.chars() {
        let escaped: String = c.escape_default().collect();
        if shown.len() + escaped.len() > EXCERPT_BYTES {
            cut = true;
            break;
        }
        shown.push_str(&escaped);
    }
    if cut {
        format!("\"{shown}...\" ({} bytes)", s.len())
    } else {
        format!("\"{shown}\"")
    }
}

/// `s` cut to at most `max` bytes at a character boundary, marked when cut
/// (never shorter than the mark): a last guard on text that may carry
/// caller or region input.
pub fn truncate(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    const MARK: &str = " ... (truncated)";
    let mut end = max.saturating_sub(MARK.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &s[..end]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_quoted_whole() {
        assert_eq!(excerpt("gpt-9"), "\"gpt-9\"");
        assert_eq!(excerpt(""), "\"\"");
        assert_eq!(excerpt("a\"b\n"), "\"a\\\"b\\n\"");
    }

    #[test]
    fn long_input_is_cut_and_its_size_given() {
        let e = excerpt(&"x".repeat(1_000_000));
        assert_eq!(e, format!("\"{}...\" (1000000 bytes)", "x".repeat(EXCERPT_BYTES)));
        // Non-ASCII is escaped, and counted as escaped.
        let e = excerpt(&"é".repeat(1000));
        assert!(e.is_ascii(), "{e}");
        assert!(e.len() < EXCERPT_BYTES + 30, "{e}");
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(100);
        let t = truncate(&long, 50);
        assert!(t.len() <= 50 && t.ends_with("(truncated)"), "{t}");
    }
}
