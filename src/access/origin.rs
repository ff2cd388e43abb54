//! `--allowed-origin`: which web pages may open a WebSocket here. Browsers send `Origin` with
//! every WebSocket handshake and let any page connect anywhere, so without this check a
//! page on another site could use a visitor's cookies or network position (cross-site
//! WebSocket hijacking). Non-browser clients send no `Origin`; that is allowed (see
//! docs/SECURITY.md): they cannot be tricked by a page, and tokens are what authenticate them.
//!
//! An origin is `scheme://host[:port]` (RFC 6454), compared without case on scheme and host,
//! with the scheme's default port implied. A pattern is an exact origin, or
//! `scheme://*.domain[:port]`: every subdomain of `domain`, at any depth, but not `domain`
//! itself (list it too if it should connect).

/// One `--allowed-origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    /// Exact host, or the suffix `.domain` for a wildcard.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

/// scheme, host, and the port if it is not the scheme's default.
type Parts<'a> = (String, &'a str, Option<u16>);

fn parts(s: &str) -> Option<Parts<'_>> {
    let (scheme, rest) = s.split_once("://")?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return None;
    }
    let scheme = scheme.to_ascii_lowercase();
    // Host, possibly a bracketed IPv6 literal, then an optional port. No path, no user info.
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']')?;
            (&rest[..h.len() + 2], after)
        }
        None => match rest.rfind(':') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        },
    };
    let port = match port {
        "" => None,
        p => Some(p.strip_prefix(':')?.parse::<u16>().ok()?),
    };
    if host.is_empty() || host.bytes().any(|b| b"/?#@ \t".contains(&b)) {
        return None;
    }
    let default = match scheme.as_str() {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    };
    let port = port.filter(|&p| Some(p) != default);
    Some((scheme, host, port))
}

impl OriginPattern {
    /// Parses `https://app.example.com`, `http://localhost:3000` or `https://*.example.com`.
    pub fn parse(s: &str) -> Result<OriginPattern, String> {
        let bad = || {
            format!(
                "`{s}` is not an origin: use scheme://host[:port] (e.g. https://app.example.com) \
                 or scheme://*.domain for its subdomains, with no path or trailing slash"
            )
        };
        let (scheme, host, port) = parts(s.trim()).ok_or_else(bad)?;
        let host = host.to_ascii_lowercase();
        let (host, wildcard) = match host.strip_prefix("*.") {
            Some(domain) if !domain.is_empty() && !domain.contains('*') => {
                (format!(".{domain}"), true)
            }
            _ if host.contains('*') => return Err(bad()),
            _ => (host, false),
        };
        Ok(OriginPattern {
            scheme,
            host,
            wildcard,
            port,
        })
    }

    /// True if the `Origin` header value matches this pattern.
    pub fn matches(&self, origin: &str) -> bool {
        let Some((scheme, host, port)) = parts(origin.trim()) else {
            return false; // `null` and anything malformed
        };
        if scheme != self.scheme || port != self.port {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len()
                && host
                    .get(host.len() - self.host.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(&self.host))
        } else {
            host.eq_ignore_ascii_case(&self.host)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(pattern: &str, origin: &str) -> bool {
        OriginPattern::parse(pattern).unwrap().matches(origin)
    }

    #[test]
    fn exact_origins() {
        assert!(allowed(
            "https://app.example.com",
            "https://app.example.com"
        ));
        assert!(allowed(
            "https://app.example.com",
            "HTTPS://App.Example.COM"
        ));
        assert!(allowed(
            "https://app.example.com:443",
            "https://app.example.com"
        ));
        assert!(allowed(
            "https://app.example.com",
            "https://app.example.com:443"
        ));
        assert!(allowed("http://localhost:3000", "http://localhost:3000"));
        assert!(allowed("http://[::1]:3000", "http://[::1]:3000"));
        assert!(!allowed("http://localhost:3000", "http://localhost:3001"));
        assert!(!allowed(
            "https://app.example.com",
            "http://app.example.com"
        ));
        assert!(!allowed(
            "https://app.example.com",
            "https://app.example.com.evil.net"
        ));
        assert!(!allowed(
            "https://app.example.com",
            "https://evilapp.example.com"
        ));
        assert!(!allowed("https://app.example.com", "null"));
        assert!(!allowed("https://app.example.com", ""));
    }

    #[test]
    fn wildcard_subdomains() {
        let p = "https://*.example.com";
        assert!(allowed(p, "https://a.example.com"));
        assert!(allowed(p, "https://a.b.example.com"));
        assert!(
            !allowed(p, "https://example.com"),
            "the apex is listed on its own"
        );
        assert!(!allowed(p, "https://evilexample.com"));
        assert!(!allowed(p, "https://a.example.com.evil.net"));
        assert!(!allowed(p, "http://a.example.com"));
        assert!(!allowed(p, "https://a.example.com:8443"));
        assert!(allowed(
            "https://*.example.com:8443",
            "https://a.example.com:8443"
        ));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "example.com",
            "https://",
            "https://example.com/",
            "https://example.com/app",
            "https://a.*.com",
            "https://*",
            "https://*.",
            "https://ex ample.com",
            "https://example.com:99999",
            "https://user@example.com",
        ] {
            let e = OriginPattern::parse(bad).unwrap_err();
            assert!(e.contains("scheme://host"), "{bad}: {e}");
        }
    }
}
