//! Watch paths as OpenCore clients send them: a JSONPath filter over the
//! changed document, `$.[?(@._type == 'test')]`, turned into the node's
//! JSON filter so a watch matches exactly what the path selects.
//!
//! Accepted: `$.[?( EXPR )]` (or `$[?( EXPR )]`) where EXPR combines
//! comparisons `@.FIELD OP LITERAL` with `&&`, `||` and parentheses; FIELD
//! is a dotted name (`@.a.b`) or bracketed (`@['a b']`); OP is `==`,
//! `===`, `!=` or `!==`; a literal is a quoted string ('x' or "x"), a
//! number, `true`, `false` or `null`. Anything else is an error naming the
//! position. The input is length- and depth-bounded, so no path can exhaust
//! the stack.

use serde_json::{Value, json};

/// Longest path accepted, in bytes.
const MAX_LEN: usize = 4096;
/// Deepest nesting of parentheses accepted.
const MAX_DEPTH: usize = 32;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("nests parentheses deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("expected {expected} at character {at}")]
    Expected { expected: &'static str, at: usize },
    #[error("unexpected {found:?} at character {at} after the filter")]
    Trailing { found: String, at: usize },
    #[error("unterminated string starting at character {at}")]
    Unterminated { at: usize },
    #[error("{text:?} at character {at} is not a number")]
    BadNumber { text: String, at: usize },
}

/// What a watch path selects: every change, or those matching a filter.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    All,
    Filter(Value),
}

