//! The rules for channel and subscription names.
//!
//! Names are dot-separated words (`orders.created`) so that later features can match them with
//! patterns; keeping the alphabet small keeps them safe in URLs, metrics labels and file names.

use crate::error::CoreError;

/// The longest name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// How much of a client's string an error message quotes at most, in characters.
const QUOTE_CHARS: usize = 64;

/// A client's string, quoted for an error message: at most its first 64 characters, so that a
/// status never grows with what the client sent (a 100 KB name would make it too big to read).
pub fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &text[..cut], text.len()),
    }
}

/// Checks a channel or subscription name; `what` says which, for the error message.
pub fn validate(what: &str, name: &str) -> Result<(), CoreError> {
    let problem = if name.is_empty() {
        Some("must not be empty".to_owned())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!(
            "is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        ))
    } else if name.split('.').any(str::is_empty) {
        Some("has an empty word: dots must separate non-empty words".to_owned())
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|c| format!("contains {c:?}"))
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(CoreError::InvalidArgument(format!(
            "invalid {what} name {}: it {problem}; a name is dot-separated words of ASCII letters, \
             digits, '_' and '-', at most {MAX_NAME_LEN} bytes",
            quote(name)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::{quote, validate};

    #[test]
    fn quotes_only_a_prefix_of_long_strings() {
        assert_eq!(quote("orders"), "\"orders\"");
        let long = "é".repeat(50_000);
        let quoted = quote(&long);
        assert!(quoted.len() < 200, "{quoted}");
        assert!(quoted.ends_with("… (100000 bytes)"), "{quoted}");
        let message = validate("channel", &"x".repeat(100_000))
            .unwrap_err()
            .to_string();
        assert!(message.len() < 400, "{message}");
    }

    #[test]
    fn accepts_dotted_words_and_explains_refusals() {
        for ok in ["orders", "orders.created", "a-b_c.9"] {
            validate("channel", ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("a..b", "empty word"),
            (".a", "empty word"),
            ("a b", "' '"),
            ("é", "'é'"),
        ] {
            let message = validate("channel", bad).unwrap_err().to_string();
            assert!(message.contains(why), "{bad:?}: {message}");
            assert!(message.contains("ASCII letters"), "{message}");
        }
        assert!(
            validate("channel", &"a".repeat(256))
                .unwrap_err()
                .to_string()
                .contains("limit is 255")
        );
    }
}
