//! Page tokens (AIP-158 style): opaque to clients, to the registry the keyset where the
//! next page of the same query starts, and which part of the answer it is in.

use patchport_proto::convert::WireError;
use patchport_store::meta::Page;

/// Entries of a page when the request asks for none.
pub(crate) const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most entries of a page, whatever the request asks.
pub(crate) const MAX_PAGE_SIZE: u32 = 1000;

/// The page size to serve for a requested one.
pub(crate) fn page_size(asked: u32) -> u32 {
    match asked {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// Which part of an answer a token continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// A version listing.
    Versions,
    /// The native pairs of a compat query.
    Natives,
    /// The ports of a compat query.
    Ports,
}

impl Part {
    fn tag(self) -> &'static str {
        match self {
            Part::Versions => "v",
            Part::Natives => "n",
            Part::Ports => "p",
        }
    }
}

/// The token of the page that starts at `page`, in `part`.
pub(crate) fn encode(part: Part, page: &Page) -> String {
    hex::encode(format!(
        "{}\u{1f}{}\u{1f}{}",
        part.tag(),
        page.after_id,
        page.after_name
    ))
}

/// The part and page a request's `page_token` names (the first page of `first` when it
/// is empty), with `limit` the page size to serve. INVALID_ARGUMENT naming `page_token`
/// for anything this registry did not hand out for one of `parts`.
pub(crate) fn decode(
    token: &str,
    first: Part,
    parts: &[Part],
    limit: u32,
) -> Result<(Part, Page), WireError> {
    let invalid = || {
        WireError::invalid(
            "page_token",
            "not a page token of this query: pass the next_page_token of the previous page unchanged",
        )
    };
    if token.is_empty() {
        return Ok((first, Page::first(limit)));
    }
    let raw = hex::decode(token).map_err(|_| invalid())?;
    let raw = String::from_utf8(raw).map_err(|_| invalid())?;
    let mut it = raw.splitn(3, '\u{1f}');
    let (Some(tag), Some(id), Some(name)) = (it.next(), it.next(), it.next()) else {
        return Err(invalid());
    };
    let part = *parts.iter().find(|p| p.tag() == tag).ok_or_else(invalid)?;
    let after_id: i64 = id.parse().map_err(|_| invalid())?;
    if after_id < 0 {
        return Err(invalid());
    }
    Ok((
        part,
        Page {
            after_name: name.to_owned(),
            after_id,
            limit: Some(limit),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_foreign_ones_are_refused() {
        let page = Page {
            after_name: "acme/qv".into(),
            after_id: 42,
            limit: Some(7),
        };
        let token = encode(Part::Natives, &page);
        assert_eq!(
            decode(&token, Part::Natives, &[Part::Natives, Part::Ports], 7).unwrap(),
            (Part::Natives, page)
        );
        assert_eq!(
            decode("", Part::Versions, &[Part::Versions], 5).unwrap(),
            (Part::Versions, Page::first(5))
        );
        for bad in ["zz", "00", &hex::encode("x\u{1f}1\u{1f}"), &token] {
            assert!(
                decode(bad, Part::Versions, &[Part::Versions], 5).is_err(),
                "{bad}"
            );
        }
        assert_eq!(page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5000), MAX_PAGE_SIZE);
    }
}
