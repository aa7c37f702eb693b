//! `Range: bytes=…` on blob GETs (RFC 9110 §14), one range at a time; anything else is served
//! whole, as the RFC allows.

/// What part of a blob of a given size a request wants.
#[derive(Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// The whole blob.
    Full,
    /// Bytes `start..=end`.
    Part { start: u64, end: u64 },
    /// A range that starts past the end.
    Unsatisfiable,
}

/// Reads a `Range` header value against a blob of `size` bytes.
pub fn parse(header: Option<&str>, size: u64) -> ByteRange {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return ByteRange::Full;
    };
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return ByteRange::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // bytes=-N: the last N bytes.
        return match last.parse::<u64>() {
            Ok(0) => ByteRange::Unsatisfiable,
            Ok(_) if size == 0 => ByteRange::Unsatisfiable,
            Ok(suffix) => ByteRange::Part {
                start: size.saturating_sub(suffix),
                end: size - 1,
            },
            Err(_) => ByteRange::Full,
        };
    }
    let Ok(start) = first.parse::<u64>() else {
        return ByteRange::Full;
    };
    if start >= size {
        return ByteRange::Unsatisfiable;
    }
    let end = if last.is_empty() {
        size - 1
    } else {
        match last.parse::<u64>() {
            Ok(end) if end >= start => end.min(size - 1),
            _ => return ByteRange::Full,
        }
    };
    ByteRange::Part { start, end }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read() {
        assert_eq!(parse(None, 10), ByteRange::Full);
        assert_eq!(
            parse(Some("bytes=0-3"), 10),
            ByteRange::Part { start: 0, end: 3 }
        );
        assert_eq!(
            parse(Some("bytes=5-"), 10),
            ByteRange::Part { start: 5, end: 9 }
        );
        assert_eq!(
            parse(Some("bytes=-4"), 10),
            ByteRange::Part { start: 6, end: 9 }
        );
        assert_eq!(
            parse(Some("bytes=-40"), 10),
            ByteRange::Part { start: 0, end: 9 }
        );
        assert_eq!(
            parse(Some("bytes=8-100"), 10),
            ByteRange::Part { start: 8, end: 9 }
        );
        assert_eq!(parse(Some("bytes=10-"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 10), ByteRange::Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-1,4-5"), 10), ByteRange::Full);
        assert_eq!(parse(Some("bytes=x-y"), 10), ByteRange::Full);
        assert_eq!(parse(Some("bytes=5-2"), 10), ByteRange::Full);
        assert_eq!(parse(Some("items=0-1"), 10), ByteRange::Full);
    }
}