/// Parses one watch path. Empty, `[]` and `$` select every change.
pub fn parse(path: &str) -> Result<Selection, PathError> {
    if path.len() > MAX_LEN {
        return Err(PathError::TooLong);
    }
    let trimmed = path.trim();
    if matches!(trimmed, "" | "[]" | "$") {
        return Ok(Selection::All);
    }
    let mut p = Parser {
        chars: path.chars().collect(),
        pos: 0,
        depth: 0,
    };
    p.skip_ws();
    p.expect('$', "'$'")?;
    p.skip_ws();
    p.eat('.');
    p.skip_ws();
    p.expect('[', "'[' after '$'")?;
    p.skip_ws();
    p.expect('?', "'?' (a filter: [?(...)])")?;
    p.skip_ws();
    if p.peek() != Some('(') {
        return Err(p.expected("'(' after '?'"));
    }
    let filter = p.or_expr()?;
    p.skip_ws();
    p.expect(']', "']' closing the filter")?;
    p.skip_ws();
    if let Some(c) = p.peek() {
        return Err(PathError::Trailing {
            found: c.to_string(),
            at: p.pos,
        });
    }
    Ok(Selection::Filter(filter))
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, s: &str) -> bool {
        let n = s.chars().count();
        if self.chars.len() >= self.pos + n && self.chars[self.pos..self.pos + n].iter().copied().eq(s.chars()) {
            self.pos += n;
            true
        } else {
            false
        }
    }

    fn expected(&self, expected: &'static str) -> PathError {
        PathError::Expected { expected, at: self.pos }
    }

    fn expect(&mut self, c: char, expected: &'static str) -> Result<(), PathError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.expected(expected))
        }
    }

    /// `and ('||' and)*`
    fn or_expr(&mut self) -> Result<Value, PathError> {
        self.joined("||", "$or", Self::and_expr)
    }

    /// `primary ('&&' primary)*`
    fn and_expr(&mut self) -> Result<Value, PathError> {
        self.joined("&&", "$and", Self::primary)
    }

    /// `term (token term)*`, as the node's `op` of the terms (or the one term).
    fn joined(
        &mut self,
        token: &str,
        op: &str,
        term: fn(&mut Self) -> Result<Value, PathError>,
    ) -> Result<Value, PathError> {
        let mut terms = vec![term(self)?];
        loop {
            self.skip_ws();
            if !self.eat_str(token) {
                break;
            }
            terms.push(term(self)?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            json!({ op: terms })
        })
    }

    /// `'(' or ')'`, or a comparison.
    fn primary(&mut self) -> Result<Value, PathError> {
        self.skip_ws();
        if self.eat('(') {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(PathError::TooDeep);
            }
            let inner = self.or_expr()?;
            self.skip_ws();
            self.expect(')', "')'")?;
            self.depth -= 1;
            return Ok(inner);
        }
        self.comparison()
    }

    /// `@.FIELD OP LITERAL`
    fn comparison(&mut self) -> Result<Value, PathError> {
        self.expect('@', "a comparison starting with '@' (@.field == value)")?;
        let field = self.field()?;
        self.skip_ws();
        let op = if self.eat_str("===") || self.eat_str("==") {
            "$eq"
        } else if self.eat_str("!==") || self.eat_str("!=") {
            "$ne"
        } else {
            return Err(self.expected("'==' or '!='"));
        };
        self.skip_ws();
        let value = self.literal()?;
        Ok(json!({ field: { op: value } }))
    }

    /// One or more `.name` or `['name']` steps, joined with dots.
    fn field(&mut self) -> Result<String, PathError> {
        let mut parts: Vec<String> = Vec::new();
        loop {
            if self.eat('.') {
                let start = self.pos;
                while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-') {
                    self.pos += 1;
                }
                if self.pos == start {
                    return Err(self.expected("a field name after '.'"));
                }
                parts.push(self.chars[start..self.pos].iter().collect());
            } else if self.peek() == Some('[') {
                self.pos += 1;
                self.skip_ws();
                let Some(quote @ ('\'' | '"')) = self.peek() else {
                    return Err(self.expected("a quoted field name in [...]"));
                };
                let name = self.string(quote)?;
                // The name becomes a dotted path of the node's filter: an
                // empty part ('a..b', '.') would be a filter the node refuses
                // only later, when the watch runs.
                if name.split('.').any(str::is_empty) || name.starts_with('$') {
                    return Err(self.expected("a field name with no empty part, not starting with '$'"));
                }
                self.skip_ws();
                self.expect(']', "']' after the field name")?;
                parts.push(name);
            } else {
                break;
            }
        }
        if parts.is_empty() {
            return Err(self.expected("a field after '@' (@.field)"));
        }
        Ok(parts.join("."))
    }

    fn literal(&mut self) -> Result<Value, PathError> {
        match self.peek() {
            Some(q @ ('\'' | '"')) => self.string(q).map(Value::String),
            Some(c) if c == '-' || c.is_ascii_digit() => self.number(),
            _ if self.eat_str("true") => Ok(Value::Bool(true)),
            _ if self.eat_str("false") => Ok(Value::Bool(false)),
            _ if self.eat_str("null") => Ok(Value::Null),
            _ => Err(self.expected("a value: 'text', a number, true, false or null")),
        }
    }

    /// A string in `quote`s, the opening one at `pos`; `\` escapes the next character.
    fn string(&mut self, quote: char) -> Result<String, PathError> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(PathError::Unterminated { at: start }),
                Some(c) if c == quote => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('\\') => {
                    self.pos += 1;
                    match self.peek() {
                        None => return Err(PathError::Unterminated { at: start }),
                        Some(c) => {
                            out.push(c);
                            self.pos += 1;
                        }
                    }
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn number(&mut self) -> Result<Value, PathError> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'))
        {
            self.pos += 1;
        }
        let text: String = self.chars[start..self.pos].iter().collect();
        match serde_json::from_str::<Value>(&text) {
            Ok(v @ Value::Number(_)) => Ok(v),
            _ => Err(PathError::BadNumber { text, at: start }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A comparison or a combination of them, as OpenCore clients write them.
    fn expr() -> impl Strategy<Value = String> {
        let field = prop_oneof![
            "[a-z_][a-z0-9_-]{0,4}".prop_map(|f| format!("@.{f}")),
            "[a-z_][a-z0-9_-]{0,3}\\.[a-z]{1,3}".prop_map(|f| format!("@.{f}")),
            "[a-z é-]{1,3}(\\.[a-z $é-]{1,3}){0,2}".prop_map(|f| format!("@['{f}']")),
        ];
        let literal = prop_oneof![
            "[a-z ']{0,6}".prop_map(|s| format!("'{}'", s.replace('\'', "\\'"))),
            "[a-z]{0,6}".prop_map(|s| format!("\"{s}\"")),
            any::<i64>().prop_map(|n| n.to_string()),
            (-1e6f64..1e6).prop_map(|f| f.to_string()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            Just("null".to_owned()),
        ];
        let op = prop_oneof![Just("=="), Just("==="), Just("!="), Just("!==")];
        let leaf = (field, op, literal).prop_map(|(f, o, l)| format!("{f} {o} {l}"));
        leaf.prop_recursive(4, 16, 3, |inner| {
            prop_oneof![
                (inner.clone(), prop_oneof![Just("&&"), Just("||")], inner.clone())
                    .prop_map(|(a, o, b)| format!("{a} {o} {b}")),
                inner.prop_map(|e| format!("({e})")),
            ]
        })
    }

    fn token() -> impl Strategy<Value = &'static str> {
        proptest::sample::select(vec![
            "$", ".", "[", "]", "?", "(", ")", "@", ".a", "['b c']", "['x.y']", "['a..b']", "['']", "==", "!=", "===",
            "&&", "||", "'s'", "\"d\"", "'", "1", "-2.5e3", "1e999", "--", "true", "null", " ", "\\", "é", "\u{0}",
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        /// Any text: a selection or an error naming a position, never a panic.
        #[test]
        fn any_text_parses_or_is_refused(text in ".{0,80}") {
            if let Err(e) = parse(&text) {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        /// Token soup near the grammar: whatever parses is a filter the
        /// node accepts (a watch never fails later on its own path).
        #[test]
        fn what_parses_is_a_valid_node_filter(tokens in proptest::collection::vec(token(), 0..30)) {
            let text: String = tokens.concat();
            if let Ok(Selection::Filter(f)) = parse(&text) {
                prop_assert!(ocmesh_node::query::Filter::parse(&f).is_ok(), "{} gave {}", text, f);
            }
        }

        /// Well-formed filters always parse, into valid node filters.
        #[test]
        fn well_formed_filters_parse(e in expr(), dot in any::<bool>()) {
            let text = format!("${}[?({e})]", if dot { "." } else { "" });
            match parse(&text) {
                Ok(Selection::Filter(f)) => prop_assert!(ocmesh_node::query::Filter::parse(&f).is_ok(), "{} gave {}", text, f),
                other => prop_assert!(false, "{} gave {:?}", text, other),
            }
        }
    }

    fn filter(path: &str) -> Value {
        match parse(path) {
            Ok(Selection::Filter(f)) => f,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn opencore_filters_become_node_filters() {
        assert_eq!(filter("$.[?(@._type == 'test')]"), json!({"_type": {"$eq": "test"}}));
        assert_eq!(filter("$[?(@.name==\"x\")]"), json!({"name": {"$eq": "x"}}));
        assert_eq!(filter(" $.[?( @.n === 3 )] "), json!({"n": {"$eq": 3}}));
        assert_eq!(filter("$.[?(@.a.b != -1.5e2)]"), json!({"a.b": {"$ne": -150.0}}));
        assert_eq!(
            filter("$.[?(@['odd name'] !== true)]"),
            json!({"odd name": {"$ne": true}})
        );
        assert_eq!(filter("$.[?(@.x == null)]"), json!({"x": {"$eq": null}}));
        assert_eq!(filter(r"$.[?(@.s == 'it\'s')]"), json!({"s": {"$eq": "it's"}}));
        assert_eq!(
            filter("$.[?(@._type == 'a' && @.n == 1 || @.name != 'b')]"),
            json!({"$or": [
                {"$and": [{"_type": {"$eq": "a"}}, {"n": {"$eq": 1}}]},
                {"name": {"$ne": "b"}}
            ]})
        );
        assert_eq!(
            filter("$.[?(@.a == 1 && (@.b == 2 || @.c == 3))]"),
            json!({"$and": [
                {"a": {"$eq": 1}},
                {"$or": [{"b": {"$eq": 2}}, {"c": {"$eq": 3}}]}
            ]})
        );
        for all in ["", "  ", "[]", "$"] {
            assert_eq!(parse(all), Ok(Selection::All), "{all:?}");
        }
    }

    #[test]
    fn the_filters_match_what_the_path_selects() {
        let f = ocmesh_node::query::Filter::parse(&filter("$.[?(@._type == 'test' && @.n != 2)]")).expect("filter");
        assert!(f.matches(&json!({"_type": "test", "n": 1})));
        assert!(!f.matches(&json!({"_type": "test", "n": 2})));
        assert!(!f.matches(&json!({"_type": "other", "n": 1})));
    }

    #[test]
    fn malformed_paths_are_errors_not_panics() {
        let bad = [
            "x",
            "$.name",
            "$.[",
            "$.[?",
            "$.[?(",
            "$.[?()]",
            "$.[?(@)]",
            "$.[?(@.)]",
            "$.[?(@.a)]",
            "$.[?(@.a ==)]",
            "$.[?(@.a == 'x)]",
            "$.[?(@.a == 'x\\",
            "$.[?(@.a = 1)]",
            "$.[?(@.a > 1)]",
            "$.[?(@.a == 1 &&)]",
            "$.[?(@.a == 1 || )]",
            "$.[?(@.a == 1)",
            "$.[?(@.a == 1)] extra",
            "$.[?(@.a == 1))]",
            "$.[?(@.a == 1-)]",
            "$.[?(@.a == --1)]",
            "$.[?(@.a == tru)]",
            "$.[?(@[1] == 1)]",
            "$.[?(@['$where'] == 1)]",
            "$.[?(@[''] == 1)]",
            "$.[?(@['.'] == 1)]",
            "$.[?(@['a..b'] == 1)]",
            "$.[?(@['a.'] == 1)]",
            "$.[?(@.a == 1 && @.b == 2 || (@.c == 3)]",
            "$.[*]",
            "$..name",
            "{\"_type\": 1}",
            "$.[?(@.é == 'ü')] ü",
            "\u{0}",
        ];
        for path in bad {
            let e = parse(path).expect_err(path);
            assert!(!e.to_string().is_empty(), "{path}");
        }
        let deep = format!("$.[?({}@.a == 1{})]", "(".repeat(100), ")".repeat(100));
        assert_eq!(parse(&deep), Err(PathError::TooDeep));
        let long = format!("$.[?(@.a == '{}')]", "x".repeat(MAX_LEN));
        assert_eq!(parse(&long), Err(PathError::TooLong));
        // Every prefix of a good path fails cleanly (or, for the empty one, selects all).
        let good = "$.[?(@._type == 'a' && (@.n != -2.5 || @['b c'] == \"d\"))]";
        let chars: Vec<char> = good.chars().collect();
        for end in 0..chars.len() {
            let prefix: String = chars[..end].iter().collect();
            let _ = parse(&prefix);
        }
        assert!(matches!(parse(good), Ok(Selection::Filter(_))));
    }
}
