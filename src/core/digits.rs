//! Decimal digits written without `core::fmt`. Every request writes a few
//! numbers (its id, the region call's `grpc-timeout`, the reply's cost),
//! and the formatting machinery cost several hundred instructions each
//! (docs/PERFORMANCE.md); these are a loop of divisions.

/// `n` in decimal, written at the end of `buf`.
pub fn decimal(buf: &mut [u8; 20], mut n: u64) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("ASCII digits")
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut String, n: u64) {
    out.push_str(decimal(&mut [0; 20], n));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_display_writes() {
        for n in [0, 1, 9, 10, 99, 100, 12_345, 99_999_999, u64::MAX / 3, u64::MAX] {
            assert_eq!(decimal(&mut [0; 20], n), n.to_string());
            let mut s = String::from("x-");
            push_decimal(&mut s, n);
            assert_eq!(s, format!("x-{n}"));
        }
    }
}
