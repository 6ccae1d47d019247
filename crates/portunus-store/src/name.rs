//! Names that become paths: host names and CA keys, validated first.

use crate::error::{Error, Result};

/// The directory name for a certificate's host name: lower case, `*.example.com` stored as
/// `wildcard_.example.com`. Refuses anything that is not a plain DNS name or IP address, so
/// no name can escape its directory.
pub fn storage_name(host: &str) -> Result<String> {
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    let invalid = || Error::InvalidName {
        name: host.to_owned(),
    };
    let (prefix, rest) = match lower.strip_prefix("*.") {
        Some(rest) => ("wildcard_.", rest),
        None => ("", lower.as_str()),
    };
    if rest.is_empty() || rest.len() > 253 {
        return Err(invalid());
    }
    if rest.parse::<std::net::IpAddr>().is_ok() {
        // IPv6 colons are fine on Linux but not everywhere: make them portable.
        return Ok(format!("{prefix}{}", rest.replace(':', "_")));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if rest.split('.').all(label_ok) {
        Ok(format!("{prefix}{rest}"))
    } else {
        Err(invalid())
    }
}

/// The storage key of a CA: its directory URL's host, port and path as one safe name
/// (`https://acme-v02.api.letsencrypt.org/directory` gives
/// `acme-v02.api.letsencrypt.org-directory`, `https://127.0.0.1:14000/dir` gives
/// `127.0.0.1-14000-dir`). Anything that is not a URL (such as `internal`) is kept if safe.
pub fn ca_key(directory: &str) -> Result<String> {
    let rest = directory
        .split_once("://")
        .map_or(directory, |(_, rest)| rest);
    let key: String = rest
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    let key = key.trim_matches('-').to_owned();
    if key.is_empty() || key.starts_with('.') || key.len() > 200 {
        return Err(Error::InvalidName {
            name: directory.to_owned(),
        });
    }
    Ok(key)
}

/// The storage key of an ACME account's contact: the e-mail address made safe
/// (`ops@example.com` gives `ops_example.com`), or `default` without one.
pub fn contact_key(email: Option<&str>) -> String {
    let Some(email) = email.map(str::trim).filter(|e| !e.is_empty()) else {
        return "default".to_owned();
    };
    let key: String = email
        .trim_start_matches("mailto:")
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    let key = key.trim_start_matches('.').to_owned();
    if key.is_empty() {
        "default".to_owned()
    } else {
        key
    }
}

/// Validates a CA key given directly.
pub(crate) fn check_ca_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            name: key.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_names() {
        let ok = [
            ("example.com", "example.com"),
            ("Example.COM.", "example.com"),
            ("*.example.com", "wildcard_.example.com"),
            ("127.0.0.1", "127.0.0.1"),
            ("::1", "__1"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ];
        for (input, want) in ok {
            assert_eq!(storage_name(input).unwrap(), want, "{input}");
        }
        for bad in [
            "", "..", "../etc", "a/b", "a\\b", ".", "*.", "a..b", "-a.com", "a b", "*.*.a",
        ] {
            assert!(storage_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ca_keys() {
        let cases = [
            (
                "https://acme-v02.api.letsencrypt.org/directory",
                "acme-v02.api.letsencrypt.org-directory",
            ),
            ("https://127.0.0.1:14000/dir", "127.0.0.1-14000-dir"),
            (
                "https://acme-staging-v02.api.letsencrypt.org/directory",
                "acme-staging-v02.api.letsencrypt.org-directory",
            ),
            ("internal", "internal"),
        ];
        for (input, want) in cases {
            assert_eq!(ca_key(input).unwrap(), want);
            check_ca_key(want).unwrap();
        }
        assert!(ca_key("://").is_err());
        assert!(check_ca_key("../x").is_err());
        assert!(check_ca_key("a/b").is_err());
        assert_eq!(contact_key(Some("Ops@Example.com")), "ops_example.com");
        assert_eq!(contact_key(Some("mailto:a@b.c")), "a_b.c");
        assert_eq!(contact_key(None), "default");
        assert_eq!(contact_key(Some("../../x")), "_.._x");
        check_ca_key(&contact_key(Some("../../x"))).unwrap();
    }
}
