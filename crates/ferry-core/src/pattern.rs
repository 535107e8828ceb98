//! Channel patterns, as NATS writes subjects: `orders.*` matches exactly one word in that place
//! (`orders.created`, not `orders` nor `orders.eu.created`), and a final `>` matches one or more
//! words (`orders.>` matches `orders.created` and `orders.eu.created`, not `orders`).
//!
//! A wildcard subscription is declared on a pattern and reads every channel it matches. Since
//! channel names cannot hold `*` or `>`, a name given where a channel is expected is a pattern
//! exactly when one of its words is `*` or `>`.

use std::fmt;

use crate::error::CoreError;
use crate::names::{self, MAX_NAME_LEN};

/// A parsed channel pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    words: Vec<Word>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    Exact(String),
    /// `*`: any one word.
    One,
    /// `>`: one or more words, at the end.
    Rest,
}

impl Pattern {
    /// Whether `text` is meant as a pattern (one of its words is `*` or `>`) rather than a
    /// channel name.
    pub fn is_pattern(text: &str) -> bool {
        text.split('.').any(|word| word == "*" || word == ">")
    }

    /// Parses a pattern; the error says what is wrong and how patterns are written.
    pub fn parse(text: &str) -> Result<Pattern, CoreError> {
        let invalid = |problem: String| {
            CoreError::InvalidArgument(format!(
                "invalid channel pattern {}: {problem}; a pattern is a channel name in which a \
                 word may be `*` (any one word) and the last word may be `>` (one or more words), \
                 e.g. \"orders.*\" or \"orders.>\"",
                names::quote(text)
            ))
        };
        if text.len() > MAX_NAME_LEN {
            return Err(invalid(format!(
                "it is {} bytes long; the limit is {MAX_NAME_LEN}",
                text.len()
            )));
        }
        let count = text.split('.').count();
        let mut words = Vec::with_capacity(count);
        for (at, word) in text.split('.').enumerate() {
            words.push(match word {
                "*" => Word::One,
                ">" if at + 1 == count => Word::Rest,
                ">" => return Err(invalid("`>` may only be its last word".into())),
                "" => return Err(invalid("it has an empty word".into())),
                word => match word
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
                {
                    Some(c) => {
                        return Err(invalid(format!(
                            "its word {} contains {c:?} (`*` and `>` stand alone as words)",
                            names::quote(word)
                        )));
                    }
                    None => Word::Exact(word.to_owned()),
                },
            });
        }
        if !words.iter().any(|w| matches!(w, Word::One | Word::Rest)) {
            return Err(invalid("it has no `*` or `>` word".into()));
        }
        Ok(Pattern {
            text: text.to_owned(),
            words,
        })
    }

    /// Whether the channel named `channel` is one of those the pattern matches.
    pub fn matches(&self, channel: &str) -> bool {
        let mut names = channel.split('.');
        for word in &self.words {
            match (word, names.next()) {
                (Word::Rest, Some(_)) => return true,
                (Word::One, Some(_)) => {}
                (Word::Exact(expected), Some(name)) if expected == name => {}
                _ => return false,
            }
        }
        names.next().is_none()
    }

    /// Whether some channel name matches both patterns.
    pub fn overlaps(&self, other: &Pattern) -> bool {
        fn overlap(a: &[Word], b: &[Word]) -> bool {
            match (a.split_first(), b.split_first()) {
                (None, None) => true,
                (None, Some(_)) | (Some(_), None) => false,
                // `>` takes one or more words: whatever is left of the other takes as many.
                (Some((Word::Rest, _)), Some(_)) | (Some(_), Some((Word::Rest, _))) => true,
                (Some((Word::Exact(x), _)), Some((Word::Exact(y), _))) if x != y => false,
                (Some((_, a)), Some((_, b))) => overlap(a, b),
            }
        }
        overlap(&self.words, &other.words)
    }

