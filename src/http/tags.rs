//! Paging of `GET /v2/<name>/tags/list` as the distribution spec describes it
//! (<https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-tags>):
//! `n` tags at most, those lexically after `last`, and a `Link` to the next page.

use crate::error::Error;

/// One page of a sorted tag list, and the `last` value of the next page when there is one.
pub fn page(
    tags: Vec<String>,
    query: Option<&str>,
) -> Result<(Vec<String>, Option<String>), Error> {
    let mut n = None;
    let mut last = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "n" => {
                n = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| Error::BadPageSize(value.chars().take(40).collect()))?,
                )
            }
            "last" => last = Some(percent_decode(value)),
            _ => {}
        }
    }
    let mut rest: Vec<String> = match &last {
        Some(last) => tags.into_iter().filter(|t| t > last).collect(),
        None => tags,
    };
    let Some(n) = n else {
        return Ok((rest, None));
    };
    if rest.len() <= n {
        return Ok((rest, None));
    }
    rest.truncate(n);
    let next = rest.last().cloned();
    Ok((rest, next.filter(|_| n > 0)))
}

/// `%XX` escapes decoded (tags need none, but clients may escape anyway).
pub(super) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> Vec<String> {
        ["latest", "main", "v1", "v2"].map(String::from).to_vec()
    }

    #[test]
    fn pages_follow_last_and_n() {
        assert_eq!(page(tags(), None).unwrap(), (tags(), None));
        let (first, next) = page(tags(), Some("n=2")).unwrap();
        assert_eq!(first, ["latest", "main"]);
        assert_eq!(next.as_deref(), Some("main"));
        let (second, next) = page(tags(), Some("n=2&last=main")).unwrap();
        assert_eq!(second, ["v1", "v2"]);
        assert_eq!(next, None);
        assert_eq!(page(tags(), Some("last=v1")).unwrap().0, ["v2"]);
        assert_eq!(page(tags(), Some("n=0")).unwrap(), (vec![], None));
        assert!(page(tags(), Some("n=lots")).is_err());
    }
}
