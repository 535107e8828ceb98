//! Subscription filters, in the syntax of Google Cloud Pub/Sub subscription filters, with a
//! Ferry extension for the ordering key.
//!
//! ```text
//! filter     = expression                                (at most 256 bytes)
//! expression = term { "AND" term } | term { "OR" term }  (mixing needs parentheses)
//! term       = ( "NOT" | "-" ) term | "(" expression ")" | predicate
//! predicate  = "attributes" ":" name                     has the attribute
//!            | field ( "=" | "!=" ) string               "!=" also matches if it is absent
//!            | "hasPrefix" "(" field "," string ")"
//! field      = "attributes" "." name | "key"
//! name       = letters, digits, "_", "-" | string
//! string     = '"' ... '"' | "'" ... "'"                 with \" \' \\ escapes
//! ```
//!
//! A filter is parsed once, when its subscription is created or started, into a tree that a
//! dispatcher evaluates against each message; errors name a 1-based character column.

use std::fmt;

use ferry_store::Message;

/// The longest filter, in bytes (as Pub/Sub).
pub const MAX_FILTER_BYTES: usize = 256;

/// A parsed filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    expr: Expr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    /// The field equals (or, negated, does not equal) the value.
    Equals {
        field: Field,
        value: String,
        negated: bool,
    },
    Has(String),
    HasPrefix {
        field: Field,
        prefix: String,
    },
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Attribute(String),
    Key,
}

/// Why a filter does not parse, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    /// The 1-based character column where the problem is.
    pub column: usize,
    /// What was expected there, or what is wrong.
    pub message: String,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "column {}: {}", self.column, self.message)
    }
}

impl Filter {
    /// Parses a filter.
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        if text.len() > MAX_FILTER_BYTES {
            return Err(FilterError {
                column: 1,
                message: format!(
                    "the filter is {} bytes; at most {MAX_FILTER_BYTES} are allowed",
                    text.len()
                ),
            });
        }
        let mut parser = Parser {
            chars: text.chars().collect(),
            at: 0,
        };
        let expr = parser.expression()?;
        parser.skip_space();
        if parser.at < parser.chars.len() {
            return Err(parser.error("expected AND, OR, ')' or the end of the filter"));
        }
        Ok(Filter { expr })
    }

    /// Whether `message` passes the filter.
    pub fn matches(&self, message: &Message) -> bool {
        self.expr.matches(message)
    }
}

impl Expr {
    fn matches(&self, message: &Message) -> bool {
        match self {
            Expr::Equals {
                field,
                value,
                negated,
            } => match field.get(message) {
                Some(actual) => (actual == value) != *negated,
                None => *negated,
            },
            Expr::Has(name) => message.attributes.get(name).is_some(),
            Expr::HasPrefix { field, prefix } => field
                .get(message)
                .is_some_and(|v| v.starts_with(prefix.as_str())),
            Expr::Not(inner) => !inner.matches(message),
            Expr::And(all) => all.iter().all(|e| e.matches(message)),
            Expr::Or(any) => any.iter().any(|e| e.matches(message)),
        }
    }
}

impl Field {
    fn get<'m>(&self, message: &'m Message) -> Option<&'m str> {
        match self {
            Field::Attribute(name) => message.attributes.get(name),
            Field::Key => Some(message.key.as_str()),
        }
    }
}

struct Parser {
    chars: Vec<char>,
    at: usize,
}

impl Parser {
    fn error(&self, message: &str) -> FilterError {
        FilterError {
            column: self.at + 1,
            message: message.to_owned(),
        }
    }

    fn skip_space(&mut self) {
        while self.chars.get(self.at).is_some_and(|c| c.is_whitespace()) {
            self.at += 1;
        }
    }