    /// Whether every channel `other` matches is one this pattern matches too: a permission
    /// granted on `orders.>` covers a wildcard subscription on `orders.*`, not the reverse.
    pub fn covers(&self, other: &Pattern) -> bool {
        fn cover(outer: &[Word], inner: &[Word]) -> bool {
            match (outer.split_first(), inner.split_first()) {
                (None, None) => true,
                (None, Some(_)) | (Some(_), None) => false,
                // `>` takes whatever is left, and what is left of `inner` is one or more words.
                (Some((Word::Rest, _)), Some(_)) => true,
                // Only `>` covers `>`: the rest may be any number of words.
                (Some(_), Some((Word::Rest, _))) => false,
                (Some((Word::Exact(x), _)), Some((Word::Exact(y), _))) if x != y => false,
                (Some((Word::Exact(_), _)), Some((Word::One, _))) => false,
                (Some((_, outer)), Some((_, inner))) => cover(outer, inner),
            }
        }
        cover(&self.words, &other.words)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::Pattern;

    #[test]
    fn one_word_and_the_rest() {
        let star = Pattern::parse("orders.*").unwrap();
        assert!(star.matches("orders.created") && star.matches("orders.x"));
        for other in [
            "orders",
            "orders.eu.created",
            "order.created",
            "ordersx.created",
        ] {
            assert!(!star.matches(other), "{other}");
        }
        let rest = Pattern::parse("orders.>").unwrap();
        assert!(rest.matches("orders.created") && rest.matches("orders.eu.created"));
        assert!(!rest.matches("orders") && !rest.matches("payments.created"));
        let middle = Pattern::parse("*.created").unwrap();
        assert!(middle.matches("orders.created") && !middle.matches("orders.updated"));
        assert!(Pattern::parse(">").unwrap().matches("a.b.c"));
        assert!(Pattern::parse("a.*.c.>").unwrap().matches("a.b.c.d.e"));
        assert!(!Pattern::parse("a.*.c.>").unwrap().matches("a.b.c"));
    }

    #[test]
    fn overlapping_patterns_share_a_channel() {
        let p = |text| Pattern::parse(text).unwrap();
        for (a, b) in [
            ("orders.>", "orders.*.x"),
            ("orders.*", "*.created"),
            (">", "a.*"),
            ("a.*.c", "a.b.*"),
        ] {
            assert!(p(a).overlaps(&p(b)) && p(b).overlaps(&p(a)), "{a} {b}");
        }
        for (a, b) in [
            ("orders.*", "payments.*"),
            ("orders.*", "orders.*.x"),
            ("a.>", "b.>"),
            ("a.*.c", "a.*.d"),
        ] {
            assert!(!p(a).overlaps(&p(b)) && !p(b).overlaps(&p(a)), "{a} {b}");
        }
    }

    #[test]
    fn a_pattern_covers_the_patterns_it_contains() {
        let p = |text| Pattern::parse(text).unwrap();
        for (outer, inner) in [
            (">", "orders.*"),
            (">", ">"),
            ("orders.>", "orders.*"),
            ("orders.>", "orders.*.>"),
            ("orders.*", "orders.*"),
            ("*.*", "orders.*"),
            ("*.>", "a.b.*"),
        ] {
            assert!(p(outer).covers(&p(inner)), "{outer} covers {inner}");
        }
        for (outer, inner) in [
            ("orders.*", "orders.>"),
            ("orders.*", ">"),
            ("orders.*.x", "orders.*.*"),
            ("orders.*", "*.created"),
            ("orders.>", "*.x"),
            ("a.*", "a.*.b"),
        ] {
            assert!(
                !p(outer).covers(&p(inner)),
                "{outer} does not cover {inner}"
            );
        }
    }

    #[test]
    fn tells_patterns_from_names_and_explains_refusals() {
        assert!(Pattern::is_pattern("orders.*") && Pattern::is_pattern(">"));
        assert!(!Pattern::is_pattern("orders.created") && !Pattern::is_pattern("a*b"));
        for (bad, why) in [
            ("orders", "no `*` or `>`"),
            ("orders.>.x", "last word"),
            ("orders..*", "empty word"),
            ("orders.a*", "contains '*'"),
            ("orders.é.*", "contains 'é'"),
        ] {
            let message = Pattern::parse(bad).unwrap_err().to_string();
            assert!(message.contains(why), "{bad}: {message}");
            assert!(message.contains("\"orders.*\""), "{message}");
        }
    }
}
