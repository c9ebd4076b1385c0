//! Redis's own readers for the pieces of a request: `string2ll` for lengths, `sdssplitargs`
//! for inline commands. Ported to behave byte for byte like the C, quirks included.

use memchr::memchr;

/// Redis's `string2ll`: an optional minus, then digits without a leading zero, no sign `+`.
pub fn string2ll(s: &[u8]) -> Option<i64> {
    match s {
        [] => None,
        [b'0'] => Some(0),
        [b'-', digits @ ..] => {
            let v = unsigned(digits)?;
            if v > i64::MAX as u64 + 1 {
                None
            } else {
                Some((v as i64).wrapping_neg())
            }
        }
        digits => unsigned(digits).and_then(|v| i64::try_from(v).ok()),
    }
}

fn unsigned(digits: &[u8]) -> Option<u64> {
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Redis's `sdssplitargs`, used for inline commands: blanks separate arguments, `"..."` takes
/// `\n`, `\r`, `\t`, `\b`, `\a` and `\xHH` escapes, `'...'` takes `\'`, and a closing quote
/// must be followed by a blank. A NUL ends the line, as in C. `None` means unbalanced quotes.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let line = match memchr(0, line) {
        Some(nul) => &line[..nul],
        None => line,
    };
    let blank = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t' | 0x0b | 0x0c);
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while p < line.len() && blank(line[p]) {
            p += 1;
        }
        if p == line.len() {
            return Some(args);
        }
        let mut current = Vec::new();
        let (mut in_dq, mut in_sq) = (false, false);
        loop {
            let c = line.get(p).copied();
            if in_dq {
                let c = c?;
                let next = line.get(p + 1).copied();
                if c == b'\\' && next == Some(b'x') {
                    let hex = line.get(p + 2..p + 4).and_then(|h| {
                        let h = std::str::from_utf8(h).ok()?;
                        u8::from_str_radix(h, 16).ok().filter(|_| h.len() == 2)
                    });
                    if let Some(byte) =
                        hex.filter(|_| line[p + 2..p + 4].iter().all(u8::is_ascii_hexdigit))
                    {
                        current.push(byte);
                        p += 4;
                        continue;
                    }
                }
                if c == b'\\' && next.is_some() {
                    current.push(match next? {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                    p += 2;
                } else if c == b'"' {
                    if next.is_some_and(|n| !blank(n)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    current.push(c);
                    p += 1;
                }
            } else if in_sq {
                let c = c?;
                let next = line.get(p + 1).copied();
                if c == b'\\' && next == Some(b'\'') {
                    current.push(b'\'');
                    p += 2;
                } else if c == b'\'' {
                    if next.is_some_and(|n| !blank(n)) {
                        return None;
                    }
                    p += 1;
                    break;
                } else {
                    current.push(c);
                    p += 1;
                }
            } else {
                match c {
                    None | Some(b' ' | b'\n' | b'\r' | b'\t') => break,
                    Some(b'"') => in_dq = true,
                    Some(b'\'') => in_sq = true,
                    Some(other) => current.push(other),
                }
                p += 1;
            }
        }
        args.push(current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string2ll_matches_redis() {
        assert_eq!(string2ll(b"0"), Some(0));
        assert_eq!(string2ll(b"12"), Some(12));
        assert_eq!(string2ll(b"-1"), Some(-1));
        assert_eq!(string2ll(b"01"), None);
        assert_eq!(string2ll(b"+1"), None);
        assert_eq!(string2ll(b"-0"), None);
        assert_eq!(string2ll(b""), None);
        assert_eq!(string2ll(b"-"), None);
        assert_eq!(string2ll(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(string2ll(b"9223372036854775808"), None);
        assert_eq!(string2ll(b"-9223372036854775808"), Some(i64::MIN));
    }

    #[test]
    fn split_args_matches_sdssplitargs() {
        let s = |l: &[u8]| {
            split_args(l).map(|v| {
                v.into_iter()
                    .map(|a| String::from_utf8_lossy(&a).into_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            s(b"SET a b"),
            Some(vec!["SET".into(), "a".into(), "b".into()])
        );
        assert_eq!(s(b"  "), Some(vec![]));
        assert_eq!(
            s(b"SET \"a b\" 'c d'"),
            Some(vec!["SET".into(), "a b".into(), "c d".into()])
        );
        assert_eq!(
            s(b"ECHO \"\\x41\\n\""),
            Some(vec!["ECHO".into(), "A\n".into()])
        );
        assert_eq!(s(b"ECHO \"abc"), None);
        assert_eq!(s(b"ECHO \"abc\"d"), None);
        assert_eq!(
            s(b"ECHO 'it\\'s'"),
            Some(vec!["ECHO".into(), "it's".into()])
        );
        assert_eq!(s(b"PING\0junk"), Some(vec!["PING".into()]));
    }
}