    /// Takes `word` if it comes next (as a whole word for letters).
    fn eat(&mut self, word: &str) -> bool {
        self.skip_space();
        let len = word.chars().count();
        let matches = self.chars.len() >= self.at + len
            && self.chars[self.at..self.at + len]
                .iter()
                .copied()
                .eq(word.chars());
        let whole = !word.chars().all(char::is_alphanumeric)
            || !self
                .chars
                .get(self.at + len)
                .is_some_and(|c| c.is_alphanumeric() || *c == '_');
        if matches && whole {
            self.at += len;
        }
        matches && whole
    }

    fn expect(&mut self, word: &str, what: &str) -> Result<(), FilterError> {
        match self.eat(word) {
            true => Ok(()),
            false => Err(self.error(&format!("expected {what}"))),
        }
    }

    fn expression(&mut self) -> Result<Expr, FilterError> {
        let first = self.term()?;
        let (joiner, other) = match () {
            _ if self.eat("AND") => ("AND", "OR"),
            _ if self.eat("OR") => ("OR", "AND"),
            _ => return Ok(first),
        };
        let mut terms = vec![first, self.term()?];
        loop {
            if self.eat(joiner) {
                terms.push(self.term()?);
                continue;
            }
            let before = self.at;
            if self.eat(other) {
                self.at = before;
                self.skip_space();
                return Err(self.error(&format!(
                    "{other} after {joiner}: use parentheses to say which goes first"
                )));
            }
            break;
        }
        Ok(match joiner {
            "AND" => Expr::And(terms),
            _ => Expr::Or(terms),
        })
    }

    fn term(&mut self) -> Result<Expr, FilterError> {
        if self.eat("NOT") || self.eat("-") {
            return Ok(Expr::Not(Box::new(self.term()?)));
        }
        if self.eat("(") {
            let inner = self.expression()?;
            self.expect(")", "')'")?;
            return Ok(inner);
        }
        if self.eat("hasPrefix") {
            self.expect("(", "'(' after hasPrefix")?;
            let field = self.field()?;
            self.expect(",", "',' after the field")?;
            let prefix = self.string()?;
            self.expect(")", "')'")?;
            return Ok(Expr::HasPrefix { field, prefix });
        }
        self.skip_space();
        let start = self.at;
        if self.eat("attributes") && self.eat(":") {
            return Ok(Expr::Has(self.name()?));
        }
        self.at = start;
        let field = self.field()?;
        let negated = match () {
            _ if self.eat("!=") => true,
            _ if self.eat("=") => false,
            _ => return Err(self.error("expected '=' or '!='")),
        };
        let value = self.string()?;
        Ok(Expr::Equals {
            field,
            value,
            negated,
        })
    }

    fn field(&mut self) -> Result<Field, FilterError> {
        if self.eat("key") {
            return Ok(Field::Key);
        }
        if self.eat("attributes") {
            self.expect(".", "'.' or ':' after attributes")?;
            return Ok(Field::Attribute(self.name()?));
        }
        self.skip_space();
        Err(self.error("expected attributes.NAME, attributes:NAME, key, hasPrefix, NOT or '('"))
    }

    fn name(&mut self) -> Result<String, FilterError> {
        self.skip_space();
        if matches!(self.chars.get(self.at), Some('"' | '\'')) {
            return self.string();
        }
        let start = self.at;
        while self
            .chars
            .get(self.at)
            .is_some_and(|c| c.is_alphanumeric() || *c == '_' || *c == '-')
        {
            self.at += 1;
        }
        match self.at > start {
            true => Ok(self.chars[start..self.at].iter().collect()),
            false => Err(self.error("expected an attribute name")),
        }
    }

    fn string(&mut self) -> Result<String, FilterError> {
        self.skip_space();
        let quote = match self.chars.get(self.at) {
            Some(&q @ ('"' | '\'')) => q,
            _ => return Err(self.error("expected a quoted string")),
        };
        let open = self.at;
        self.at += 1;
        let mut out = String::new();
        loop {
            match self.chars.get(self.at) {
                None => {
                    self.at = open;
                    return Err(self.error("this string is never closed"));
                }
                Some('\\') => {
                    match self.chars.get(self.at + 1) {
                        Some(&c @ ('"' | '\'' | '\\')) => out.push(c),
                        _ => {
                            self.at += 1;
                            return Err(self.error("expected \\\", \\' or \\\\ after a backslash"));
                        }
                    }
                    self.at += 2;
                }
                Some(&c) if c == quote => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(&c) => {
                    out.push(c);
                    self.at += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_store::Attributes;

    fn message(attributes: &[(&str, &str)], key: &str) -> Message {
        Message {
            sequence: 1,
            publish_time_ms: 0,
            key: key.into(),
            id: String::new(),
            attributes: Attributes::from_pairs(attributes.iter().copied()),
            payload: Default::default(),
        }
    }

    fn passes(filter: &str, attributes: &[(&str, &str)], key: &str) -> bool {
        Filter::parse(filter)
            .unwrap_or_else(|e| panic!("{filter}: {e}"))
            .matches(&message(attributes, key))
    }

    #[test]
    fn predicates_and_operators_match_as_pubsub_says() {
        let eu = [("region", "eu"), ("kind", "order.created")];
        assert!(passes(r#"attributes.region = "eu""#, &eu, ""));
        assert!(!passes(r#"attributes.region = "us""#, &eu, ""));
        assert!(passes(r#"attributes.region != "us""#, &eu, ""));
        assert!(
            passes(r#"attributes.missing != "x""#, &eu, ""),
            "!= matches an absent attribute"
        );
        assert!(passes("attributes:kind", &eu, ""));
        assert!(passes("NOT attributes:trace", &eu, ""));
        assert!(passes("-attributes:trace", &eu, ""));
        assert!(passes(r#"hasPrefix(attributes.kind, "order.")"#, &eu, ""));
        assert!(!passes(r#"hasPrefix(attributes.missing, "")"#, &eu, ""));
        assert!(passes(
            r#"attributes.region = "eu" AND (attributes:trace OR hasPrefix(attributes.kind, 'order'))"#,
            &eu,
            ""
        ));
        assert!(!passes(
            r#"attributes.region = "us" OR attributes.region = "asia" OR NOT attributes:kind"#,
            &eu,
            ""
        ));
        assert!(passes(r#"key = "account-1""#, &[], "account-1"));
        assert!(passes(r#"key != "account-1""#, &[], "account-2"));
        assert!(passes(r#"hasPrefix(key, "acc")"#, &[], "account-2"));
        assert!(passes(
            r#"attributes."odd name" = 'it\'s'"#,
            &[("odd name", "it's")],
            ""
        ));
    }

    #[test]
    fn errors_name_the_column_and_what_was_expected() {
        let error = |filter: &str| Filter::parse(filter).unwrap_err();
        let e = error(r#"attributes.region = eu"#);
        assert_eq!(
            (e.column, e.message.as_str()),
            (21, "expected a quoted string")
        );
        let e = error(r#"attributes.a = "1" AND attributes.b = "2" OR attributes:c"#);
        assert_eq!(e.column, 43);
        assert!(e.message.contains("parentheses"), "{e}");
        let e = error(r#"attributes.a = "1"#);
        assert_eq!(
            (e.column, e.message.as_str()),
            (16, "this string is never closed")
        );
        assert_eq!(error("attribute:a").column, 1);
        assert_eq!(error("hasPrefix(attributes.a \"x\")").column, 24);
        assert_eq!(error(r#"(attributes:a"#).column, 14);
        assert_eq!(error(r#"attributes:a attributes:b"#).column, 14);
        assert_eq!(error("").column, 1);
        let e = error(&format!("attributes.a = \"{}\"", "x".repeat(250)));
        assert!(e.message.contains("256"), "{e}");
        // Columns count characters, not bytes.
        assert_eq!(error("attributes.é = 'x' AND").column, 23);
    }
}
